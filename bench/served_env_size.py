"""Installed size of the served model's environment: `.venv/bin/python bench/served_env_size.py`.

For a list of requirements, the dependency closure (each distribution's `Requires-Dist` for this platform, without
extras) as installed in this environment, and the bytes of every file each distribution installed (its RECORD).
Three lists: what a model logged before issue 26 asked for (torch, torchvision, efficientnet_lite_pytorch, pillow
and `hsflow @ file://<checkout>`, i.e. every hsflow dependency), what a model with network.onnx asks for now
(hsflow.training.tracking.SERVED_PACKAGES, no torch; hsflow's code ships inside the model), and what a model whose ONNX
export failed asks for (the same + torch). mlflow is in all three (the scoring server).
Writes bench/served_env_size.json.
"""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def closure(names: list[str]) -> dict[str, int]:
    """distribution name -> installed bytes, for `names` and everything they require (markers evaluated here)."""
    seen: dict[str, int] = {}
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            seen[name] = 0
            continue
        seen[name] = sum((f.size or 0) for f in dist.files or [])
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def main() -> int:
    from hsflow.training.tracking import SERVED_PACKAGES, TORCH_PACKAGES

    hsflow_deps = [Requirement(r).name for r in metadata.distribution("hsflow").requires or []
                   if "extra ==" not in r]
    lists = {"before issue 26 (torch + hsflow @ file://checkout)":
             ["torch", "torchvision", "efficientnet_lite_pytorch", "pillow", "mlflow", *hsflow_deps],
             "now (hsflow in code_paths; SERVED_PACKAGES: network.onnx answers)": [*SERVED_PACKAGES, "mlflow"],
             "a model without network.onnx (SERVED_PACKAGES + TORCH_PACKAGES)":
             [*SERVED_PACKAGES, *TORCH_PACKAGES, "mlflow"]}
    out = {}
    for label, names in lists.items():
        sizes = closure(names)
        big = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
        out[label] = {"distributions": len(sizes), "mb": round(sum(sizes.values()) / 2**20),
                      "largest_mb": {k: round(v / 2**20) for k, v in big}}
        print(f"{label}: {len(sizes)} distributions, {out[label]['mb']} MB; largest {out[label]['largest_mb']}")
    (ROOT / "bench" / "served_env_size.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
