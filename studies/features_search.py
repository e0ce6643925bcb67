"""What beats make train's default (issue 20)? Candidates on the 2018 validation rulings, each one MLflow run.

    .venv/bin/python studies/features_search.py NAME [NAME ...] [--seeds 42 43 44] [--no-refit] [--heldout]

Every candidate is `experiment=recommended` plus Hydra overrides (CANDIDATES below); `concat` candidates also join
the pooled features of other backbones. For each seed the script fits the model on the training rulings (make
train's stages up to the data, then stages.make_module: the code make train runs), reads its 2018 validation answers,
fits the temperature and the review thresholds there, refits on train + 2018 as make train does, and reads the 2019 test answers of the refit model.
Chosen on validation only: top-1 with a 95 % interval over rulings, and the paired difference to the candidate
`baseline` (same photos, rulings resampled together). 2019 figures are reported, never used to choose.
`--heldout` instead trains with one code per chapter held out (studies/unknown_eval.py's codes) and measures the
unknown score: AUROC and FPR at 95 % TPR of held-out-code photos against 2019 photos of trained codes.
Runs go to the MLflow experiment `features-search` (`--tracking-uri`, default the project's store).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch.utils.data import ConcatDataset, TensorDataset  # noqa: E402

from hsflow.models import calibration  # noqa: E402

from hsflow.training import evaluation, stages
from hsflow.core.config import CONF_DIR, default_tracking_uri  # noqa: E402
from studies import common  # noqa: E402

EXPERIMENT = "features-search"
FT1 = ["model.unfreeze=1", "finetune.bn=frozen", "finetune.warmup_epochs=1", "finetune.train_crop=4"]
CANDIDATES: dict[str, dict] = {
    "baseline": {"overrides": []},                                        # = experiment=recommended (make train)
    "lite1-alone": {"overrides": ["model.concat=[]"]},                    # make train's default before issue 20
    # (2) objectives for product identity on the frozen features
    "cosface": {"overrides": ["model.head.kind=cosface", "model.head.scale=16", "model.head.margin=0.2"]},
    "arcface": {"overrides": ["model.head.kind=arcface", "model.head.scale=16", "model.head.margin=11.5"]},
    "normsoftmax": {"overrides": ["model.head.kind=normsoftmax", "model.head.scale=16"]},
    "supcon": {"overrides": ["finetune.supcon_weight=0.5"]},
    # (3) schedules and other backbones
    "epochs30": {"overrides": ["trainer.max_epochs=30"]},
    "epochs120": {"overrides": ["trainer.max_epochs=120"]},
    "warmup3": {"overrides": ["finetune.warmup_epochs=3"]},
    # Lite1 joined here to other backbones' features at their own preprocessing (Lite0 224 px, Lite2 260 px): the
    # evidence for model.concat, which make train then runs as one prefix on Lite1's 240 px input.
    "concat-lite0": {"overrides": ["model.concat=[]"], "concat": ["efficientnet_lite0"]},
    "concat-lite0-lite2": {"overrides": ["model.concat=[]"], "concat": ["efficientnet_lite0", "efficientnet_lite2"]},
    "join-lite0-lite2": {"overrides": ["model.concat=[efficientnet_lite0,efficientnet_lite2]"]},
    # (1) fine-tuning the last stage on cached feature maps (BN, warm-up, crop, epochs)
    "ft1-e10": {"overrides": [*FT1, "trainer.max_epochs=10"]},
    "ft1-e10-bntrain": {"overrides": [*FT1, "trainer.max_epochs=10", "finetune.bn=train"]},
    "ft1-e10-nocrop": {"overrides": [*FT1, "trainer.max_epochs=10", "finetune.train_crop=null"]},
    "ft1-e10-lr1": {"overrides": [*FT1, "trainer.max_epochs=10", "model.backbone_lr_scale=1.0"]},
    "ft1-e20": {"overrides": [*FT1, "trainer.max_epochs=20"]},
    "ft1-e15-full": {"overrides": [*FT1, "trainer.max_epochs=15", "finetune.train_crop=null"]},
    "ft1-e15-crop": {"overrides": [*FT1, "trainer.max_epochs=15"]},
    "ft1-e15-full-bntrain": {"overrides": [*FT1, "trainer.max_epochs=15", "finetune.train_crop=null",
                                           "finetune.bn=train"]},
    "ft1-e10-cosface": {"overrides": [*FT1, "trainer.max_epochs=10", "model.head.kind=cosface",
                                      "model.head.scale=16", "model.head.margin=0.2"]},
}
REVIEW_METHODS = {  # key -> threshold from validation probabilities (calibrated), labels and rulings
    "point": lambda p, y, g: calibration.review_threshold(p, y, 0.95),                      # today: point estimate
    "cp90": lambda p, y, g: calibration.review_threshold_bound(p, y, 0.95, 0.1, sequential=False),  # CP bound
    "ltt90": lambda p, y, g: calibration.review_threshold_bound(p, y, 0.95, 0.1),           # fixed sequence
    "ltt80": lambda p, y, g: calibration.review_threshold_bound(p, y, 0.95, 0.2),
    "ltt80_rulings": lambda p, y, g: calibration.review_threshold_bound(p, y, 0.95, 0.2, groups=g),
}
HELDOUT = common.REPORT  # docs/unknown.md's seven report codes


def config(overrides: list[str], cache_dir: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["experiment=recommended", f"paths.cache_dir={cache_dir}",
                                           "logger.log_model=false", f"paths.output_dir={ROOT}/outputs/features-search",
                                           *overrides])


def prepared(cfg) -> stages.RunContext:
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network, stages.data):  # train.run's stages up to the data
        stage(ctx)
    return ctx


def prepare(cand: dict, cache_dir: str, extra: list[str] = ()):
    """make train's stages up to the data for the candidate; `concat` backbones' pooled features joined to the
    first's."""
    cfg = config([*cand["overrides"], *extra], cache_dir)
    ctx = prepared(cfg)
    spec, net, dm = ctx.spec, ctx.net, ctx.dm
    for name in cand.get("concat", []):
        other_ctx = prepared(config([*cand["overrides"], *extra, f"model={name}"], cache_dir))
        other, odm = other_ctx.net, other_ctx.dm
        for sp in dm.splits:
            (x, y), (ox, _) = dm.splits[sp].tensors, odm.splits[sp].tensors
            dm.splits[sp] = TensorDataset(torch.cat([x, ox], 1), y)
        net = replace(net, dim=net.dim + other.dim)
    val = dm.splits["val"].tensors
    dm.refit_train = ConcatDataset([dm.splits["train"], TensorDataset(*val)])
    return cfg, spec, net, dm


class ValCurve(pl.Callback):
    """Validation top-1 after every epoch (for the epoch choice)."""

    def __init__(self):
        self.top1: list[float] = []

    def on_validation_end(self, trainer, module):  # after the module's epoch-end hook has logged it
        if not trainer.sanity_checking:
            self.top1.append(float(trainer.callback_metrics["curves/top1_val"]))


def fit(cfg, net, dm, spec, seed: int, init: dict):
    """One seed: fit on training rulings; returns (module, val curve, minutes)."""
    cfg.seed, dm.seed = seed, seed
    net.suffix.load_state_dict(init)  # every seed starts from ImageNet's stages
    module = stages.make_module(cfg, net, len(spec.classes), None)
    curve = ValCurve()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[curve], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    with stages.threads(stages.fit_threads(cfg, "cpu")):
        trainer.fit(module, datamodule=dm)
    return module, curve.top1, (time.perf_counter() - started) / 60


def one_seed(cfg, net, dm, spec, seed: int, init: dict, refit: bool) -> dict:
    module, curve, fit_min = fit(cfg, net, dm, spec, seed, init)
    val_logits, val_y = stages.split_logits(module, dm, "val")
    t = calibration.fit_temperature(val_logits, val_y)
    val_probs = torch.softmax(val_logits / t, 1)
    val_rulings = [s.rrdc_no for s in spec.split("val")]
    thresholds = {k: f(val_probs, val_y, val_rulings) for k, f in REVIEW_METHODS.items()}
    out = {"val_logits": val_logits, "val_y": val_y, "val_probs": val_probs, "temperature": t, "thresholds": thresholds, "curve": curve,
           "fit_minutes": fit_min, "refit_minutes": 0.0}
    if refit:
        started = time.perf_counter()
        net.suffix.load_state_dict(init)
        ctx = stages.RunContext(cfg, spec=spec, net=net, dm=dm, refit_train=dm.refit_train, module=module,
                                suffix_init=init)
        with stages.threads(stages.fit_threads(cfg, "cpu")):  # as make train refits
            module = stages.refit_module(ctx)
        out["refit_minutes"] = (time.perf_counter() - started) / 60
    out["test_logits"], out["test_y"] = stages.split_logits(module, dm, "test")
    return out


def correct(logits, y, k=1) -> np.ndarray:
    return evaluation.topk_correct(logits, y, k).astype(float)


def review_rows(seeds: list[dict], rulings: list[str]) -> dict:
    """Per review method: 2019 share of photos not flagged and how often those are right (means over seeds)."""
    rows = {}
    for name in REVIEW_METHODS:
        cov, prec = [], []
        for s in seeds:
            probs = torch.softmax(s["test_logits"] / s["temperature"], 1)
            accepted = (probs.max(1).values >= s["thresholds"][name]).numpy()
            right = correct(s["test_logits"], s["test_y"])
            cov.append(float(accepted.mean()))
            prec.append(float(right[accepted].mean()) if accepted.any() else float("nan"))
        rows[name] = {"threshold": float(np.mean([s["thresholds"][name] for s in seeds])),
                      "coverage": float(np.mean(cov)), "precision": float(np.nanmean(prec))}
    return rows


def run_name(name: str, extra: list[str]) -> str:
    return f"{name} [{' '.join(extra)}]" if extra else name


def baseline_val(client, exp_id: str, extra: list[str]) -> dict | None:
    """The per-photo answers of the latest `baseline` run with the same extra overrides (the paired comparison)."""
    base = run_name("baseline", extra)
    runs = client.search_runs([exp_id], f"tags.mlflow.runName = '{base}' and tags.hsflow_kind = 'candidate'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    path = client.download_artifacts(runs[0].info.run_id, "per_photo.json")
    return json.loads(Path(path).read_text())


def point_certainty(seeds: list[dict]) -> dict:
    """How sure validation is of today's point-estimate threshold: photos it accepts on validation, how many are
    right, and the one-sided 90 % Clopper-Pearson lower bound of that precision (first seed)."""
    s = seeds[0]
    conf, pred = s["val_probs"].max(1)
    accepted = conf >= s["thresholds"]["point"]
    n, k = int(accepted.sum()), int((pred[accepted] == s["val_y"][accepted]).sum())
    return {"review/point_val_accepted": n, "review/point_val_right": k,
            "review/point_val_cp90_lower": calibration.precision_lower_bound(k, n, 0.1) if n else 0.0}


def summarize(name: str, seeds: list[dict], spec, base: dict | None) -> tuple[dict, dict]:
    val_r, test_r = [s.rrdc_no for s in spec.split("val")], [s.rrdc_no for s in spec.split("test")]
    val_c = np.mean([correct(s["val_logits"], s["val_y"]) for s in seeds], 0)
    t1 = np.mean([correct(s["test_logits"], s["test_y"]) for s in seeds], 0)
    t3 = np.mean([correct(s["test_logits"], s["test_y"], 3) for s in seeds], 0)
    m: dict = {}
    for key, c, r in (("val_top1", val_c, val_r), ("test_top1", t1, test_r), ("test_top3", t3, test_r)):
        m[key], m[key + "_ci_low"], m[key + "_ci_high"] = evaluation.ruling_interval(c, r)
    if base is not None and name != "baseline":
        m["val_diff"], m["val_diff_ci_low"], m["val_diff_ci_high"] = evaluation.paired_difference(
            val_c, base["val_correct"], val_r)
    m["val_top1_seed_sd"] = float(np.std([correct(s["val_logits"], s["val_y"]).mean() for s in seeds]))
    for key, row in review_rows(seeds, test_r).items():
        m |= {f"review/{key}_coverage": row["coverage"], f"review/{key}_precision": row["precision"],
              f"review/{key}_threshold": row["threshold"]}
    m |= point_certainty(seeds)
    m["fit_minutes"] = float(np.mean([s["fit_minutes"] for s in seeds]))
    m["refit_minutes"] = float(np.mean([s["refit_minutes"] for s in seeds]))
    curve = np.mean([s["curve"] for s in seeds], 0).tolist()
    m["best_val_epoch"] = int(np.argmax(curve)) + 1 if curve else 0
    per_photo = {"val_correct": val_c.tolist(), "val_rulings": val_r, "test_top1": t1.tolist(),
                 "test_rulings": test_r, "val_curve": curve,
                 "review": review_rows(seeds, test_r)}
    return m, per_photo


def run_candidate(name: str, args, client, exp_id: str) -> None:
    cand = CANDIDATES[name]
    started = time.perf_counter()
    cfg, spec, net, dm = prepare(cand, args.cache_dir, args.extra)
    prepared = (time.perf_counter() - started) / 60
    init = copy.deepcopy(net.suffix.state_dict())
    seeds = [one_seed(cfg, net, dm, spec, s, init, not args.no_refit) for s in args.seeds]
    metrics, per_photo = summarize(name, seeds, spec, baseline_val(client, exp_id, args.extra))
    metrics["prepare_minutes"] = prepared
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name(name, args.extra),
                          tags={"hsflow_kind": "candidate", "hsflow.kind": "evidence"}) as run:
        mlflow.log_params({"overrides": " ".join([*cand["overrides"], *args.extra]) or "(none)",
                           "concat": ",".join(cand.get("concat", [])) or "-", "seeds": str(args.seeds),
                           "refit": not args.no_refit, "train_photos": len(dm.splits["train"])})
        mlflow.log_metrics(metrics)
        for i, v in enumerate(per_photo["val_curve"]):
            mlflow.log_metric("curves/top1_val_mean", v, step=i + 1)
        mlflow.log_dict(per_photo, "per_photo.json")
    print(f"{run_name(name, args.extra)} run={run.info.run_id[:8]} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                           if not k.startswith("review/")), flush=True)
    print("  review:", json.dumps(per_photo["review"]), flush=True)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a held-out photo scores above a trained-code photo), ties counted half (Mann-Whitney)."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()))


def unknown_figures(cfg, module, dm, spec, net) -> dict:
    """The configured unknown score (unknown.method, hsflow.models.unknown) on this model's embeddings and logits, threshold
    at unknown.max_val_rate of validation, review threshold by calibration.method on the rest; AUROC and FPR at 95 % TPR of held-out-code photos (positives)
    against 2019 photos of trained codes; and the share of held-out photos neither unknown nor needs_review."""
    from hsflow.models import unknown
    from hsflow.data.transforms import build_preprocess, preprocess_spec
    from hsflow.data.features import FeatureCache, extract

    originals = torch.tensor([s.view == 0 for s in spec.split("train")])
    emb = {sp: stages.embed(module, dm.splits[sp].tensors[0]) for sp in ("train", "val", "test")}
    val_logits, val_y = stages.split_logits(module, dm, "val")
    test_logits = stages.split_logits(module, dm, "test")[0]
    t = calibration.fit_temperature(val_logits, val_y)
    labels = [s.label for s in spec.split("train") if s.view == 0]
    scorer = unknown.fit(emb["train"][originals].numpy(), labels, emb["val"].numpy(), val_logits.numpy(), t,
                         str(cfg.unknown.method), float(cfg.unknown.max_val_rate))
    samples, _ = unknown.heldout_photos(cfg)
    pre = preprocess_spec(cfg.model)
    feats = extract(samples, net.prefix, build_preprocess(pre), FeatureCache(cfg.paths.cache_dir, net.cache_id),
                    num_workers=0, draft_size=pre["resize"], desc="held-out codes")
    with torch.no_grad():
        module.eval()
        held_emb = torch.cat([module.suffix(x) for x in feats.split(256)])
        held_logits = torch.cat([module.head(e) for e in held_emb.split(256)])
    held, test, val = (torch.from_numpy(scorer.score(e.numpy(), g.numpy())) for e, g in (
        (held_emb, held_logits), (emb["test"], test_logits), (emb["val"], val_logits)))
    at95 = torch.quantile(held, 0.05)  # 95 % of held-out photos score above it
    flags = {k: torch.from_numpy(scorer.decide(v.numpy())) for k, v in (("held", held), ("test", test))}
    probs = torch.softmax(val_logits / t, 1)
    review = calibration.fit_review_threshold(probs, val_y, cfg.calibration,
                                              eligible=~scorer.decide(val.numpy()))
    confident = torch.softmax(held_logits / t, 1).max(1).values >= review
    return {"unknown/auroc_heldout_vs_test": auroc(held, test), "unknown/auroc_heldout_vs_val": auroc(held, val),
            "unknown/fpr_at_95tpr_test": float((test >= at95).float().mean()),
            "unknown/threshold": scorer.threshold, "unknown/val_rate": scorer.val_rate,
            "unknown/test_rate": float(flags["test"].float().mean()),
            "unknown/heldout_rate": float(flags["held"].float().mean()),
            "unknown/heldout_unflagged": float((confident & ~flags["held"]).float().mean()),
            "unknown/heldout_photos": float(len(held))}


def run_heldout(name: str, args, exp_id: str) -> None:
    cand = CANDIDATES[name]
    cfg, spec, net, dm = prepare(cand, args.cache_dir, [*args.extra, common.exclude_override(HELDOUT)])
    init = copy.deepcopy(net.suffix.state_dict())
    module, _, minutes = fit(cfg, net, dm, spec, args.seeds[0], init)
    figures = unknown_figures(cfg, module, dm, spec, net) | {"fit_minutes": minutes}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name(f"{name}-heldout", args.extra),
                          tags={"hsflow_kind": "heldout", "hsflow.kind": "evidence"}) as run:
        mlflow.log_params({"overrides": " ".join([*cand["overrides"], *args.extra]) or "(none)",
                           "heldout_codes": ",".join(HELDOUT),
                           "concat": ",".join(cand.get("concat", [])) or "-", "seed": args.seeds[0]})
        mlflow.log_metrics(figures)
    print(f"{run_name(name + '-heldout', args.extra)} run={run.info.run_id[:8]} " + " ".join(f"{k}={v:.4f}" for k, v in figures.items()),
          flush=True)


def ci(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    return f"{m[key]:.3f} [{m[key + '_ci_low']:.3f}, {m[key + '_ci_high']:.3f}]"


def table(client, exp_id: str) -> None:
    """The search table (markdown), one row per finished run, oldest first."""
    runs = client.search_runs([exp_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
    print("| run | candidate | val 2018 top-1 | paired diff vs baseline | 2019 top-1 | 2019 top-3 | unflagged "
          "coverage / precision (point) | minutes fit + refit (per seed) | seeds |\n|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        m, tags = r.data.metrics, r.data.tags
        if tags.get("hsflow_kind") == "candidate":
            review = f"{m.get('review/point_coverage', float('nan')):.2f} / {m.get('review/point_precision', float('nan')):.3f}"
            print(f"| {r.info.run_id[:8]} | {tags['mlflow.runName']} | {ci(m, 'val_top1')} | {ci(m, 'val_diff')} | "
                  f"{ci(m, 'test_top1')} | {ci(m, 'test_top3')} | {review} | "
                  f"{m['fit_minutes']:.1f} + {m['refit_minutes']:.1f} | {r.data.params.get('seeds')} |")
    print()
    for r in runs:
        m = r.data.metrics
        if r.data.tags.get("hsflow_kind") == "heldout":
            print(f"| {r.info.run_id[:8]} | {r.data.tags['mlflow.runName']} | " + " | ".join(
                f"{k.split('/')[1]}={v:.3f}" for k, v in sorted(m.items()) if k.startswith("unknown/")) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"candidates: {', '.join(CANDIDATES)}")
    ap.add_argument("--table", action="store_true", help="print the search table of the finished runs and exit")
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    ap.add_argument("--no-refit", action="store_true", help="report 2019 for the model fit on training rulings")
    ap.add_argument("--heldout", action="store_true", help="the unknown score with codes held out instead")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every candidate (e.g. "
                    "dataset.train_views=0: originals only); part of the run name, and of the baseline it is paired with")
    ap.add_argument("--cache-dir", default=os.environ.get("HSFLOW_CACHE", str(ROOT / "cache")))
    ap.add_argument("--tracking-uri", default=default_tracking_uri())
    args = ap.parse_args()
    unknown_names = [n for n in args.names if n not in CANDIDATES]
    if unknown_names or not (args.names or args.table):
        ap.error(f"name candidates from: {', '.join(CANDIDATES)} (unknown: {', '.join(unknown_names) or 'none'})")
    mlflow.set_tracking_uri(args.tracking_uri)
    client = mlflow.tracking.MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    if args.table:
        return table(client, exp_id)
    for name in args.names:
        if args.heldout:
            run_heldout(name, args, exp_id)
        else:
            run_candidate(name, args, client, exp_id)


if __name__ == "__main__":
    main()
