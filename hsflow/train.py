"""`python -m hsflow.train [overrides]`: build the dataset variant, train, test, calibrate, log to MLflow.

The last line printed is `run_id=<mlflow run id> test_top1=<accuracy>`.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach for the internet

import hydra  # noqa: E402
import mlflow  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import MLFlowLogger  # noqa: E402

from hsflow import calibration, tracking, unknown  # noqa: E402
from hsflow.config import CONF_DIR  # noqa: E402
from hsflow.data.builder import SPLITS, build_dataset, spec_summary  # noqa: E402
from hsflow.data.datamodule import HSDataModule  # noqa: E402
from hsflow.data.transforms import Augmenter, Mirror, build_preprocess, preprocess_spec, spec_id  # noqa: E402
from hsflow.features import FeatureCache, PhotoDataset, default_workers, extract  # noqa: E402
from hsflow.models.backbones import WeightsMissing, build_backbone, split_backbone  # noqa: E402
from hsflow.models.classifier import HSClassifier, build_head  # noqa: E402
from hsflow.models.package import HSModel, assemble  # noqa: E402
from hsflow.store import StoreError  # noqa: E402

log = logging.getLogger("hsflow.train")


def _device(cfg: DictConfig) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"


def _with_mirror(samples):
    """The same samples as their mirror images (view -1), for test-time augmentation."""
    from dataclasses import replace

    return [replace(s, view=-1) for s in samples]


def prepare(cfg: DictConfig):
    """Dataset, split backbone, DataModule and LightningModule for a config (no MLflow yet)."""
    if cfg.features not in ("cached", "naive"):
        raise ValueError(f"features={cfg.features!r}: choose cached or naive")
    device = _device(cfg)
    workers = default_workers(device) if cfg.num_workers is None else cfg.num_workers  # decided once, for every loader
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers={cfg.num_workers!r}: give 0 or more decoding processes, or null for automatic")
    spec = build_dataset(cfg.dataset, cfg.paths.raw_store, cache_dir=cfg.paths.cache_dir)
    if not spec.split("train") or not spec.split("test"):
        raise ValueError(f"dataset {spec.name}: empty train or test split ({spec_summary(spec)['photos']})")
    pre = preprocess_spec(cfg.model)
    preprocess = build_preprocess(pre)
    bb = build_backbone(cfg.model.name, cfg.model.pretrained, cfg.model.allow_download)
    net = split_backbone(bb, cfg.model.unfreeze, spec_id(pre))
    augmenter = (Augmenter(cfg.dataset.augment, Path(cfg.paths.cache_dir) / "generated")
                 if any(s.view > 0 for s in spec.samples) else None)
    labels = {sp: torch.tensor([s.label for s in spec.split(sp)], dtype=torch.long) for sp in SPLITS}
    common = dict(batch_size=int(cfg.batch_size), seed=int(cfg.seed))

    if cfg.features == "cached":
        cache = FeatureCache(cfg.paths.cache_dir, net.cache_id)
        feats = {}
        for sp in SPLITS:
            feats[sp] = extract(spec.split(sp), net.prefix, preprocess, cache, augmenter=augmenter,
                                batch_size=int(cfg.batch_size), num_workers=workers, device=device,
                                draft_size=pre["resize"], desc=f"{cfg.model.name} features {sp}")
            if cfg.tta and sp != "train":
                mirrored = extract(_with_mirror(spec.split(sp)), net.prefix, preprocess, cache,
                                   augmenter=Mirror(), batch_size=int(cfg.batch_size), num_workers=workers,
                                   device=device, draft_size=pre["resize"], desc=f"mirror {sp}")
                feats[sp] = torch.stack([feats[sp], mirrored], dim=1)
        dm = HSDataModule.from_features(feats, labels, **common)
        prefix = None
    else:
        dm = HSDataModule({sp: PhotoDataset(spec.split(sp), preprocess, augmenter, pre["resize"],
                                            tta=bool(cfg.tta) and sp != "train") for sp in SPLITS},
                          num_workers=workers, **common)
        prefix = net.prefix
    # Re-seed: feature extraction draws from the global RNG only when the cache is cold, so without this the head's
    # init and the dropout stream would depend on what was cached (cached vs naive, warm vs cold runs).
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    head = build_head(net.dim, len(spec.classes), cfg.model.head.hidden, cfg.model.head.dropout)
    module = HSClassifier(net.suffix, head, len(spec.classes), instantiate(cfg.optimizer),
                          backbone_lr_scale=cfg.model.backbone_lr_scale, label_smoothing=cfg.label_smoothing,
                          scheduler=cfg.scheduler, prefix=prefix,
                          input_dim=1 if prefix is None and str(cfg.model.unfreeze) == "0" else 3)
    return spec, net, pre, dm, module


@torch.no_grad()
def split_logits(module: HSClassifier, dm: HSDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    outs, ys = [], []
    loader = {"val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    for x, y in loader:
        outs.append(module(x.to(module.device)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def resume_checkpoint(run_id: str) -> str:
    """The last checkpoint of an interrupted run, or a one-line error saying why there is none."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ValueError(f"resume={run_id}: no such MLflow run in {mlflow.get_tracking_uri()}") from None
    folder = run.data.tags.get("hsflow.checkpoint_dir")
    last = Path(folder or ".") / "last.ckpt"
    if not folder or not last.is_file():
        raise ValueError(f"resume={run_id}: no checkpoint at {last}; start a new run instead")
    return str(last)


def hierarchy_top1(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], digits: int) -> float:
    """Top-1 at a coarser level of the nomenclature: the predicted code's first `digits` digits are right."""
    level = [c[:digits] for c in classes]
    pred = logits.argmax(1).tolist()
    return sum(level[p] == level[t] for p, t in zip(pred, labels.tolist())) / max(1, len(pred))


def run(cfg: DictConfig) -> dict:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    started = time.perf_counter()
    exp_id = tracking.experiment_id(cfg)
    # A resume without a checkpoint fails here, before minutes of dataset building and feature extraction.
    ckpt_path = resume_checkpoint(str(cfg.resume)) if cfg.get("resume") else None
    spec, net, pre, dm, module = prepare(cfg)
    prepared = time.perf_counter()
    summary = spec_summary(spec)
    log.info("dataset %s: %s", spec.name, summary)
    with mlflow.start_run(run_id=cfg.get("resume") or None, experiment_id=None if cfg.get("resume") else exp_id,
                          run_name=None if cfg.get("resume") else cfg.logger.get("run_name")) as active:
        run_id = active.info.run_id
        ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
        if ckpt_path is None:
            tracking.log_start(cfg, spec, summary)
            mlflow.set_tag("hsflow.checkpoint_dir", str(ckpt_dir.resolve()))
        else:
            ckpt_dir = Path(ckpt_path).parent
            log.info("resuming run %s from %s", run_id, ckpt_path)
        logger = MLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=cfg.logger.tracking_uri,
                              run_id=run_id)
        # Every epoch replaces the one checkpoint (last.ckpt links to it): a kill loses at most the epoch in flight.
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last="link", save_top_k=1, every_n_epochs=1)
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=[checkpoint])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        fitted = time.perf_counter()
        # Read before testing: trainer.test() clears callback_metrics, and sweepers optimize this value.
        val = trainer.callback_metrics.get("val_top1")
        val = float(val) if val is not None else float("nan")
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        test_logits = torch.cat(module.test_logits)
        test_y = torch.tensor([s.label for s in spec.split("test")])
        test["test_chapter_top1"] = hierarchy_top1(test_logits, test_y, spec.classes, 2)
        test["test_heading_top1"] = hierarchy_top1(test_logits, test_y, spec.classes, 4)
        mlflow.log_metrics({"test_chapter_top1": test["test_chapter_top1"],
                            "test_heading_top1": test["test_heading_top1"],
                            "prepare_minutes": (prepared - started) / 60, "fit_minutes": (fitted - prepared) / 60})

        # Calibration on validation: temperature, ECE before/after, review threshold for the target precision.
        meta_cal = {"temperature": 1.0, "review_threshold": 0.0}
        if cfg.calibration.enabled:
            val_logits, val_y = split_logits(module, dm, "val")
            t = calibration.fit_temperature(val_logits, val_y)
            probs = torch.softmax(val_logits / t, 1)
            meta_cal = {"temperature": t, "review_threshold": calibration.review_threshold(
                probs, val_y, float(cfg.calibration.target_precision))}
            mlflow.log_metrics({"val_ece_before": calibration.ece(torch.softmax(val_logits, 1), val_y),
                                "val_ece_after": calibration.ece(probs, val_y), "temperature": t,
                                "review_threshold": meta_cal["review_threshold"]})

        # The unknown score: training embeddings as the bank, its threshold fitted on validation (hsflow.unknown).
        scorer = None
        if cfg.unknown.enabled:
            scorer, rates, heldout = unknown.fit_run(cfg, module, dm, spec, net, pre, _device(cfg))
            mlflow.log_metrics(rates)
            if heldout:
                mlflow.log_dict(heldout, "unknown/heldout_codes.json")

        tracking.log_curves(run_id)
        tracking.log_confusion(module.confusion.compute().cpu().numpy(), spec.classes,
                               f"{cfg.model.name} on {spec.name}: test top-1 {test['test_top1']:.3f}")
        if cfg.logger.log_model:
            full = assemble(net.prefix, module.suffix, module.head).cpu().eval()
            meta = {"backbone": cfg.model.name, "unfreeze": cfg.model.unfreeze,
                    "head": {"hidden": int(cfg.model.head.hidden), "dropout": float(cfg.model.head.dropout)},
                    "classes": spec.classes, "preprocess": pre, "tta": bool(cfg.tta), **meta_cal,
                    "run_id": run_id, "dataset": spec.name, "dataset_fingerprint": summary["fingerprint"],
                    "test_top1": float(test["test_top1"])}
            tracking.log_model(HSModel(full, meta, scorer), cfg)
        mlflow.log_metric("total_minutes", (time.perf_counter() - started) / 60)
    return {"run_id": run_id, **{k: float(v) for k, v in test.items()}, "val_top1": val}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        result = run(cfg)
    except (WeightsMissing, StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ValueError as exc:  # a wrong config value: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"run_id={result['run_id']} test_top1={result['test_top1']:.4f}", flush=True)
    return result["val_top1"]  # what sweepers (optuna) optimize: validation, never test


if __name__ == "__main__":
    # Call the importable copy of main: launchers that pickle the task (joblib, submitit) must find it by
    # reference as hsflow.train.main, not by value from __main__.
    from hsflow.train import main as importable_main

    importable_main()
