"""`python -m hsflow.train [overrides]`: build the dataset variant, train, test, calibrate, log to MLflow.

The last line printed is `run_id=<mlflow run id> test_top1=<accuracy>`.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach for the internet

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from hsflow.config import CONF_DIR  # noqa: E402
from hsflow.data.builder import SPLITS, build_dataset, selected_photos, spec_summary  # noqa: E402
from hsflow.store import RawStore, StoreError  # noqa: E402


def _import_training_stack() -> None:
    """torch, Lightning and MLflow take 5-10 s to import on a small CPU: they load here, after the config's cheap
    checks (main), so a dataset that selects nothing fails in about a second. Binds the module's globals."""
    global mlflow, pl, torch, instantiate, ModelCheckpoint, MLFlowLogger, calibration, tracking, HSDataModule
    global Augmenter, Mirror, build_preprocess, preprocess_spec, spec_id, FeatureCache, PhotoDataset, default_workers
    global extract, WeightsMissing, build_backbone, split_backbone, HSClassifier, head_from_spec, head_spec, HSModel
    global assemble
    global evaluation, precedents, metrics, unknown, ConcatDataset, TensorDataset, EpochTimer, StageClock
    import mlflow
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from torch.utils.data import ConcatDataset, TensorDataset

    from hsflow import calibration, evaluation, metrics, precedents, tracking, unknown
    from hsflow.timing import EpochTimer, StageClock
    from hsflow.data.datamodule import HSDataModule
    from hsflow.data.transforms import Augmenter, Mirror, build_preprocess, preprocess_spec, spec_id
    from hsflow.features import FeatureCache, PhotoDataset, default_workers, extract
    from hsflow.models.backbones import WeightsMissing, build_backbone, split_backbone
    from hsflow.models.classifier import HSClassifier, head_from_spec, head_spec
    from hsflow.models.package import HSModel, assemble


log = logging.getLogger("hsflow.train")


def _device(cfg: DictConfig) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"


def _with_mirror(samples):
    """The same samples as their mirror images (view -1), for test-time augmentation."""
    from dataclasses import replace

    return [replace(s, view=-1) for s in samples]


def make_module(cfg: DictConfig, net, num_classes: int, prefix, suffix=None) -> HSClassifier:
    """A fresh LightningModule (new head, seeded) over the split backbone: the same call for the model chosen on
    validation and for its refit on train + validation (which passes a fresh copy of the trainable stages)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    head = head_from_spec(net.dim, num_classes, cfg.model.head)
    ft = cfg.get("finetune") or {}
    return HSClassifier(net.suffix if suffix is None else suffix, head, num_classes, instantiate(cfg.optimizer),
                        backbone_lr_scale=cfg.model.backbone_lr_scale, label_smoothing=cfg.label_smoothing,
                        scheduler=cfg.scheduler, prefix=prefix,
                        input_dim=1 if prefix is None and str(cfg.model.unfreeze) == "0" else 3,
                        bn=ft.get("bn", "train"), warmup_epochs=ft.get("warmup_epochs", 0),
                        train_crop=ft.get("train_crop"), supcon_weight=ft.get("supcon_weight", 0.0))


def prepare(cfg: DictConfig, clock=None):
    """Dataset, split backbone, DataModule and LightningModule for a config (no MLflow yet)."""
    _import_training_stack()
    if cfg.features not in ("cached", "naive"):
        raise ValueError(f"features={cfg.features!r}: choose cached or naive")
    device = _device(cfg)
    workers = default_workers(device) if cfg.num_workers is None else cfg.num_workers  # decided once, for every loader
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers={cfg.num_workers!r}: give 0 or more decoding processes, or null for automatic")
    clock = clock or StageClock()
    spec = build_dataset(cfg.dataset, cfg.paths.raw_store, cache_dir=cfg.paths.cache_dir)
    clock.mark("dataset")
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
    weight = int(cfg.refit.val_weight)
    if weight < 1:
        raise ValueError(f"refit.val_weight={cfg.refit.val_weight!r}: give 1 or more (times a validation photo counts)")

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
        # Refit data: validation joins training as plain views (its mirrored TTA copy is a test-time device only).
        val_plain = feats["val"][:, 0] if cfg.tta else feats["val"]
        dm.refit_train = ConcatDataset([dm.splits["train"]] + [TensorDataset(val_plain, labels["val"])] * weight)
        prefix = None
        clock.mark("features")
    else:
        dm = HSDataModule({sp: PhotoDataset(spec.split(sp), preprocess, augmenter, pre["resize"],
                                            tta=bool(cfg.tta) and sp != "train") for sp in SPLITS},
                          num_workers=workers, **common)
        val_photos = PhotoDataset(spec.split("val"), preprocess, augmenter, pre["resize"])
        dm.refit_train = ConcatDataset([dm.splits["train"]] + [val_photos] * weight)
        prefix = net.prefix
    # make_module re-seeds: feature extraction draws from the global RNG only when the cache is cold, so without it
    # the head's init and the dropout stream would depend on what was cached (cached vs naive, warm vs cold runs).
    module = make_module(cfg, net, len(spec.classes), prefix)
    return spec, net, pre, dm, module


def refit(cfg: DictConfig, spec, net, dm: HSDataModule, prefix, suffix_init: dict) -> HSClassifier:
    """The final model: the same configuration trained again, from the same seed and for the same epochs, on training
    + validation rulings, after every choice was made on validation. The test period stays untouched; the refit's
    own curves are not logged (there is no held-out period left to draw them on)."""
    suffix = copy.deepcopy(net.suffix)
    suffix.load_state_dict(suffix_init)  # unfrozen stages start again from ImageNet, as the first fit did
    module = make_module(cfg, net, len(spec.classes), prefix, suffix)
    data = HSDataModule({"train": dm.refit_train, "val": dm.splits["val"], "test": dm.splits["test"]},
                        batch_size=dm.batch_size, num_workers=dm.num_workers, seed=dm.seed)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                      limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    return module


def split_logits(module: HSClassifier, dm: HSDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    outs, ys = [], []
    loader = {"val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    with torch.no_grad():
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


def precedent_index(cfg: DictConfig, spec, net, pre, dm, full) -> tuple[precedents.PrecedentIndex, float]:
    """The training photos' embeddings and rulings for the model folder, and how often the nearest training
    photo's code is the true code of a test photo (test/precedent_top1)."""
    common = dict(prefix=net.prefix, preprocess=build_preprocess(pre), draft_size=pre["resize"])
    known = ("train", "val") if cfg.refit.enabled else ("train",)  # every ruling the final model learned from
    parts = [precedents.split_embeddings(sp, spec, dm, full[1], **common) for sp in known]
    train, train_emb = [s for samples, _ in parts for s in samples], torch.cat([e for _, e in parts])
    index = precedents.build(train, train_emb, spec.classes, cfg.paths.raw_store, k=int(cfg.precedents.k))
    test, test_emb = precedents.split_embeddings("test", spec, dm, full[1], **common)
    hits = [p == spec.classes[s.label] for p, s in zip(index.nearest_label(test_emb), test)]
    return index, sum(hits) / max(1, len(hits))


def fit_threads(cfg: DictConfig, default: int) -> int:
    """CPU threads for the fit. On cached features the head's matrices are small: a second thread synchronises
    more than it computes, and on a busy 2-core machine spins idle (head epoch at 42 codes: 0.5 s with one thread,
    4 s with two, measured beside other jobs). `fit_threads: null` means one thread there, torch's default else."""
    if cfg.get("fit_threads"):
        return int(cfg.fit_threads)
    head_only = cfg.features == "cached" and str(cfg.model.unfreeze) == "0" and _device(cfg) == "cpu"
    return 1 if head_only else default


def labels_of(spec, split: str) -> torch.Tensor:
    return torch.tensor([s.label for s in spec.split(split)], dtype=torch.long)


def run(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    _import_training_stack()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    clock = StageClock()
    exp_id = tracking.experiment_id(cfg)
    # A resume without a checkpoint fails here, before minutes of dataset building and feature extraction.
    ckpt_path = resume_checkpoint(str(cfg.resume)) if cfg.get("resume") else None
    spec, net, pre, dm, module = prepare(cfg, clock)
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
        epochs = EpochTimer()
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=[checkpoint, epochs])
        suffix_init = copy.deepcopy(module.suffix.state_dict())  # for the refit (trainable stages only)
        threads = torch.get_num_threads()
        torch.set_num_threads(fit_threads(cfg, threads))
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        finally:
            torch.set_num_threads(threads)
        fitted = time.perf_counter()
        clock.mark("fit", epochs=len(epochs.seconds), epoch_seconds=epochs.seconds,
                   epoch_cpu_seconds=epochs.cpu_seconds, train_photos=len(dm.splits["train"]))
        # Read before testing: trainer.test() clears callback_metrics, and sweepers optimize this value.
        val = trainer.callback_metrics.get("curves/top1_val")
        val = float(val) if val is not None else float("nan")

        # Every choice is made on the validation period with the model fitted on training rulings only: the
        # temperature, ECE before/after, and the review threshold for the target precision.
        meta_cal = {"temperature": 1.0, "review_threshold": 0.0}
        if cfg.calibration.enabled:
            val_logits, val_y = split_logits(module, dm, "val")
            t = calibration.fit_temperature(val_logits, val_y)
            probs = torch.softmax(val_logits / t, 1)
            meta_cal = {"temperature": t, "review_threshold": calibration.fit_review_threshold(
                probs, val_y, cfg.calibration, [s.rrdc_no for s in spec.split("val")])}
            mlflow.log_metrics({"val/ece_before": calibration.ece(torch.softmax(val_logits, 1), val_y),
                                "val/ece_after": calibration.ece(probs, val_y), "val/temperature": t,
                                "val/review_threshold": meta_cal["review_threshold"]})
        clock.mark("calibrate")
        if cfg.refit.enabled:  # then the final model learns from the validation rulings too (choices stay as made)
            torch.set_num_threads(fit_threads(cfg, threads))
            try:
                module = refit(cfg, spec, net, dm, module.prefix, suffix_init)
            finally:
                torch.set_num_threads(threads)
            mlflow.log_metric("refit_minutes", (time.perf_counter() - fitted) / 60)
            clock.mark("refit")

        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        test_topk, test_y = module.test_metrics.gathered()
        test_pred = test_topk[:, 0]
        figures = evaluation.period_figures(torch.cat(module.test_logits), test_y,
                                            [s.rrdc_no for s in spec.split("test")], spec.classes,
                                            meta_cal["temperature"], meta_cal["review_threshold"])
        # Accuracy by frequency band: classes grouped by their training photos (head / body / tail).
        train_counts = torch.bincount(labels_of(spec, "train"), minlength=len(spec.classes)).tolist()
        bands = cfg.get("frequency_bands") or {"head_from": 100, "tail_below": 10}
        band = metrics.band_of(train_counts, int(bands["head_from"]), int(bands["tail_below"]))
        figures |= {f"test/{k}": v for k, v in metrics.band_top1(test_topk, test_y, band).items()}
        test |= figures
        mlflow.log_metrics({k: v for k, v in figures.items() if k not in ("test/top1", "test/top3")}
                           | {"prepare_minutes": (prepared - started) / 60, "fit_minutes": (fitted - prepared) / 60})
        log.info("test (%s): top-1 %s, top-3 %s, unflagged %.2f of photos at precision %s", spec.protocol,
                 evaluation.interval_text(figures, "test/top1"), evaluation.interval_text(figures, "test/top3"),
                 figures["test/unflagged_coverage"], evaluation.interval_text(figures, "test/unflagged_precision"))
        clock.mark("test")

        # The unknown score: training embeddings as the bank, its threshold fitted on validation (hsflow.unknown).
        scorer = None
        if cfg.unknown.enabled:
            scorer, rates, heldout = unknown.fit_run(cfg, module, dm, spec, net, pre, _device(cfg))
            mlflow.log_metrics(rates)
            if heldout:
                mlflow.log_dict(heldout, "unknown/heldout_codes.json")
            clock.mark("unknown")

        # The model first: what follows (plots, tables) may fail at some scale, and must not lose a trained run.
        if cfg.logger.log_model:
            full = assemble(net.prefix, module.suffix, module.head).cpu().eval()
            meta = {"backbone": cfg.model.name, "unfreeze": cfg.model.unfreeze,
                    "head": head_spec(cfg.model.head),
                    "classes": spec.classes, "preprocess": pre, "tta": bool(cfg.tta), **meta_cal,
                    "run_id": run_id, "dataset": spec.name, "dataset_fingerprint": summary["fingerprint"],
                    "split_protocol": spec.protocol, "refit": bool(cfg.refit.enabled),
                    "refit_val_weight": int(cfg.refit.val_weight), "test_top1": float(test["test/top1"])}
            index, test["test/precedent_top1"] = precedent_index(cfg, spec, net, pre, dm, full)
            mlflow.log_metric("test/precedent_top1", test["test/precedent_top1"])
            tracking.log_model(HSModel(full, meta, precedents=index, unknown=scorer), cfg)
        clock.mark("log_model")
        pairs = metrics.confusion_pairs(test_pred, test_y)
        title = f"{cfg.model.name} on {spec.name}: test top-1 {test['test/top1']:.3f}"
        failed = [f for f in (tracking.guarded("plots/curves.png", tracking.log_curves, run_id),
                              tracking.guarded("the confusion matrix", tracking.log_confusion, pairs, spec.classes,
                                               title),
                              tracking.guarded("plots/confused_pairs.png", tracking.log_confused_pairs, pairs,
                                               spec.classes, title),
                              tracking.guarded("plots/confusion_chapters.png", tracking.log_chapter_confusion,
                                               pairs, spec.classes, title),
                              tracking.guarded("plots/confusion_headings.png", tracking.log_heading_confusion,
                                               pairs, spec.classes, title)) if f]
        clock.mark("plots", failed=len(failed))
        mlflow.log_metric("total_minutes", (time.perf_counter() - started) / 60)
        tracking.guarded("timings.json", mlflow.log_dict, clock.as_dict(), "timings.json")
        tracking.guarded("the run description", tracking.log_note, cfg, summary,
                         {**{k: float(v) for k, v in test.items()}, "curves/top1_val": val})
    if cfg.get("timings_file"):
        clock.write(cfg.timings_file)
    return {"run_id": run_id, **{k.replace("/", "_"): float(v) for k, v in test.items()}, "val_top1": val}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    try:
        # A dataset that selects nothing in this store fails first, in about a second: before torch and MLflow load,
        # before the MLflow store, the weights and any photo decoding (the ruling records alone tell).
        selected_photos(cfg.dataset, RawStore(cfg.paths.raw_store))
        _import_training_stack()
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
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
