"""How often does the review bound certify anything on 2018? (issue 25: the choice of calibration.delta)

    .venv/bin/python studies/review_bound_seeds.py --seeds 42 43 44 45       # fit each seed (about 3 min each)
    .venv/bin/python studies/review_bound_seeds.py --from-npz DIR            # re-read saved validation answers

For each seed, make train's stages up to the unknown score (setup ... calibrate, unknown_score; no refit, no test:
2019 is never read) give the pre-refit model's calibrated 2018 answers and which photos are called unknown; then
the Clopper-Pearson review threshold at delta 0.1 and 0.2 (and the point estimate) is fitted exactly as make train
fits it (calibration.fit_review_threshold), and its 2018 coverage and precision are read. Writes
studies/review_bound_seeds.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from hsflow.models import calibration  # noqa: E402


def validation_answers(seed: int, out: Path) -> Path:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from hsflow.training import stages as s

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=recommended", f"seed={seed}",
                                          f"logger.tracking_uri=sqlite:///{out}/mlflow.db",
                                          "logger.experiment_name=review-bound-seeds"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / f"out{seed}")
    ctx = s.RunContext(cfg)
    for stage in (s.setup, s.dataset, s.network, s.data, s.module, s.open_run, s.fit, s.calibrate, s.unknown_score):
        stage(ctx)
    probs = torch.softmax(ctx.val_logits / ctx.calibration["temperature"], 1).numpy()
    path = out / f"val_{seed}.npz"
    np.savez(path, probs=probs, labels=ctx.labels("val").numpy(), flags=ctx.unknown_flags["val"])
    return path


def certified(path: Path) -> dict:
    d = np.load(path)
    probs, labels, flags = d["probs"], d["labels"], d["flags"]
    conf, right = probs.max(1), probs.argmax(1) == labels
    row = {"photos": int(len(labels)), "top1": float(right.mean())}
    for name, cal in (("cp_delta_0.1", {"method": "clopper_pearson", "delta": 0.1}),
                      ("cp_delta_0.2", {"method": "clopper_pearson", "delta": 0.2}), ("point", {"method": "point"})):
        t = calibration.fit_review_threshold(probs, labels, {**cal, "target_precision": 0.95}, None, ~flags)
        ok = calibration.unflagged(conf, t, flags)
        row[name] = {"threshold": float(t), "coverage": float(ok.mean()),
                     "precision": float(right[ok].mean()) if ok.any() else None}
    order = np.argsort(-conf[~flags], kind="stable")
    row["first_mistakes_at_rank"] = np.nonzero(~right[~flags][order])[0][:3].tolist()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45])
    ap.add_argument("--from-npz", type=Path, default=None, help="a folder of val_<seed>.npz from an earlier run")
    args = ap.parse_args()
    work = args.from_npz or Path(tempfile.mkdtemp(prefix="hsflow-bound-seeds-"))
    rows = {}
    for seed in args.seeds:
        path = work / f"val_{seed}.npz"
        rows[seed] = certified(path if path.is_file() else validation_answers(seed, work))
        print(seed, json.dumps(rows[seed]), flush=True)
    (ROOT / "studies" / "review_bound_seeds.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
