"""Test figures a reader can trust: accuracy with a 95 % interval from a bootstrap over rulings, and what the review
flag does on the test period (coverage and precision of the answers it lets through).

Photos of one ruling are near-copies of one item, so they are not independent: resampling photos would give too
narrow an interval. The bootstrap resamples whole rulings (scipy.stats.bootstrap over per-ruling counts, the
statistic a ratio of sums), which is what a user's next batch of rulings would vary by.
"""
from __future__ import annotations

import collections

import numpy as np
import torch
from scipy.stats import bootstrap

from hsflow.models.calibration import unflagged

CONFIDENCE = 0.95
RESAMPLES = 2000


def ruling_interval(correct, rulings: list[str], *, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high): the share of correct photos and its 95 % percentile interval, resampling rulings.

    `correct` is one 0/1 per photo, `rulings` the photo's ruling number. Empty input gives NaNs."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) == 0:
        return float("nan"), float("nan"), float("nan")
    hits, sizes = collections.defaultdict(float), collections.Counter(rulings)
    for c, r in zip(correct, rulings):
        hits[r] += c
    keys = sorted(sizes)
    h = np.array([hits[k] for k in keys])
    n = np.array([sizes[k] for k in keys], dtype=float)
    point = float(h.sum() / n.sum())
    if len(keys) < 2 or np.all(h == h[0] * n / n[0]):  # one ruling, or no variation: the interval is the point
        return point, point, point
    res = bootstrap((h, n), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis), paired=True, vectorized=True,
                    n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                    rng=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(correct_a, correct_b, rulings: list[str], *, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of A minus accuracy of B on the same photos, with a 95 % percentile
    interval from resampling whole rulings (both models see the same resampled rulings, so what they share cancels:
    much narrower than comparing two separate intervals). Per-photo values may be fractions (means over seeds)."""
    diff = np.asarray(correct_a, dtype=float) - np.asarray(correct_b, dtype=float)
    if len(diff) == 0:
        return float("nan"), float("nan"), float("nan")
    hits, sizes = collections.defaultdict(float), collections.Counter(rulings)
    for d, r in zip(diff, rulings):
        hits[r] += d
    keys = sorted(sizes)
    h, n = np.array([hits[k] for k in keys]), np.array([sizes[k] for k in keys], dtype=float)
    point = float(h.sum() / n.sum())
    if len(keys) < 2 or np.all(h == h[0] * n / n[0]):  # one ruling, or the same difference everywhere
        return point, point, point
    res = bootstrap((h, n), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis), paired=True, vectorized=True,
                    n_resamples=RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
                    rng=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).numpy()


def level_correct(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], digits: int) -> np.ndarray:
    """Right at a coarser level of the nomenclature (2 digits: chapter, 4: heading)."""
    level = [c[:digits] for c in classes]
    return np.array([level[p] == level[t] for p, t in zip(logits.argmax(1).tolist(), labels.tolist())], dtype=bool)


def period_figures(logits: torch.Tensor, labels: torch.Tensor, rulings: list[str], classes: list[str],
                 temperature: float, review_threshold: float, prefix: str = "test",
                 unknown=None) -> dict[str, float]:
    """Top-1 / top-3 / chapter / heading top-1 with 95 % intervals over rulings; the share of photos answered
    unflagged (coverage: not needs_review, not `unknown`, one flag per photo) and how often those are right
    (precision), with its interval."""
    out: dict[str, float] = {}
    for name, correct in (("top1", topk_correct(logits, labels, 1)), ("top3", topk_correct(logits, labels, 3)),
                          ("chapter_top1", level_correct(logits, labels, classes, 2)),
                          ("heading_top1", level_correct(logits, labels, classes, 4))):
        value, low, high = ruling_interval(correct, rulings)
        out |= {f"{prefix}/{name}": value, f"{prefix}/{name}_ci_low": low, f"{prefix}/{name}_ci_high": high}
    probs = torch.softmax(logits / temperature, dim=1)
    if unknown is not None and len(unknown) != len(labels):
        unknown = None  # not one flag per photo (generated test copies): the review flag alone
    accepted = np.asarray(unflagged(probs.max(1).values.numpy(), review_threshold, unknown))
    right = topk_correct(logits, labels, 1)
    out[f"{prefix}/unflagged_coverage"] = float(accepted.mean()) if len(accepted) else float("nan")
    kept = [r for r, a in zip(rulings, accepted) if a]
    value, low, high = ruling_interval(right[accepted], kept)
    out |= {f"{prefix}/unflagged_precision": value, f"{prefix}/unflagged_precision_ci_low": low,
            f"{prefix}/unflagged_precision_ci_high": high}
    out[f"{prefix}/photos"] = float(len(labels))
    out[f"{prefix}/rulings"] = float(len(set(rulings)))
    return out


def interval_text(figures: dict, key: str) -> str:
    """'0.913 [0.871, 0.949]' for a figure logged with its interval."""
    return f"{figures[key]:.3f} [{figures[key + '_ci_low']:.3f}, {figures[key + '_ci_high']:.3f}]"
