"""`python -m hsflow.train [overrides]`: build the dataset variant, train, calibrate, test, log to MLflow.

The run is the list of stages in `run` below. The last line printed is `run_id=<mlflow run id> test_top1=<accuracy>`
(by rank zero alone under DDP).
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach for the internet

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from hsflow.core.config import CONF_DIR  # noqa: E402
from hsflow.data.builder import selected_photos  # noqa: E402
from hsflow.data.store import RawStore, StoreError  # noqa: E402


def run(cfg: DictConfig) -> dict | None:
    """One training run: these stages, in this order, over one RunContext (hsflow/training/stages.py). Returns the run id,
    the test figures and validation top-1; None in the other processes of a DDP run (they only fit)."""
    from hsflow.training import stages as s  # torch, Lightning, MLflow: loaded after main's cheap checks

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


def tracking_failure(exc: Exception, cfg: DictConfig) -> str | None:
    """One line for a tracking server (MLFLOW_TRACKING_URI=http...) that stopped answering or refused the
    credentials: which server, and for a run that had started, its id, its checkpoint and how to continue it. None
    for anything else (that keeps its traceback)."""
    from mlflow.exceptions import MlflowException

    uri = str(cfg.logger.tracking_uri)
    if not uri.startswith(("http://", "https://")) or not isinstance(exc, MlflowException):
        return None
    if exc.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME") or "no user (no MLFLOW_TRACKING_USERNAME)"
        return (f"the tracking server {uri} refused {who} ({exc.error_code}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to an account with write access to experiment "
                f"{cfg.logger.experiment_name!r} (docs/team.md)")
    text = str(exc)
    if "failed with exception" not in text and not exc.error_code.startswith(("TEMPORARILY", "INTERNAL")):
        return None
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)|(Read timed out)|(\d{3} != 200)", text)
    reason = next((g for g in found.groups() if g), "") if found else text.split(". ")[0]
    run_id = getattr(exc, "hsflow_run_id", None)
    if run_id is None:
        return f"the tracking server {uri} did not answer ({reason[:160]}); nothing was logged: start it and run again"
    where = "where it started" if cfg.get("resume") else Path(cfg.paths.output_dir, "checkpoints").resolve()
    return (f"the tracking server {uri} stopped answering ({reason[:160]}) during run {run_id}; its checkpoint is "
            f"kept ({where}): once the server is back, continue the same run with resume={run_id}")


def last_line(result: dict) -> str:
    """The run's last printed line: what scripts that run `python -m hsflow.train` read back (parse_last_line)."""
    return f"run_id={result['run_id']} test_top1={result['test_top1']:.4f}"


def parse_last_line(stdout: str) -> dict:
    """`run_id` (str) and `test_top1` (float) from the output of `python -m hsflow.train`, whose last line is
    last_line's; a ValueError naming what was found where that line should be."""
    lines = stdout.strip().splitlines()
    found = re.fullmatch(r"run_id=(\S+) test_top1=(\S+)", lines[-1].strip()) if lines else None
    if found is None:
        raise ValueError(f"no 'run_id=... test_top1=...' line at the end of the training output: "
                         f"{(lines or [''])[-1][:200]!r}")
    return {"run_id": found[1], "test_top1": float(found[2])}


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
    except Exception as exc:  # noqa: BLE001 - a tracking server that went away or said no: one line, else re-raised
        line = tracking_failure(exc, cfg)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(3)
    if result is None:  # another process of a DDP run: it fitted its share; rank zero reports
        return None
    print(last_line(result), flush=True)
    return result["val_top1"]  # what sweepers (optuna) optimize: validation, never test


def cli() -> int:
    """`python -m hsflow.train`: Hydra's main, called by reference (hsflow.training.train.main) so that launchers
    that pickle the task (joblib, submitit) find it by name rather than by value from __main__."""
    main()
    return 0


if __name__ == "__main__":
    from hsflow.training.train import cli as importable_cli

    importable_cli()
