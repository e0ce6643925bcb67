"""Does training on the validation rulings too help on later rulings? Evidence from the validation period alone.

The 2018 validation rulings are split in two halves by ruling (seeded). For each half: a head trained on the
training rulings only, one trained on training + the other half, and one where the other half's photos count
`--weight` times (later rulings look most like the next imports), all scored on the held-back half; the two halves'
scores are averaged. The 2019 test rulings are never read. The result is logged as a run of the MLflow experiment
"default-search" and decides `refit.enabled` / `refit.val_weight` of experiment=recommended.

    .venv/bin/python studies/refit_evidence.py [hydra overrides, default: experiment=recommended]
"""
from __future__ import annotations

import os
import random
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import mlflow  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from hsflow.training import stages  # noqa: E402
from hsflow.core.config import CONF_DIR  # noqa: E402
from hsflow.models.classifier import build_head  # noqa: E402

WEIGHTS = (1, 5)


def fit_head(cfg, x, y, classes: int) -> torch.nn.Module:
    """The configured head and optimizer (AdamW/cosine/label smoothing of experiment=recommended), plain torch."""
    torch.manual_seed(int(cfg.seed))
    head = build_head(x.shape[1], classes, cfg.model.head.hidden, cfg.model.head.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=float(cfg.optimizer.lr))
    epochs = int(cfg.trainer.max_epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.label_smoothing))
    g = torch.Generator().manual_seed(int(cfg.seed))
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(y), generator=g).split(int(cfg.batch_size)):
            opt.zero_grad()
            loss(head(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return head.eval()


def main(argv: list[str]) -> int:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=argv or ["experiment=recommended"])
    torch.set_num_threads(1)
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network, stages.data):  # train.run's stages up to the data
        stage(ctx)
    spec, dm = ctx.spec, ctx.dm
    (xtr, ytr), (xv, yv) = dm.splits["train"].tensors, dm.splits["val"].tensors
    rulings = [s.rrdc_no for s in spec.split("val")]
    order = sorted(set(rulings))
    random.Random(int(cfg.seed)).shuffle(order)
    first = set(order[: len(order) // 2])
    in_first = torch.tensor([r in first for r in rulings])
    scores = {"train_only": [], **{f"plus_other_half_x{w}": [] for w in WEIGHTS}}
    for fit_mask, eval_mask in ((in_first, ~in_first), (~in_first, in_first)):
        def top1(head):
            with torch.no_grad():
                return float((head(xv[eval_mask]).argmax(1) == yv[eval_mask]).float().mean())

        scores["train_only"].append(top1(fit_head(cfg, xtr, ytr, len(spec.classes))))
        for w in WEIGHTS:
            x = torch.cat([xtr] + [xv[fit_mask]] * w)
            y = torch.cat([ytr] + [yv[fit_mask]] * w)
            scores[f"plus_other_half_x{w}"].append(top1(fit_head(cfg, x, y, len(spec.classes))))
    figures = {f"val_half/top1_{k}": sum(v) / len(v) for k, v in scores.items()}
    mlflow.set_tracking_uri(str(cfg.logger.tracking_uri))
    mlflow.set_experiment("default-search")
    with mlflow.start_run(run_name="refit-evidence", tags={"hsflow.kind": "evidence"}):
        mlflow.log_params({"overrides": " ".join(argv) or "experiment=recommended", "val_rulings": len(order)})
        mlflow.log_metrics(figures)
    for k, v in figures.items():
        print(f"{k} {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
