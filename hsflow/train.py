"""`python -m hsflow.train [overrides]`: build the dataset variant, train, calibrate, test, log to MLflow.

The run is the list of stages in `run` below. The last line printed is `run_id=<mlflow run id> test_top1=<accuracy>`
(by rank zero alone under DDP).
"""
from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach for the internet

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from hsflow.config import CONF_DIR  # noqa: E402
from hsflow.data.builder import selected_photos  # noqa: E402
from hsflow.store import RawStore, StoreError  # noqa: E402


def run(cfg: DictConfig) -> dict | None:
    """One training run: these stages, in this order, over one RunContext (hsflow/stages.py). Returns the run id,
    the test figures and validation top-1; None in the other processes of a DDP run (they only fit)."""
    from hsflow import stages as s  # torch, Lightning, MLflow: loaded after main's cheap checks

    return s.execute(cfg, [
        s.setup,          # checked values, device, decoding workers, seed, the checkpoint a resume continues
        s.dataset,        # the dataset variant from the raw store: classes, split by date or ruling, generated copies
        s.network,        # the ImageNet backbone cut into a frozen prefix and a trainable suffix
        s.data,           # the DataModule: cached prefix outputs (or photos, features=naive)
        s.module,         # the LightningModule: a new head over the suffix
        s.open_run,       # the MLflow run: params, tags, dataset fingerprint and split            (rank zero)
        s.fit,            # Lightning's fit on training rulings, validated on the next period     (every process)
        s.calibrate,      # temperature on validation; validation logits kept                    (rank zero from here)
        s.refit,          # the final model on training + validation rulings, choices kept
        s.unknown_score,  # the unknown score: training embeddings and Gaussians, threshold on validation
        s.review,         # the review threshold on validation answers not called unknown (a bound by default)
        s.test,           # test figures with 95 % intervals over rulings, the three outcomes applied
        s.heldout,        # codes held out of training: caught or not, each score's AUROC, the trade-off table
        s.package,        # the saved model folder (with its precedent index) as an MLflow model
        s.plots,          # curves and confusion views
        s.close,          # timings, the run's description, the run ends
    ])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        # A dataset that selects nothing in this store fails first, in about a second: before torch and MLflow load,
        # before the MLflow store, the weights and any photo decoding (the ruling records alone tell).
        selected_photos(cfg.dataset, RawStore(cfg.paths.raw_store))
        from hsflow.models.backbones import WeightsMissing
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        result = run(cfg)
    except (WeightsMissing, StoreError, FileNotFoundError, ValueError) as exc:  # a wrong value: one line, no trace
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if result is None:  # another process of a DDP run: it fitted its share; rank zero reports
        return None
    print(f"run_id={result['run_id']} test_top1={result['test_top1']:.4f}", flush=True)
    return result["val_top1"]  # what sweepers (optuna) optimize: validation, never test


if __name__ == "__main__":
    # Call the importable copy of main: launchers that pickle the task (joblib, submitit) must find it by
    # reference as hsflow.train.main, not by value from __main__.
    from hsflow.train import main as importable_main

    importable_main()
