"""What goes to MLflow and how: the run, its params, the dataset fingerprint, plots and the model.

Laid out for MLflow's UI as the comparison tool: experiments are marked as model training (not GenAI) and carry a
saved view of the runs table with the accuracy columns; metric keys are `<section>/<name>` (`curves/loss_train`,
`curves/top1_val`, `test/top1`, `val/ece_after`): the UI makes a chart section of each prefix, in name order, so
the per-epoch curves lead, then the test results, then calibration on validation; dataset counts are params
(`counts.*`), not charts; each run carries a one-paragraph description (`mlflow.note.content`);
a sweep's runs are children of one parent run per sweep, so the runs table folds them under one row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from hsflow.core.config import PACKAGE_DIR, ROOT_DIR

# MLflow's own experiment-type tag (what its UI's experiment-kind selector writes): classic model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A saved view of the runs table (the UI's "Views" menu; MLflow 3 keeps views as experiment tags with this prefix):
# MLflow's default columns are Source, Models and Dataset only, so hsflow saves one with the figures that compare
# runs. Open it with `?viewStateShareKey=hsflow-accuracy` (hsflow.ui prints the link).
VIEW_ID = "hsflow-accuracy"
VIEW_COLUMNS = ["metrics.`curves/top1_val`", "metrics.`test/top1`", "metrics.`test/top3`",
                "metrics.`test/chapter_top1`", "metrics.`curves/loss_val`", "params.`model.name`",
                "params.`dataset.name`", "params.`trainer.max_epochs`"]
# What the logged model's own environment installs (`mlflow models serve --env-manager virtualenv|uv`, build-docker):
# the packages the loaded model imports, at the versions it was trained with. hsflow itself ships inside the model
# (MLflow `code_paths`: <model>/code/hsflow), so the model installs away from the checkout it was trained in. A model
# with network.onnx answers without torch (ONNX Runtime, numpy: hsflow.models.bundle); one whose export failed needs torch.
SERVED_PACKAGES = ("onnxruntime", "numpy", "pillow", "tqdm", "omegaconf")
TORCH_PACKAGES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "efficientnet_lite_pytorch",
                  "hydra-core")  # instantiates the backbone class meta.json names


def pip_requirements(with_torch: bool = False) -> list[str]:
    from importlib.metadata import version

    names = SERVED_PACKAGES + (TORCH_PACKAGES if with_torch else ())
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


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


def experiment_tags() -> dict[str, str]:
    """Experiment tags that make MLflow's UI a comparison tool: the model-training kind and the accuracy view."""
    # Sorted by start time (MLflow's default): sorting by a metric would unfold the sweeps (children listed flat).
    state = {"searchFilter": "", "selectedColumns": VIEW_COLUMNS, "runsHiddenMode": "SHOW_ALL"}
    view = {"name": "hsflow: accuracy", "createdAt": 0, "updatedAt": 0, "state": json.dumps(state)}
    return dict([EXPERIMENT_KIND]) | {f"mlflow.sharedViewState.{VIEW_ID}": json.dumps(view)}


def _get_or_create(name: str, location: str | None) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow.create_experiment(name, artifact_location=location, tags=experiment_tags())
        except MlflowException as exc:  # a parallel sweep job made it first on a tracking server (no file lock there)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = mlflow.get_experiment_by_name(name)
    for key, value in experiment_tags().items():  # an experiment made before hsflow set them (or an older view)
        if exp.tags.get(key) != value:
            MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


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


def sweep_parent(experiment_id: str, tags: dict) -> str | None:
    """The run that stands for a whole sweep (made by its first job, found by the others): its trials become its
    children (tag mlflow.parentRunId), so the runs table shows one sweep as one row that unfolds."""
    if not tags:
        return None
    from filelock import FileLock

    sweep_dir = Path(tags["hsflow.sweep_dir"])
    sweep_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient()
    with FileLock(str(sweep_dir / ".mlflow_parent.lock"), timeout=300):  # parallel jobs share the sweep folder
        found = client.search_runs([experiment_id], f"tags.`hsflow.sweep_id` = '{tags['hsflow.sweep_id']}' and "
                                   "tags.`hsflow.kind` = 'sweep'", max_results=1)
        if found:
            return found[0].info.run_id
        parent = client.create_run(experiment_id, run_name=f"sweep {tags['hsflow.sweep_id']}", tags={
            "hsflow.kind": "sweep", "hsflow.sweep_id": tags["hsflow.sweep_id"],
            "hsflow.sweeper": tags["hsflow.sweeper"], "hsflow.launcher": tags["hsflow.launcher"],
            "mlflow.note.content": f"Hydra sweep `{tags['hsflow.sweep_id']}` ({tags['hsflow.sweeper']} sweeper, "
                                   f"{tags['hsflow.launcher']} launcher): its trials are the runs under this one."})
        client.set_terminated(parent.info.run_id)
        return parent.info.run_id


def log_start(cfg: DictConfig, spec, summary: dict) -> None:
    """Params, tags, resolved config and the dataset fingerprint; call inside an active run."""
    mlflow.log_params(flat_params(cfg))
    sweep = sweep_tags()
    parent = sweep_parent(mlflow.active_run().info.experiment_id, sweep)
    mlflow.set_tags({"mlflow.source.git.commit": git_commit(), "dataset": spec.name,
                     "dataset.fingerprint": summary["fingerprint"], "backbone": cfg.model.name, **sweep,
                     "split_protocol": summary.get("protocol", ""), "refit": str(bool(cfg.refit.enabled)),
                     **({"mlflow.parentRunId": parent} if parent else {}),
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
    # Counts are facts about the dataset, not curves: params (a column in the runs table), never metric charts.
    mlflow.log_params({"counts.classes": summary["classes"]}
                      | {f"counts.{sp}_photos": n for sp, n in summary["photos"].items()}
                      | {f"counts.{sp}_generated": n for sp, n in summary["generated"].items()}
                      | {f"counts.removed_{rule}": n for rule, n in summary["removed"].items()})
    if spec.near_duplicates:
        mlflow.log_dict({"clusters": spec.near_duplicates}, "dataset/near_duplicates.json")
    # Every code that is not a class as it stands (dropped, relabelled to a catch-all, train-only), and why.
    mlflow.log_dict(spec.codes, "dataset/codes.json")
    mlflow.log_params({f"counts.codes_{fate}": n for fate, n in summary.get("codes", {}).items()})


def log_note(cfg: DictConfig, summary: dict, metrics: dict[str, float]) -> None:
    """The run's description in the UI (its Overview and the runs table): dataset, split protocol, model, figures."""
    photos = summary["photos"]
    figures = " · ".join(f"{label} **{metrics[key]:.4f}**" for key, label in [
        ("test/top1", "test top-1"), ("test/top3", "top-3"), ("test/chapter_top1", "chapter top-1"),
        ("curves/top1_val", "validation top-1")] if metrics.get(key) is not None)
    head = f"{cfg.model.head.hidden}-unit hidden layer" if cfg.model.head.hidden else "linear head"
    mlflow.set_tag("mlflow.note.content", (
        f"**{cfg.model.name}** (unfreeze {cfg.model.unfreeze}, {head}), {cfg.optimizer._target_.split('.')[-1]} "
        f"lr {cfg.optimizer.lr:g}, {cfg.trainer.max_epochs} epochs, on dataset **{summary['name']}** "
        f"({summary['classes']} classes; photos train/val/test {photos['train']}/{photos['val']}/{photos['test']}; "
        f"split {summary['protocol']}).\n\n{figures}"))


def log_curves(run_id: str) -> None:
    """Loss and accuracy per epoch (the study's figure 1) as a PNG, from the run's own metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = MlflowClient()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, keys) in zip(axes, [("loss", ["curves/loss_train", "curves/loss_val"]),
                                        ("top-1 accuracy", ["curves/top1_train", "curves/top1_val"])]):
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


FULL_MATRIX_MAX = 60    # classes up to which the full code x code matrix is drawn (and stored dense)
TOP_PAIRS = 30          # confused pairs drawn
MATRIX_MAX = 40         # rows/columns of a heading or per-chapter matrix


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix_figure(m, labels: list[str], title: str, artifact: str, xlabel: str = "predicted HS code",
                   ylabel: str = "decided HS code") -> None:
    """A row-normalised heatmap with counts in the cells (when small enough to read); size bounded."""
    import numpy as np

    plt = _plt()
    m = np.asarray(m)
    n = len(labels)
    size = min(30.0, max(5.0, 0.32 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    rows = m.sum(1, keepdims=True)
    im = ax.imshow(np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0), cmap="Blues",
                   vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7 if n > 15 else 9)
    ax.set_yticks(range(n), labels, fontsize=7 if n > 15 else 9)
    if n <= 45:
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6 if n > 15 else 9,
                    color="white" if m[i, j] > 0.5 * max(rows[i, 0], 1) else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the row")
    fig.tight_layout()
    mlflow.log_figure(fig, artifact)
    plt.close(fig)


def _grouped(pairs, classes: list[str], key, keep: list[str] | None = None):
    """Sum sparse (decided, predicted, count) pairs into a dense matrix over key(code) groups (only `keep`)."""
    import numpy as np

    groups = keep if keep is not None else sorted({key(c) for c in classes})
    pos = {g: i for i, g in enumerate(groups)}
    m = np.zeros((len(groups), len(groups)), dtype=np.int64)
    for t, p, c in pairs:
        a, b = pos.get(key(classes[t])), pos.get(key(classes[p]))
        if a is not None and b is not None:
            m[a, b] += c
    return groups, m


def log_confusion(pairs, classes: list[str], title: str = "test confusion matrix") -> None:
    """The test confusion as data (`plots/confusion_pairs.json`, sparse) and, up to FULL_MATRIX_MAX classes, the
    study's full matrix (`plots/confusion_matrix.png/.json`). Bounded views at any size: `top_confused_pairs`,
    `log_chapter_confusion`, `log_heading_confusion`."""
    mlflow.log_dict({"classes": classes, "pairs": [list(p) for p in pairs]}, "plots/confusion_pairs.json")
    if len(classes) > FULL_MATRIX_MAX:
        return
    _, m = _grouped(pairs, classes, lambda c: c, classes)
    _matrix_figure(m, classes, title, "plots/confusion_matrix.png")
    mlflow.log_dict({"classes": classes, "matrix": m.tolist()}, "plots/confusion_matrix.json")


def signature():
    """What the served model takes: one row per photo (hsflow/serving/pyfunc.py), `image` as bytes (base64 in
    JSON: MLflow's scoring server decodes a binary column of `dataframe_split`/`dataframe_records`). The output
    schema is the `result: json` mode's one string column, so `mlflow.pyfunc.spark_udf` infers its result type
    from it (without one its default, double, silently drops every answer); `records` (REST) returns the dicts."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False),
                       ColSpec("string", "name", required=False), ColSpec("string", "item", required=False),
                       ColSpec("string", "members", required=False)]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec("top_k", "long", 5), ParamSpec("precedents", "long", -1),
                            ParamSpec("result", "string", "records"), ParamSpec("group_key", "string", "item")]))


def input_example(model):
    """One small real photo as bytes: a training photo's thumbnail from the precedent index (a few KB)."""
    import io

    import pandas as pd
    from PIL import Image

    index = model.precedents
    data = index.thumbnail(index.photo_file[0]) if index is not None and len(index) else None
    if data is None:  # a model saved without precedents: a plain grey JPEG
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "JPEG")
        data = buf.getvalue()
    return pd.DataFrame({"image": [data], "name": ["example.jpg"]})


def top_confused_pairs(pairs, classes: list[str], k: int = TOP_PAIRS) -> list[dict]:
    off = sorted((p for p in pairs if p[0] != p[1]), key=lambda p: (-p[2], p[0], p[1]))[:k]
    return [{"decided": classes[t], "predicted": classes[p], "photos": c} for t, p, c in off]


def log_confused_pairs(pairs, classes: list[str], title: str) -> None:
    """The most frequent mistakes (decided -> predicted) as a bar chart and JSON."""
    top = top_confused_pairs(pairs, classes)
    mlflow.log_dict({"top_confused_pairs": top}, "plots/confused_pairs.json")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.3 * max(len(top), 3) + 1.5))
    labels = [f"{d['decided']} -> {d['predicted']}" for d in top][::-1]
    ax.barh(range(len(top)), [d["photos"] for d in top][::-1])
    ax.set_yticks(range(len(top)), labels, fontsize=8)
    ax.set_xlabel("test photos")
    ax.set_title(f"{title}: most confused pairs (decided -> predicted)" if top else f"{title}: no mistakes")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/confused_pairs.png")
    plt.close(fig)


def log_chapter_confusion(pairs, classes: list[str], title: str) -> None:
    """Chapter x chapter (at most 99 x 99, whatever the class count)."""
    groups, m = _grouped(pairs, classes, lambda c: c[:2])
    _matrix_figure(m, groups, f"{title}: chapters", "plots/confusion_chapters.png", "predicted chapter",
                   "decided chapter")


def log_heading_confusion(pairs, classes: list[str], title: str) -> None:
    """Heading x heading over the MATRIX_MAX headings with the most test mistakes (as decided or predicted)."""
    import collections

    errors = collections.Counter()
    for t, p, c in pairs:
        if classes[t][:4] != classes[p][:4]:
            errors[classes[t][:4]] += c
            errors[classes[p][:4]] += c
    keep = sorted(h for h, _ in errors.most_common(MATRIX_MAX)) or sorted({c[:4] for c in classes})[:MATRIX_MAX]
    groups, m = _grouped(pairs, classes, lambda c: c[:4], keep)
    _matrix_figure(m, groups, f"{title}: the {len(groups)} headings with most mistakes",
                   "plots/confusion_headings.png", "predicted heading", "decided heading")


def guarded(what: str, fn, *args, **kwargs) -> str | None:
    """Run one optional logging step; on any failure (MemoryError included) print one line and return it, so a
    plot or an artifact never loses a trained run."""
    try:
        fn(*args, **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 - whatever broke, the run and its model are already logged
        line = f"warning: {what} not logged ({type(exc).__name__}: {str(exc)[:200]}); the run and its model are kept"
        print(line, file=sys.stderr, flush=True)
        return line


def log_model(model, cfg: DictConfig) -> str:
    """The model as an MLflow pyfunc (model from code, every file HSModel.save writes inside, hsflow's own code as
    its code_paths, its pip requirements, a signature and an input example); returns its URI runs:/<id>/model."""
    from hsflow.serving import pyfunc

    # MLflow checks the input example by loading the logged model: without progress bars.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        files = model.save(Path(tmp))
        mlflow.pyfunc.log_model(name="model", python_model=pyfunc.__file__,
                                artifacts={p.name: str(p) for p in files},
                                signature=signature(), input_example=input_example(model),
                                pip_requirements=pip_requirements(with_torch=not any(p.suffix == ".onnx"
                                                                                      for p in files)),
                                code_paths=[str(PACKAGE_DIR)],
                                model_config=pyfunc.MODEL_CONFIG,
                                registered_model_name=cfg.logger.get("registered_model_name") or None)
    return f"runs:/{mlflow.active_run().info.run_id}/model"
