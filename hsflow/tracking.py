"""What goes to MLflow and how: the run, its params, the dataset fingerprint, plots and the model."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from hsflow.config import ROOT_DIR

PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "efficientnet_lite_pytorch==0.1.0", "pillow",
                    f"hsflow @ file://{ROOT_DIR}"]


def experiment_id(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and get (or create) the experiment."""
    uri = str(cfg.logger.tracking_uri)
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return _get_or_create(cfg.logger.experiment_name, None)
    # Parallel sweep jobs (joblib, submitit_local) on a fresh SQLite file would race to create its tables and the
    # experiment: one process at a time does it. Artifacts live beside the SQLite file, not where the command ran.
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        return _get_or_create(cfg.logger.experiment_name, (db.parent / "mlartifacts").resolve().as_uri())


def _get_or_create(name: str, location: str | None) -> str:
    exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else mlflow.create_experiment(name, artifact_location=location)


def flat_params(cfg: DictConfig) -> dict[str, str]:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return {k: v[:6000] for k, v in out.items() if not k.startswith(("hydra", "paths.output_dir"))}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT_DIR, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sweep_tags() -> dict[str, str]:
    """In a --multirun (any launcher or sweeper): the sweep's id, the job's number and overrides, so the MLflow UI
    can group and compare one sweep's runs (filter: tags.hsflow.sweep_id = '...')."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    return {"hsflow.sweep_id": "-".join(Path(hc.sweep.dir).parts[-2:]), "hsflow.sweep_dir": str(hc.sweep.dir),
            "hsflow.sweep_job": str(hc.job.num), "hsflow.sweep_overrides": ",".join(hc.overrides.task)[:5000],
            "hsflow.sweeper": str(hc.runtime.choices.get("hydra/sweeper", "basic")),
            "hsflow.launcher": str(hc.runtime.choices.get("hydra/launcher", "basic"))}


def log_start(cfg: DictConfig, spec, summary: dict) -> None:
    """Params, tags, resolved config and the dataset fingerprint; call inside an active run."""
    mlflow.log_params(flat_params(cfg))
    mlflow.set_tags({"mlflow.source.git.commit": git_commit(), "dataset": spec.name,
                     "dataset.fingerprint": summary["fingerprint"], "backbone": cfg.model.name, **sweep_tags(),
                     **{str(k): str(v) for k, v in (cfg.logger.get("tags") or {}).items()}})
    cfg_yaml = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    mlflow.log_text(cfg_yaml, "config.yaml")
    mlflow.log_dict({"summary": summary, "photos_per_class_per_split": spec.counts(), "skipped": spec.skipped,
                     "removed_per_rule": spec.removed},
                    "dataset/fingerprint.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.csv"
        spec.save_split(path)
        mlflow.log_artifact(str(path), "dataset")
    mlflow.log_metrics({f"dataset_{sp}_photos": n for sp, n in summary["photos"].items()}
                       | {f"dataset_{sp}_generated": n for sp, n in summary["generated"].items()}
                       | {f"dataset_removed_{rule}": n for rule, n in summary["removed"].items()})
    if spec.near_duplicates:
        mlflow.log_dict({"clusters": spec.near_duplicates}, "dataset/near_duplicates.json")


def log_curves(run_id: str) -> None:
    """Loss and accuracy per epoch (the study's figure 1) as a PNG, from the run's own metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, keys) in zip(axes, [("loss", ["train_loss", "val_loss"]), ("top-1 accuracy",
                                                                             ["train_top1", "val_top1"])]):
        for key in keys:
            hist = client.get_metric_history(run_id, key)
            if hist:
                hist = sorted(hist, key=lambda m: m.step)
                ax.plot(range(1, len(hist) + 1), [m.value for m in hist], label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/curves.png")
    plt.close(fig)


def log_confusion(matrix, classes: list[str], title: str = "test confusion matrix") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    n = len(classes)
    size = max(5.0, 0.32 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    rows = m.sum(1, keepdims=True)
    im = ax.imshow(np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0), cmap="Blues",
                   vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7 if n > 15 else 9)
    ax.set_yticks(range(n), classes, fontsize=7 if n > 15 else 9)
    if n <= 45:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6 if n > 15 else 9,
                            color="white" if m[i, j] > 0.5 * max(rows[i, 0], 1) else "black")
    ax.set_xlabel("predicted HS code")
    ax.set_ylabel("decided HS code")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the row")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/confusion_matrix.png")
    plt.close(fig)
    mlflow.log_dict({"classes": classes, "matrix": m.tolist()}, "plots/confusion_matrix.json")


def log_model(model, cfg: DictConfig) -> str:
    """The model as an MLflow pyfunc (model from code, files inside); returns its URI runs:/<id>/model."""
    from hsflow.models import pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        files = model.save(Path(tmp))  # weights.pt, meta.json and, with an unknown scorer, unknown.pt
        mlflow.pyfunc.log_model(name="model", python_model=pyfunc.__file__,
                                artifacts={f.stem: str(f) for f in files},
                                pip_requirements=PIP_REQUIREMENTS,
                                registered_model_name=cfg.logger.get("registered_model_name") or None)
    return f"runs:/{mlflow.active_run().info.run_id}/model"
