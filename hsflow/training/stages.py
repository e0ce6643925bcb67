"""The training run as stages over one RunContext; `hsflow.train.run` lists them in order.

Each stage reads what earlier stages put on the context and adds its own part, so each can be run and tested on
its own on a tiny dataset (tests/test_stages.py). This module loads the heavy stack (torch, Lightning, MLflow) at
import: `hsflow.train` imports it only after the config's cheap checks, so a dataset that selects nothing fails in
about a second.

Under DDP (`trainer=ddp`) every process runs the stages up to and including `fit` (Lightning starts the other
processes inside `fit` by running the same command again); the stages after it (calibration, refit, test, unknown
score, model, plots) run on rank zero alone, on one device, over every photo once. Only rank zero opens an MLflow
run.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from hsflow.models import calibration, metrics, precedents, unknown

from hsflow.training import evaluation, tracking
from hsflow.models.bundle import HSModel
from hsflow.data.builder import SPLITS, DatasetSpec, Sample, build_dataset, spec_summary
from hsflow.data.datamodule import HSDataModule
from hsflow.data.loading import PhotoDataset, default_workers
from hsflow.data.transforms import Augmenter, Mirror, OnlineAugmenter, build_preprocess, preprocess_spec, spec_id
from hsflow.data.features import FeatureCache, extract
from hsflow.models.backbones import SplitNet, backbone_from_config, build_backbone, check_join, net_spec, \
    split_backbone, target_class
from hsflow.models.classifier import VAL_TOP1, HSClassifier, head_from_spec, head_spec
from hsflow.models.network import assemble
from hsflow.core.timing import EpochTimer, StageClock

log = logging.getLogger("hsflow.train")


@dataclass
class RunContext:
    """What the stages share. Filled in stage order; a field is None until its stage has run."""
    cfg: DictConfig
    clock: StageClock = field(default_factory=StageClock)
    started: float = field(default_factory=time.perf_counter)
    rank_zero: bool = True            # False in DDP's other processes: they fit, then leave
    device: str = "cpu"
    workers: int = 0                  # decoding processes, decided once for every loader
    resume_from: str | None = None    # the checkpoint of the run being resumed
    spec: DatasetSpec | None = None
    summary: dict = field(default_factory=dict)
    pre: dict = field(default_factory=dict)  # preprocessing: size, resize, mean, std
    net: SplitNet | None = None
    dm: HSDataModule | None = None
    refit_train: Dataset | None = None       # training + validation rulings, for the refit
    module: HSClassifier | None = None
    suffix_init: dict = field(default_factory=dict)  # the trainable stages as they started (the refit starts there)
    run_id: str | None = None
    world_size: int = 1
    val_top1: float = math.nan
    calibration: dict = field(default_factory=lambda: {"temperature": 1.0, "review_threshold": 0.0})
    figures: dict = field(default_factory=dict)      # test/... figures, logged and returned
    test_topk: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    scorer: unknown.UnknownScorer | None = None
    val_logits: torch.Tensor | None = None           # validation logits of the model before the refit
    unknown_flags: dict = field(default_factory=dict)  # split -> called unknown (numpy bool), originals in order
    scored: dict = field(default_factory=dict)       # split -> every unknown score component (originals in order)
    embeddings: dict = field(default_factory=dict)   # split -> (original samples, embeddings) under the final model
    marks: dict = field(default_factory=dict)        # perf_counter when preparing and fitting ended
    share: tuple[int, int] = (0, 1)                  # (rank, processes) splitting the feature extraction
    extraction: dict = field(default_factory=dict)   # photos this process extracted, of how many, in how many shares

    def checkpoint_dir(self) -> Path:
        """Where each epoch's checkpoint goes: the run's output folder, or the resumed run's own."""
        return Path(self.resume_from).parent if self.resume_from else Path(self.cfg.paths.output_dir) / "checkpoints"

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor([s.label for s in self.spec.split(split)], dtype=torch.long)

    def result(self) -> dict:
        """What `hsflow.train.run` returns: the run id, every test figure (keys with `_` for `/`), val top-1."""
        return {"run_id": self.run_id, **{k.replace("/", "_"): float(v) for k, v in self.figures.items()},
                "val_top1": self.val_top1}


def every_rank(stage):
    """Marks a stage every DDP process runs (the others run on rank zero alone)."""
    stage.every_rank = True
    return stage


def execute(cfg: DictConfig, stages: list) -> dict | None:
    """Run the stages in order over a new context. Returns ctx.result() on rank zero, None in DDP's other processes.
    A failure ends the open MLflow run as FAILED (KILLED on Ctrl-C), as `with mlflow.start_run()` would."""
    ctx = RunContext(cfg)
    try:
        for stage in stages:
            if ctx.rank_zero or getattr(stage, "every_rank", False):
                stage(ctx)
    except BaseException as exc:
        exc.hsflow_run_id = ctx.run_id  # hsflow.train names the run to resume when the tracking server went away
        if ctx.run_id is not None and mlflow.active_run() is not None:
            with suppress(Exception):  # the store may be what failed: the first error is the one to tell
                mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return ctx.result() if ctx.rank_zero else None


# --- before the fit: every process ----------------------------------------------------------------------------------

@every_rank
def setup(ctx: RunContext) -> None:
    """Values checked before any work, the device, decoding workers, the seed, and the checkpoint of a resumed run
    (a resume without one fails here, before minutes of dataset building and feature extraction)."""
    cfg = ctx.cfg
    if cfg.features not in ("cached", "naive"):
        raise ValueError(f"features={cfg.features!r}: choose cached or naive")
    if cfg.unknown.get("normalize", unknown.NORMALIZE) not in ("l2", "none"):  # before minutes of work, not after
        raise ValueError(f"unknown.normalize={cfg.unknown.normalize!r}: choose l2 or none")
    if net_spec(cfg.model):  # a backbone class that does not import fails here, before the dataset is built
        target_class(net_spec(cfg.model))
    if int(cfg.refit.val_weight) < 1:
        raise ValueError(f"refit.val_weight={cfg.refit.val_weight!r}: give 1 or more (times a validation photo counts)")
    ctx.device = device_of(cfg)
    workers = default_workers(ctx.device) if cfg.num_workers is None else cfg.num_workers
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers={cfg.num_workers!r}: give 0 or more decoding processes, or null for automatic")
    ctx.workers = workers
    ctx.rank_zero = rank_zero_only.rank == 0  # from the environment Lightning's DDP launcher gives its processes
    ctx.share = extraction_share()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    mlflow.set_tracking_uri(str(cfg.logger.tracking_uri))
    if cfg.get("resume"):
        ctx.resume_from = resume_checkpoint(str(cfg.resume))


@every_rank
def dataset(ctx: RunContext) -> None:
    """The dataset variant: classes, the split (by date or by ruling), generated copies."""
    spec = build_dataset(ctx.cfg.dataset, ctx.cfg.paths.raw_store, cache_dir=ctx.cfg.paths.cache_dir)
    ctx.clock.mark("dataset")
    if not spec.split("train") or not spec.split("test"):
        raise ValueError(f"dataset {spec.name}: empty train or test split ({spec_summary(spec)['photos']})")
    ctx.spec, ctx.summary = spec, spec_summary(spec)
    log.info("dataset %s: %s", spec.name, ctx.summary)


@every_rank
def network(ctx: RunContext) -> None:
    """The backbone with its ImageNet weights, cut into a frozen prefix and a trainable suffix."""
    ctx.pre = preprocess_spec(ctx.cfg.model)
    model, concat = ctx.cfg.model, list(ctx.cfg.model.get("concat") or [])
    check_join(model.name, concat)  # before any weights load: a torchvision name would try to fetch them first
    bb = backbone_from_config(model)  # `model.net`: its `_target_` class (hsflow.models.backbones)
    joined = [build_backbone(name, model.pretrained, model.allow_download) for name in concat]
    ctx.net = split_backbone(bb, model.unfreeze, spec_id(ctx.pre), joined)


@every_rank
def data(ctx: RunContext) -> None:
    """The DataModule: the frozen prefix's outputs from the feature cache (computed once per photo and generated
    copy), or the photos themselves (`features=naive`: the prefix runs every step); and the refit's training set."""
    labels = {sp: ctx.labels(sp) for sp in SPLITS}
    common = dict(batch_size=int(ctx.cfg.batch_size), seed=int(ctx.cfg.seed))
    weight = int(ctx.cfg.refit.val_weight)
    if ctx.cfg.features == "cached":
        if ctx.cfg.dataset.get("online_augment"):
            raise ValueError("dataset.online_augment=true needs features=naive: cached features are computed once "
                             "per photo (use dataset.train_views=N for generated copies instead)")
        feats = cached_features(ctx)
        ctx.dm = HSDataModule.from_features(feats, labels, **common)
        # Validation joins training as plain views (its mirrored TTA copy is a test-time device only).
        val_plain = feats["val"][:, 0] if ctx.cfg.tta else feats["val"]
        ctx.refit_train = ConcatDataset([ctx.dm.splits["train"]] + [TensorDataset(val_plain, labels["val"])] * weight)
        ctx.clock.mark("features", **ctx.extraction)
        return
    augmenter, resize = augmenter_of(ctx), ctx.pre["resize"]
    preprocess = build_preprocess(ctx.pre)
    online = OnlineAugmenter(ctx.cfg.dataset.augment) if ctx.cfg.dataset.get("online_augment") else None
    ctx.dm = HSDataModule({sp: PhotoDataset(ctx.spec.split(sp), preprocess, augmenter, resize,
                                            tta=bool(ctx.cfg.tta) and sp != "train",
                                            online=online if sp == "train" else None) for sp in SPLITS},
                          num_workers=ctx.workers, **common)
    val_photos = PhotoDataset(ctx.spec.split("val"), preprocess, augmenter, resize)
    ctx.refit_train = ConcatDataset([ctx.dm.splits["train"]] + [val_photos] * weight)


@every_rank
def module(ctx: RunContext) -> None:
    """The LightningModule: a new head (seeded) over the trainable suffix."""
    prefix = None if ctx.cfg.features == "cached" else ctx.net.prefix
    ctx.module = make_module(ctx.cfg, ctx.net, len(ctx.spec.classes), prefix)
    ctx.suffix_init = copy.deepcopy(ctx.module.suffix.state_dict())  # the refit starts the suffix from here
    ctx.marks["prepared"] = time.perf_counter()


def open_run(ctx: RunContext) -> None:
    """The MLflow run (rank zero only): params, tags, resolved config, dataset fingerprint and split."""
    cfg, resume = ctx.cfg, ctx.cfg.get("resume") or None
    exp_id = tracking.experiment_id(cfg)
    active = mlflow.start_run(run_id=resume, experiment_id=None if resume else exp_id,
                              run_name=None if resume else cfg.logger.get("run_name"))
    ctx.run_id = active.info.run_id
    if resume is None:
        tracking.log_start(cfg, ctx.spec, ctx.summary)
        mlflow.set_tag("hsflow.checkpoint_dir", str(ctx.checkpoint_dir().resolve()))
    else:
        log.info("resuming run %s from %s", ctx.run_id, ctx.resume_from)


@every_rank
def fit(ctx: RunContext) -> None:
    """Lightning's fit on the training rulings, validated each epoch on the validation rulings. Under DDP the other
    processes start here and leave after it; rank zero goes on alone, on one device."""
    cfg = ctx.cfg
    # Rank zero alone: under torchrun or srun the other ranks get here at the same moment, and their MLflow client
    # would race rank zero's in creating a new sqlite store (Lightning logs from rank zero only anyway).
    logger = MLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=cfg.logger.tracking_uri,
                          run_id=ctx.run_id) if ctx.rank_zero else False
    # Every epoch replaces the one checkpoint (last.ckpt links to it): a kill loses at most the epoch in flight.
    checkpoint = ModelCheckpoint(dirpath=ctx.checkpoint_dir(), save_last="link", save_top_k=1, every_n_epochs=1)
    epochs = EpochTimer()
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=[checkpoint, epochs])
    with threads(fit_threads(cfg, ctx.device)):
        trainer.fit(ctx.module, datamodule=ctx.dm, ckpt_path=ctx.resume_from)
    ctx.marks["fitted"] = time.perf_counter()
    ctx.clock.mark("fit", epochs=len(epochs.seconds), epoch_seconds=epochs.seconds,
                   epoch_cpu_seconds=epochs.cpu_seconds, train_photos=len(ctx.dm.splits["train"]))
    val = trainer.callback_metrics.get(VAL_TOP1)  # sweepers optimize this value
    ctx.val_top1 = float(val) if val is not None else math.nan
    ctx.world_size, ctx.rank_zero = trainer.world_size, trainer.is_global_zero
    if ctx.world_size > 1:
        leave_process_group(ctx)


# --- after the fit: rank zero, one device ---------------------------------------------------------------------------

def calibrate(ctx: RunContext) -> None:
    """The temperature on the validation period, with the model fitted on training rulings only, and ECE before and
    after; the validation logits are kept: the unknown score and the review threshold are fitted on them (what a
    model that never saw a period answers there), after the refit."""
    cfg = ctx.cfg
    val_logits, val_y = split_logits(ctx.module, ctx.dm, "val")
    ctx.val_logits = val_logits
    if cfg.calibration.enabled:
        t = calibration.fit_temperature(val_logits, val_y)
        probs = torch.softmax(val_logits / t, 1)
        ctx.calibration["temperature"] = t
        mlflow.log_metrics({"val/ece_before": calibration.ece(torch.softmax(val_logits, 1), val_y),
                            "val/ece_after": calibration.ece(probs, val_y), "val/temperature": t})
    if ctx.module.val_photos is not None:
        mlflow.log_metric("val/photos", ctx.module.val_photos)  # every validation photo counted once, DDP too
    ctx.clock.mark("calibrate")


def refit(ctx: RunContext) -> None:
    """The final model: the same configuration trained again, from the same seed and for the same epochs, on
    training + validation rulings, after every choice was made on validation. The test period stays untouched; the
    refit's own curves are not logged (there is no held-out period left to draw them on)."""
    if not ctx.cfg.refit.enabled:
        return
    with threads(fit_threads(ctx.cfg, ctx.device)):
        ctx.module = refit_module(ctx)
    mlflow.log_metric("refit_minutes", (time.perf_counter() - ctx.marks["fitted"]) / 60)
    ctx.clock.mark("refit")


def refit_module(ctx: RunContext) -> HSClassifier:
    """A new module (trainable stages back at their start, a new seeded head) fitted on ctx.refit_train."""
    suffix = copy.deepcopy(ctx.net.suffix)
    suffix.load_state_dict(ctx.suffix_init)  # unfrozen stages start again from ImageNet, as the first fit did
    refitted = make_module(ctx.cfg, ctx.net, len(ctx.spec.classes), ctx.module.prefix, suffix)
    dm = ctx.dm
    data = HSDataModule({"train": ctx.refit_train, "val": dm.splits["val"], "test": dm.splits["test"]},
                        batch_size=dm.batch_size, num_workers=dm.num_workers, seed=dm.seed)
    trainer: pl.Trainer = instantiate(ctx.cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                      limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                                      **one_device(ctx))
    trainer.fit(refitted, datamodule=data)
    return refitted


def test(ctx: RunContext) -> None:
    """The test figures: top-k (micro and macro), loss, top-1 by frequency band, and with 95 % intervals over
    rulings top-1/top-3/chapter/heading and what the review flag lets through (hsflow.training.evaluation)."""
    cfg, spec, mod = ctx.cfg, ctx.spec, ctx.module
    logits, y = split_logits(mod, ctx.dm, "test")
    ctx.test_topk, ctx.test_labels = logits.topk(min(3, logits.shape[1]), dim=1).indices, y
    figures = {f"test/{k}": v for k, v in metrics.summarize(ctx.test_topk, y, len(spec.classes)).items()}
    figures["test/loss"] = float(mod.loss(logits, y))
    figures |= evaluation.period_figures(logits, y, [s.rrdc_no for s in spec.split("test")], spec.classes,
                                         ctx.calibration["temperature"], ctx.calibration["review_threshold"],
                                         unknown=ctx.unknown_flags.get("test"))
    train_counts = torch.bincount(ctx.labels("train"), minlength=len(spec.classes)).tolist()
    bands = cfg.get("frequency_bands") or {"head_from": 100, "tail_below": 10}
    band = metrics.band_of(train_counts, int(bands["head_from"]), int(bands["tail_below"]))
    figures |= {f"test/{k}": v for k, v in metrics.band_top1(ctx.test_topk, y, band).items()}
    ctx.figures = figures
    prepared, fitted = ctx.marks["prepared"], ctx.marks["fitted"]
    mlflow.log_metrics(figures | {"prepare_minutes": (prepared - ctx.started) / 60,
                                  "fit_minutes": (fitted - prepared) / 60})
    log.info("test (%s): top-1 %s, top-3 %s, unflagged %.2f of photos at precision %s", spec.protocol,
             evaluation.interval_text(figures, "test/top1"), evaluation.interval_text(figures, "test/top3"),
             figures["test/unflagged_coverage"], evaluation.interval_text(figures, "test/unflagged_precision"))
    ctx.clock.mark("test")


def unknown_score(ctx: RunContext) -> None:
    """The unknown score (hsflow.models.unknown): each component's validation scores and the threshold from a fit on the
    training originals (msp from the model before the refit: what a new photo meets); the shipped Gaussians and bank
    then also learn the validation photos when the head is refit on them; its rate on validation and test."""
    cfg = ctx.cfg
    if not cfg.unknown.enabled:
        return
    train_samples, train = split_embeddings(ctx, "train")
    val_samples, val = split_embeddings(ctx, "val")
    if not len(val):
        print(f"warning: dataset {ctx.spec.name}: no validation photos, so no unknown threshold can be fitted; the "
              "model is saved without an unknown score", file=sys.stderr, flush=True)
        return
    val_logits = originals(ctx, "val", ctx.val_logits)
    u = cfg.unknown
    scorer = unknown.fit(train.numpy(), [s.label for s in train_samples], val.numpy(), val_logits.numpy(),
                         ctx.calibration["temperature"], str(u.get("method", unknown.DEFAULT_METHOD)),
                         float(u.max_val_rate), int(u.k), int(u.get("pca_dim", unknown.PCA_DIM)),
                         val_labels=[s.label for s in val_samples] if cfg.refit.enabled else None,
                         normalize=str(u.get("normalize", unknown.NORMALIZE)),
                         shrinkage=float(u.get("shrinkage", unknown.SHRINKAGE)))
    _, test_emb = split_embeddings(ctx, "test")
    test_logits = originals(ctx, "test", split_logits(ctx.module, ctx.dm, "test")[0])
    # Validation as the threshold met it (the reference fit, before the refit learned these photos).
    ref = scorer.reference
    ctx.unknown_flags = {"val": scorer.decide(ref["score"]),
                         "test": scorer.decide(scorer.score(test_emb.numpy(), test_logits.numpy()))}
    ctx.scored = {"val": {k: v for k, v in ref.items() if k != "score"},
                  "test": scorer.components(test_emb.numpy(), test_logits.numpy())}
    mlflow.log_metrics({"val/unknown_threshold": scorer.threshold, "val/unknown_rate": scorer.val_rate,
                        "test/unknown_rate": float(ctx.unknown_flags["test"].mean())})
    ctx.scorer = scorer
    ctx.clock.mark("unknown")


def review(ctx: RunContext) -> None:
    """The review threshold, fitted with the unknown threshold already set: on the validation photos the model
    before its refit answers and does not call unknown, for the promised precision (calibration.*: a point estimate
    or a bound with stated confidence)."""
    cfg = ctx.cfg
    if not cfg.calibration.enabled:
        return
    probs = torch.softmax(ctx.val_logits / ctx.calibration["temperature"], 1)
    flags = ctx.unknown_flags.get("val")
    eligible = None if flags is None or len(flags) != len(probs) else ~flags
    ctx.calibration["review_threshold"] = calibration.fit_review_threshold(
        probs, ctx.labels("val"), cfg.calibration, [s.rrdc_no for s in ctx.spec.split("val")], eligible)
    method = ctx.calibration["review_method"] = str(cfg.calibration.get("method", "point"))
    mlflow.log_metric("val/review_threshold", ctx.calibration["review_threshold"])
    if ctx.calibration["review_threshold"] >= calibration.NOTHING:
        bound = "" if method == "point" else f" at {1 - float(cfg.calibration.get('delta', 0.1)):.0%} confidence"
        print(f"warning: the {len(probs)} validation photos cannot vouch for unflagged answers right >= "
              f"{float(cfg.calibration.target_precision)}{bound} (calibration.method={method}): every answer of this "
              "model is flagged needs_review. More later rulings (make refresh) raise what validation can vouch for; "
              "docs/unknown.md", file=sys.stderr, flush=True)
    ctx.clock.mark("review")


def heldout(ctx: RunContext) -> None:
    """With codes held out of every split (dataset.exclude_codes): how the final model answers every photo of
    them — called unknown, answered with neither flag — and how well each unknown score separates them from the
    validation and test photos of trained codes (AUROC, FPR at 95 % TPR), with the trade-off table."""
    samples, photos = unknown.heldout_photos(ctx.cfg)
    if not samples or ctx.scorer is None:
        return
    feats = extract(samples, ctx.net.prefix, build_preprocess(ctx.pre), FeatureCache(ctx.cfg.paths.cache_dir,
                    ctx.net.cache_id), batch_size=int(ctx.cfg.batch_size), device=ctx.device,
                    draft_size=ctx.pre["resize"], desc="held-out codes")
    emb, logits = embed(ctx.module, feats), module_logits(ctx.module, feats)
    scorer, threshold = ctx.scorer, ctx.calibration["review_threshold"]
    flags = scorer.decide(scorer.score(emb.numpy(), logits.numpy()))
    top = torch.softmax(logits / ctx.calibration["temperature"], 1).max(1).values.numpy()
    answered = calibration.unflagged(top, threshold, flags)
    comps = scorer.components(emb.numpy(), logits.numpy())
    figures = {"test/heldout_unknown_rate": float(flags.mean()), "test/heldout_unflagged_rate": float(answered.mean()),
               **{f"test/heldout_{k}": v for k, v in unknown.separation(ctx.scored["test"], comps).items()},
               **{f"val/heldout_{k}": v for k, v in unknown.separation(ctx.scored["val"], comps).items()}}
    ctx.figures |= figures
    mlflow.log_metrics(figures)
    mlflow.log_dict({"threshold": scorer.threshold, "review_threshold": threshold, "photos": len(photos),
                     "per_code": unknown.per_code(photos, flags, answered)}, "unknown/heldout_codes.json")
    mlflow.log_dict(tradeoff(ctx, comps, logits), "unknown/tradeoff.json")
    ctx.clock.mark("heldout")


def package(ctx: RunContext) -> None:
    """The saved model folder (network, classes, preprocessing, calibration, unknown score, precedent index) logged
    as an MLflow model. First among the logging stages: what follows (plots) may fail at some scale, and must not
    lose a trained run."""
    if ctx.cfg.logger.log_model:
        full = assemble(ctx.net.prefix, ctx.module.suffix, ctx.module.head).cpu().eval()
        index, ctx.figures["test/precedent_top1"] = precedent_index(ctx)
        mlflow.log_metric("test/precedent_top1", ctx.figures["test/precedent_top1"])
        tracking.log_model(HSModel(full, model_meta(ctx), precedents=index, unknown=ctx.scorer), ctx.cfg)
    ctx.clock.mark("log_model")


def plots(ctx: RunContext) -> None:
    """Curves and the confusion views; each one guarded (a failed plot is one warning line, the run is kept)."""
    pairs = metrics.confusion_pairs(ctx.test_topk[:, 0], ctx.test_labels)
    classes = ctx.spec.classes
    title = f"{ctx.cfg.model.name} on {ctx.spec.name}: test top-1 {ctx.figures['test/top1']:.3f}"
    failed = [f for f in (
        tracking.guarded("plots/curves.png", tracking.log_curves, ctx.run_id),
        tracking.guarded("the confusion matrix", tracking.log_confusion, pairs, classes, title),
        tracking.guarded("plots/confused_pairs.png", tracking.log_confused_pairs, pairs, classes, title),
        tracking.guarded("plots/confusion_chapters.png", tracking.log_chapter_confusion, pairs, classes, title),
        tracking.guarded("plots/confusion_headings.png", tracking.log_heading_confusion, pairs, classes, title),
    ) if f]
    ctx.clock.mark("plots", failed=len(failed))


def close(ctx: RunContext) -> None:
    """Total time, each stage's time and memory, the run's description; the run ends FINISHED."""
    mlflow.log_metric("total_minutes", (time.perf_counter() - ctx.started) / 60)
    tracking.guarded("timings.json", mlflow.log_dict, ctx.clock.as_dict(), "timings.json")
    tracking.guarded("the run description", tracking.log_note, ctx.cfg, ctx.summary,
                     {**ctx.figures, VAL_TOP1: ctx.val_top1})
    mlflow.end_run()
    if ctx.cfg.get("timings_file"):
        ctx.clock.write(ctx.cfg.timings_file)


# --- helpers ---------------------------------------------------------------------------------------------------------

def device_of(cfg: DictConfig) -> str:
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"


def augmenter_of(ctx: RunContext) -> Augmenter | None:
    if not any(s.view > 0 for s in ctx.spec.samples):
        return None
    return Augmenter(ctx.cfg.dataset.augment, Path(ctx.cfg.paths.cache_dir) / "generated")


def cached_features(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Each split's prefix outputs, aligned with its samples, computing only what the cache lacks; with `tta`,
    validation and test also get their mirror images' (stacked as a second view)."""
    cfg, net = ctx.cfg, ctx.net
    cache, preprocess, augmenter = FeatureCache(cfg.paths.cache_dir, net.cache_id), build_preprocess(ctx.pre), \
        augmenter_of(ctx)
    rank, world = ctx.share
    common = dict(batch_size=int(cfg.batch_size), num_workers=ctx.workers, device=ctx.device,
                  draft_size=ctx.pre["resize"], runtime=str(cfg.get("runtime") or "onnx"), rank=rank, world=world)
    feats = {}
    for sp in SPLITS:
        samples = ctx.spec.split(sp)
        feats[sp] = extract(samples, net.prefix, preprocess, cache, augmenter=augmenter,
                            desc=f"{cfg.model.name} features {sp}", **common)
        if cfg.tta and sp != "train":
            mirrored = extract([replace(s, view=-1) for s in samples], net.prefix, preprocess, cache,
                               augmenter=Mirror(), desc=f"mirror {sp}", **common)
            feats[sp] = torch.stack([feats[sp], mirrored], dim=1)
    ctx.extraction = {"extracted": cache.added, "photos": len(cache.wanted), "shares": world}
    if world > 1:
        log.info("rank %d/%d: extracted %d of %d photos into the shared cache %s", rank, world, cache.added,
                 len(cache.wanted), cache.dir)
    return feats


def extraction_share() -> tuple[int, int]:
    """(rank, processes) for splitting the feature extraction: from torchrun's or Slurm's environment, the ones
    Lightning's DDP reads, so the split agrees with the process group the fit forms. Processes there all start at
    once. Lightning's own launcher (`trainer=ddp` on one machine, no torchrun) starts the others inside the fit,
    after rank zero extracted everything: (0, 1) there, and in one process."""
    for env in (TorchElasticEnvironment, SLURMEnvironment):  # Lightning's order of precedence
        if env.detect():
            found = env()
            return found.global_rank(), found.world_size()
    return 0, 1


def make_module(cfg: DictConfig, net: SplitNet, num_classes: int, prefix, suffix=None) -> HSClassifier:
    """A fresh LightningModule (new head, seeded) over the split backbone: the same call for the model chosen on
    validation and for its refit on train + validation (which passes a fresh copy of the trainable stages).
    Re-seeded: feature extraction draws from the global RNG only when the cache is cold, so without it the head's
    init and the dropout stream would depend on what was cached (cached vs naive, warm vs cold runs)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    head = head_from_spec(net.dim, num_classes, cfg.model.head)
    ft = cfg.get("finetune") or {}
    return HSClassifier(net.suffix if suffix is None else suffix, head, num_classes, instantiate(cfg.optimizer),
                        backbone_lr_scale=cfg.model.backbone_lr_scale, label_smoothing=cfg.label_smoothing,
                        scheduler=cfg.scheduler, prefix=prefix,
                        input_dim=1 if prefix is None and str(cfg.model.unfreeze) == "0" else 3,
                        bn=ft.get("bn", "train"), warmup_epochs=ft.get("warmup_epochs", 0),
                        train_crop=ft.get("train_crop"), supcon_weight=ft.get("supcon_weight", 0.0))


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


def fit_threads(cfg: DictConfig, device: str) -> int:
    """CPU threads for the fit. On cached features the head's matrices are small: a second thread synchronises
    more than it computes, and on a busy 2-core machine spins idle (head epoch at 42 codes: 0.5 s with one thread,
    4 s with two, measured beside other jobs). `fit_threads: null` means one thread there, torch's default else."""
    if cfg.get("fit_threads"):
        return int(cfg.fit_threads)
    head_only = cfg.features == "cached" and str(cfg.model.unfreeze) == "0" and device == "cpu"
    return 1 if head_only else torch.get_num_threads()


@contextmanager
def threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def leave_process_group(ctx: RunContext) -> None:
    """After a DDP fit: every process leaves the process group, so rank zero's later stages (refit, test) run as
    one process on one device, and the others end here (execute skips the rank-zero stages for them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def one_device(ctx: RunContext) -> dict:
    """Trainer overrides for rank zero's refit after a DDP fit: one device, no distributed strategy."""
    return {"devices": 1, "strategy": "auto", "num_nodes": 1} if ctx.world_size > 1 else {}


def split_logits(mod: HSClassifier, dm: HSDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's logits (TTA views averaged by the module) and labels, in split order, on this process alone."""
    mod.eval()
    outs, ys = [], []
    with torch.no_grad():
        for x, y in dm.ordered_dataloader(split):
            outs.append(mod(x.to(mod.device)).float().cpu())
            ys.append(y)
    return (torch.cat(outs), torch.cat(ys)) if outs else (torch.empty(0, mod.num_classes), torch.empty(0).long())


@torch.no_grad()
def embed(mod: HSClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings (what the head reads) of inputs the module takes: cached prefix outputs or photos."""
    mod.eval()
    out = [mod.embed(x[i: i + batch_size].to(mod.device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def split_embeddings(ctx: RunContext, split: str) -> tuple[list[Sample], torch.Tensor]:
    """A split's original photos and their embeddings under the final model (HSModel.embed's values), computed once
    and shared by the unknown score and the precedent index."""
    if split not in ctx.embeddings:
        samples = ctx.spec.split(split)
        keep = [i for i, s in enumerate(samples) if s.view == 0]
        loader = HSDataModule({split: Subset(ctx.dm.splits[split], keep)}, batch_size=int(ctx.cfg.batch_size),
                              num_workers=ctx.workers).ordered_dataloader(split)
        mod = ctx.module.eval()
        with torch.no_grad():
            out = [mod.embed(first_view(mod, x.to(mod.device))).float().cpu() for x, _ in loader]
        ctx.embeddings[split] = ([samples[i] for i in keep], torch.cat(out) if out else torch.empty(0))
    return ctx.embeddings[split]


def originals(ctx: RunContext, split: str, values: torch.Tensor) -> torch.Tensor:
    """Rows of a split-ordered tensor for its original photos only (the rows split_embeddings keeps)."""
    keep = [i for i, s in enumerate(ctx.spec.split(split)) if s.view == 0]
    return values if len(keep) == len(values) else values[keep]


@torch.no_grad()
def module_logits(mod: HSClassifier, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    mod.eval()
    out = [mod(x[i: i + batch_size].to(mod.device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def tradeoff(ctx: RunContext, heldout_scores: dict, heldout_logits: torch.Tensor) -> dict:
    """The two thresholds refitted on validation at several unknown rates and review methods: the coverage and
    precision of unflagged answers on validation and test, and the share of held-out codes' photos answered with
    neither flag (docs/unknown.md's trade-off table)."""
    t, cal, method = ctx.calibration["temperature"], ctx.cfg.calibration, ctx.scorer.method
    probs = {"val": torch.softmax(originals(ctx, "val", ctx.val_logits) / t, 1).numpy(),
             "test": torch.softmax(originals(ctx, "test", split_logits(ctx.module, ctx.dm, "test")[0]) / t, 1).numpy(),
             "heldout": torch.softmax(heldout_logits / t, 1).numpy()}
    labels = {sp: np.array([s.label for s in ctx.spec.split(sp) if s.view == 0]) for sp in ("val", "test")}
    scores = {"val": ctx.scored["val"][method], "test": ctx.scored["test"][method], "heldout": heldout_scores[method]}
    rows = []
    for rate in (0.0, 0.05, 0.10, 0.15, 0.20, 0.30):
        u = unknown.fit_threshold(scores["val"], rate) if rate else float("inf")
        for rm in calibration.REVIEW_METHODS:
            r = calibration.fit_review_threshold(probs["val"], labels["val"], {**cal, "method": rm},
                                                 [s.rrdc_no for s in ctx.spec.split("val")], scores["val"] <= u)
            ok = {sp: calibration.unflagged(p.max(1), r, scores[sp] > u) for sp, p in probs.items()}
            row = {"max_val_rate": rate, "review_method": rm, "unknown_threshold": u, "review_threshold": r,
                   "heldout_unflagged": float(ok["heldout"].mean())}
            for sp in ("val", "test"):
                right = probs[sp].argmax(1) == labels[sp]
                row[f"{sp}_coverage"] = float(ok[sp].mean())
                row[f"{sp}_precision"] = float(right[ok[sp]].mean()) if ok[sp].any() else float("nan")
            rows.append(row)
    return {"method": method, "rows": rows}


def first_view(mod: HSClassifier, x: torch.Tensor) -> torch.Tensor:
    """The photo itself from a (batch, views, ...) TTA input; other inputs as they are."""
    return x[:, 0] if x.dim() == mod.input_dim + 2 else x


def precedent_index(ctx: RunContext) -> tuple[precedents.PrecedentIndex, float]:
    """The precedent index over every ruling the final model learned from (train, + validation when refit), and how
    often the nearest training photo's code is the true code of a test photo (test/precedent_top1)."""
    known = ("train", "val") if ctx.cfg.refit.enabled else ("train",)
    parts = [split_embeddings(ctx, sp) for sp in known]
    samples, emb = [s for part, _ in parts for s in part], torch.cat([e for _, e in parts])
    index = precedents.build(samples, emb, ctx.spec.classes, ctx.cfg.paths.raw_store, k=int(ctx.cfg.precedents.k))
    test, test_emb = split_embeddings(ctx, "test")
    hits = [p == ctx.spec.classes[s.label] for p, s in zip(index.nearest_label(test_emb), test)]
    return index, sum(hits) / max(1, len(hits))


def model_meta(ctx: RunContext) -> dict:
    """meta.json of the saved model: what rebuilds the network and every fact an answer or an audit needs."""
    cfg = ctx.cfg
    net = {"net": net_spec(cfg.model)} if net_spec(cfg.model) else {}  # the class and arguments that rebuild it
    return {"backbone": cfg.model.name, **net, "unfreeze": cfg.model.unfreeze,
            "concat": list(cfg.model.get("concat") or []), "head": head_spec(cfg.model.head),
            "classes": ctx.spec.classes, "preprocess": ctx.pre, "tta": bool(cfg.tta), **ctx.calibration,
            "run_id": ctx.run_id, "dataset": ctx.spec.name, "dataset_fingerprint": ctx.summary["fingerprint"],
            "split_protocol": ctx.spec.protocol, "refit": bool(cfg.refit.enabled),
            "refit_val_weight": int(cfg.refit.val_weight), "test_top1": float(ctx.figures["test/top1"])}
