"""int8 for make train's frozen prefix (issue 26): ONNX Runtime static quantization, speed and 2018 top-1.

    .venv/bin/python studies/int8_eval.py            # after `make train` filled the feature cache

The joined Lite1 + Lite0 prefix is exported once (float32), then quantized with ONNX Runtime's static quantization
(QDQ, int8 weights per channel, uint8 activations, calibrated on 64 training photos). Speed: photos/s of both at
batch 32 and 1, interleaved rounds, in this one process. Accuracy: the 2,640 training originals and the 147 photos of
2018 through the int8 prefix; a head like make train's (hidden 512, 20 epochs, AdamW, label smoothing 0.1; on the
originals, no generated copies, to keep this bench short) fit on each prefix's features, seed for seed; 2018 top-1
with its paired difference over rulings. 2019 is not read. Output: studies/int8_results.json.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hsflow.core import runtime as rt  # noqa: E402
from hsflow.data.loading import PhotoDataset  # noqa: E402
from hsflow.data.transforms import build_preprocess  # noqa: E402
from hsflow.training import evaluation  # noqa: E402
from studies.common import features, train_head  # noqa: E402


class Reader:
    """ONNX Runtime's calibration data reader over a few preprocessed photos, one batch of 8 at a time."""

    def __init__(self, x: np.ndarray):
        self.batches = iter([{rt.INPUT: x[i: i + 8]} for i in range(0, len(x), 8)])

    def get_next(self):
        return next(self.batches, None)


def quantize(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def run_all(net: rt.OnnxNetwork, samples, pre, desc: str) -> torch.Tensor:
    loader = DataLoader(PhotoDataset(samples, build_preprocess(pre), None, pre["resize"]), batch_size=32)
    out = [torch.from_numpy(net.run(x.numpy())["features"]) for x, _ in tqdm(loader, desc=desc, unit="batch")]
    return torch.cat(out)


def speed(nets: dict, x: np.ndarray, batch: int, rounds: int = 3) -> dict:
    calls = [x[i: i + batch] for i in range(0, len(x), batch)][: max(1, 8 // len(x[:batch]))]
    times: dict = {n: [] for n in nets}
    for net in nets.values():
        net.run(calls[0])
    for _ in range(rounds):
        for name, net in nets.items():
            t = time.perf_counter()
            for c in calls:
                net.run(c)
            times[name].append(sum(len(c) for c in calls) / (time.perf_counter() - t))
    return {n: round(sorted(v)[len(v) // 2], 1) for n, v in times.items()}


def top1(train_x, train_y, val_x, val_y, classes: int, seed: int) -> np.ndarray:
    head = train_head(train_x, train_y, classes, seed=seed)
    with torch.no_grad():
        return (head(val_x).argmax(1) == val_y).numpy().astype(float)


def main() -> None:
    feats, samples, classes, cfg, ctx = features([])
    pre = ctx.pre
    orig = {sp: [s for s in samples[sp] if s.view == 0] for sp in ("train", "val")}
    keep = {sp: torch.tensor([s.view == 0 for s in samples[sp]]) for sp in ("train", "val")}
    with tempfile.TemporaryDirectory(prefix="hsflow-int8-") as tmp:
        calib_loader = DataLoader(PhotoDataset(orig["train"][::40][:64], build_preprocess(pre), None, pre["resize"]),
                                  batch_size=64)
        calib = next(iter(calib_loader))[0].numpy()
        fp32 = rt.export(ctx.net.prefix, torch.from_numpy(calib[:2]), Path(tmp) / "fp32.onnx", ["features"])
        int8 = quantize(fp32, calib, Path(tmp) / "int8.onnx")
        nets = {"onnxruntime fp32": rt.OnnxNetwork(fp32), "onnxruntime int8": rt.OnnxNetwork(int8)}
        x = calib[:32]
        result = {"speed_batch32": speed(nets, x, 32), "speed_batch1": speed(nets, x, 1),
                  "load_average": [round(v, 1) for v in os.getloadavg()]}
        q = {sp: run_all(nets["onnxruntime int8"], orig[sp], pre, f"int8 {sp}") for sp in ("train", "val")}
    f = {sp: feats[sp][keep[sp]] for sp in ("train", "val")}
    y = {sp: torch.tensor([s.label for s in orig[sp]]) for sp in ("train", "val")}
    result["max_abs_diff"] = float((q["val"] - f["val"]).abs().max())
    result["cosine_min"] = float(torch.nn.functional.cosine_similarity(q["val"], f["val"]).min())
    rulings = [s.rrdc_no for s in orig["val"]]
    seeds = (42, 43, 44)
    a = np.mean([top1(q["train"], y["train"], q["val"], y["val"], len(classes), s) for s in seeds], axis=0)
    b = np.mean([top1(f["train"], y["train"], f["val"], y["val"], len(classes), s) for s in seeds], axis=0)
    result |= {"val_top1_int8": float(a.mean()), "val_top1_fp32": float(b.mean()), "seeds": list(seeds),
               "paired_diff_int8_minus_fp32": evaluation.paired_difference(a, b, rulings)}
    print(json.dumps(result, indent=1))
    (ROOT / "studies" / "int8_results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
