"""What the studies share, taken from hsflow itself so that a study keeps describing the product.

The held-out code sets (REPORT, choice_codes, median_code_per_chapter) and the leave-codes-out view of the feature
cache (LeftOut, over hsflow.data.builder.leave_codes_out); make train's head (hsflow.models.classifier.build_head,
shaped by experiment=recommended), temperature (hsflow.models.calibration.fit_temperature), calibration settings
and fused unknown score (hsflow.models.unknown: fit, or UnknownScorer.refer for a reference of the study's own);
`python -m hsflow.train` run as a command, its last line read by hsflow.training.train.parse_last_line.
Studies import this module and hsflow, never each other (tests/test_studies.py).
"""
from __future__ import annotations

import collections
import functools
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# docs/unknown.md's seven report codes: each chapter's median code by photo count in the demo store. Read, never
# chosen on.
REPORT = ["0403200000", "0714200000", "0810500000", "0910110000", "2009710000", "2106900000", "2202990000"]


def _chapters(store: Path) -> tuple[collections.Counter, list[list[str]]]:
    """Photos per code in the raw store, and each chapter's codes ranked by photo count (ties by code)."""
    from hsflow.data.store import RawStore

    counts = collections.Counter(p.hs_code for p in RawStore(store).photos())
    chapters = collections.defaultdict(list)
    for code in counts:
        chapters[code[:2]].append(code)
    return counts, [sorted(codes, key=lambda c: (counts[c], c)) for codes in chapters.values()]


def choice_codes(store: Path) -> list[str]:
    """In each chapter with at least three codes, the codes ranked just below and just above its median by photo
    count (ties by code): codes of several chapters, never a REPORT code (those are the medians), fixed by rule."""
    _, chapters = _chapters(store)
    out = [c for ranked in chapters if len(ranked) >= 3 for c in (ranked[len(ranked) // 2 - 1],
                                                                   ranked[len(ranked) // 2 + 1])]
    assert not set(out) & set(REPORT)
    return sorted(out)


def median_code_per_chapter(store: Path) -> list[str]:
    """From each chapter, the code with the median number of photos (ties by code): held-out codes of every
    chapter, neither the commonest nor the rarest (on the demo store: REPORT)."""
    return sorted(ranked[len(ranked) // 2] for ranked in _chapters(store)[1])


def exclude_override(codes) -> str:
    """The Hydra override that holds `codes` out of every split of a training run."""
    return "dataset.exclude_codes=[" + ",".join(f'"{c}"' for c in codes) + "]"


@functools.cache
def recommended():
    """make train's configuration (experiment=recommended), composed once."""
    from hydra import compose, initialize_config_dir

    from hsflow.core.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=["experiment=recommended"])


def calibration_settings() -> dict:
    """make train's review-threshold settings (method, target precision, delta) as a plain dict."""
    cal = recommended().calibration
    return {"method": str(cal.method), "delta": float(cal.delta), "target_precision": float(cal.target_precision)}


def features(overrides: list[str]) -> tuple[dict, dict, list[str], object, object]:
    """make train's stages up to the network, then the cached pooled features of every split (photos x dim, or
    photos x views x dim with tta): (features per split, samples per split, classes, cfg, the run context)."""
    from hydra import compose, initialize_config_dir

    from hsflow.core.config import CONF_DIR
    from hsflow.training import stages

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=["experiment=recommended", *overrides])
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network):
        stage(ctx)
    feats = stages.cached_features(ctx)
    samples = {sp: ctx.spec.split(sp) for sp in ("train", "val", "test")}
    return feats, samples, ctx.spec.classes, cfg, ctx


class LeftOut:
    """The feature cache's splits as a model trained without the `held` codes sees them (per split: `known` and
    `orig` masks, `labels` among the trained codes, -1 for a held-out code's photo)."""

    def __init__(self, feats: dict, samples: dict, classes: list[str], held):
        from hsflow.data.builder import leave_codes_out

        self.feats, self.held = feats, set(held)
        self.known, self.orig, self.labels = {}, {}, {}
        for sp, ss in samples.items():
            known, orig, labels = leave_codes_out(ss, classes, self.held)
            self.known[sp], self.orig[sp], self.labels[sp] = np.array(known, bool), np.array(orig, bool), \
                np.array(labels, np.int64)
        self.classes = len(classes) - len(self.held & set(classes))

    def y(self, sp: str, mask: np.ndarray) -> np.ndarray:
        return self.labels[sp][mask]

    def heldout(self, splits=("train", "val", "test"), originals: bool = True):
        """The held-out codes' photos of `splits` (their originals only, unless told otherwise)."""
        import torch

        return torch.cat([self.feats[sp][~self.known[sp] & (self.orig[sp] | (not originals))] for sp in splits])


def train_head(x, y, classes: int, epochs: int | None = None, seed: int = 42, smoothing: float | None = None):
    """make train's head (build_head with experiment=recommended's model.head) fitted on cached features in plain
    torch: AdamW at the configured rate, per-step cosine, the configured label smoothing, batches of 32."""
    import torch

    from hsflow.models.classifier import head_from_spec

    cfg = recommended()
    epochs = int(cfg.trainer.max_epochs) if epochs is None else epochs
    smoothing = float(cfg.label_smoothing) if smoothing is None else smoothing
    torch.manual_seed(seed)
    head = head_from_spec(x.shape[1], classes, cfg.model.head)
    opt = torch.optim.AdamW(head.parameters(), lr=float(cfg.optimizer.lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 31) // 32))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    y = torch.as_tensor(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            loss_fn(head(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return head.eval()


def temperature(logits, labels) -> float:
    """make train's temperature fit (hsflow.models.calibration.fit_temperature) on reference logits."""
    import torch

    from hsflow.models.calibration import fit_temperature

    return fit_temperature(torch.as_tensor(logits).float(), torch.as_tensor(labels).long())


def fused(gaussians: dict, ref_rmd, ref_logits, t: float, normalize: str | None = None):
    """make train's fused unknown score (rmd_msp) over Gaussians of the study's choice, its quantiles read among a
    reference of the study's choice (its rmd scores and logits): an hsflow UnknownScorer whose `score` gives it
    (the reference's own fused scores: `.reference["score"]`)."""
    from hsflow.models import unknown

    scorer = unknown.UnknownScorer("rmd_msp", 0.0, dict(gaussians), float(t),
                                   normalize=normalize or unknown.NORMALIZE)
    scorer.reference = scorer.refer({"rmd": np.asarray(ref_rmd, np.float32), "msp": scorer.msp(ref_logits)})
    scorer.reference["score"] = scorer.reference["rmd_msp"]
    return scorer


def train(overrides: list[str], run_name: str, experiment: str) -> str:
    """One `python -m hsflow.train` run into MLflow experiment `experiment`: its run id (exits on failure)."""
    from hsflow.training.train import parse_last_line

    cmd = [sys.executable, "-m", "hsflow.train", *overrides, f"logger.experiment_name={experiment}",
           f"logger.run_name={run_name}"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed ({run_name}):\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], flush=True)
    return parse_last_line(proc.stdout)["run_id"]
