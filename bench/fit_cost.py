"""What a fit epoch costs per training photo as the class count grows, for the heads the configs define.

    python bench/fit_cost.py [--photos 4000] [--classes 42 500 1554 3000]   -> bench/fit_cost.json, bench/fit_cost.png

The heads come from the project's own configs (Hydra compose, so the figures follow conf/): `make train`'s
(experiment=recommended: 512-unit hidden layer, AdamW, label smoothing) and the study's (`python -m hsflow.train`
defaults: one linear layer, RMSprop), each trained by the real HSClassifier under the default trainer (Lightning,
deterministic, 32-bit, one thread as train.py fits cached features) on random 1,280-dim cached features, which cost
what real ones cost. An epoch includes its validation pass (a tenth of the photos), as in a run; the figure is the
fastest of epochs 2-3 (the first pays allocator warm-up). bench/scale.sh measures the same inside whole runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from hsflow.core.config import CONF_DIR  # noqa: E402
from hsflow.data.datamodule import HSDataModule  # noqa: E402
from hsflow.models.classifier import HSClassifier, build_head  # noqa: E402
from hsflow.core.timing import EpochTimer  # noqa: E402

HEADS = {  # name -> config overrides
    "make train (hidden 512, AdamW fused)": ["experiment=recommended"],
    "make train, AdamW unfused": ["experiment=recommended", "optimizer.fused=false"],
    "study (linear, RMSprop)": [],
}
DIM = 1280  # EfficientNet-Lite pooled features


def epoch_cost(cfg, classes: int, photos: int) -> dict:
    """µs per training photo of one fit epoch (CPU and wall), fastest of epochs 2-3."""
    g = torch.Generator().manual_seed(0)
    sizes = {"train": photos, "val": photos // 10, "test": 32}
    feats = {s: torch.randn(n, DIM, generator=g) for s, n in sizes.items()}
    labels = {s: torch.randint(0, classes, (n,), generator=g) for s, n in sizes.items()}
    dm = HSDataModule.from_features(feats, labels, batch_size=int(cfg.batch_size), seed=0)
    head = build_head(DIM, classes, cfg.model.head.hidden, cfg.model.head.dropout)
    module = HSClassifier(torch.nn.Identity(), head, classes, instantiate(cfg.optimizer),
                          label_smoothing=cfg.label_smoothing, scheduler=cfg.scheduler)
    timer = EpochTimer()
    trainer = instantiate(cfg.trainer, max_epochs=3, logger=False, callbacks=[timer], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    return {"cpu_us_per_photo": round(min(timer.cpu_seconds[1:]) / photos * 1e6, 1),
            "wall_us_per_photo": round(min(timer.seconds[1:]) / photos * 1e6, 1)}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in results.items():
        xs = [int(c) for c in rows]
        ax.plot(xs, [rows[c]["cpu_us_per_photo"] for c in rows], marker="o", label=name)
    ax.set(xlabel="classes", ylabel="fit epoch, CPU µs per training photo",
           title="Head fit cost vs classes (1 thread, batch 32, deterministic)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=4000)
    ap.add_argument("--classes", type=int, nargs="+", default=[42, 500, 1554, 3000])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as train.fit_threads for a frozen backbone on cached features
    results: dict = {}
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for name, overrides in HEADS.items():
            cfg = compose("train", overrides=[*overrides, "trainer.default_root_dir=/tmp/hsflow-fit-cost"])
            results[name] = {}
            for c in args.classes:
                pl.seed_everything(0, verbose=False)
                results[name][str(c)] = epoch_cost(cfg, c, args.photos)
                print(f"{name:40s} {c:>5} classes: {results[name][str(c)]}", flush=True)
    ratios = {name: {c: round(r["cpu_us_per_photo"] / rows[str(args.classes[0])]["cpu_us_per_photo"], 2)
                     for c, r in rows.items()} for name, rows in results.items()}
    out = {"photos": args.photos, "threads": 1, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
           "results": results, "cpu_ratio_to_first": ratios}
    (ROOT / "bench" / "fit_cost.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(results, ROOT / "bench" / "fit_cost.png")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
