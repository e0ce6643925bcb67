"""Forward speed of the frozen prefixes make train can cache, on this machine: `.venv/bin/python bench/join_speed.py`.

Lite1 alone, Lite1 + Lite0 joined (`model.concat`, make train's default) and Lite0 alone, all on a 240 px batch of 32 in
channels-last, as hsflow.data.features runs them; photos/s over 3 batches after one warm-up batch (CPU threads: all cores).
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from hsflow.models.backbones import build_backbone, split_backbone  # noqa: E402


def photos_per_s(prefix: torch.nn.Module, x: torch.Tensor, batches: int = 3) -> float:
    prefix = prefix.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        prefix(x)
        started = time.perf_counter()
        for _ in range(batches):
            prefix(x)
    return batches * len(x) / (time.perf_counter() - started)


def main() -> None:
    lite1, lite0 = build_backbone("efficientnet_lite1"), build_backbone("efficientnet_lite0")
    x = torch.rand(32, 3, 240, 240).contiguous(memory_format=torch.channels_last)
    for name, net in [("lite1", split_backbone(lite1, 0, "x")), ("lite1+lite0", split_backbone(lite1, 0, "x", [lite0])),
                      ("lite0", split_backbone(lite0, 0, "x"))]:
        print(f"{name:12s} {photos_per_s(net.prefix, x):6.1f} photos/s", flush=True)


if __name__ == "__main__":
    main()
