"""Champion against challenger on the same window photos: what each answers, the paired differences, the decision.

Both models answer through the door brokers use (`hsflow.recommend.iter_recommend` over the saved model folder),
so the figures are those of the live service: top-1 of the decided code (by string: a window photo of a code a model
never learned, or one it learned only inside a catch-all class, counts as wrong for it), `needs_review` (the review
threshold and the unknown score, as the page and REST show them) and `unknown`.

Photos of one ruling are near-copies of one item, so every interval resamples whole rulings (as hsflow.evaluation
does); the differences resample the same rulings for both models (paired), which is what makes a small window
informative: the rulings both get right or both get wrong cancel out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import bootstrap

from hsflow.evaluation import CONFIDENCE, RESAMPLES, ruling_interval

# What the decision compares (MetricThreshold names): the challenger's top-1 may fall at most `margin` below the
# champion's at the low end of the paired interval, and its unflagged answers must keep the review flag's promise.
GATES = ("delta_top1_ci_low", "unflagged_precision")
PAIRED = ("top1", "unflagged_coverage", "unflagged_precision", "unknown_rate")  # the differences paired()


@dataclass
class Answers:
    """One model's answers on the window, one entry per photo (in the window's photo order)."""
    correct: np.ndarray    # top-1 == the decided code
    unflagged: np.ndarray  # not needs_review: what a broker may take without a second look
    unknown: np.ndarray    # unlike every trained product
    predicted: list[str] = field(default_factory=list)


def answer(model, photos: list, truth: list[str]) -> tuple[Answers, list[str]]:
    """Run a model over the window photos (PhotoInputs) as the doors do; also the photos that failed to decode."""
    from hsflow.recommend import iter_recommend

    out, failed = [], []
    for rec, code in zip(iter_recommend(model, photos, 1, num_workers=0, precedents=0, progress=False), truth):
        if rec.error:
            failed.append(rec.error)
        top = rec.candidates[0]["hs_code"] if rec.candidates else ""
        out.append((top == code and not rec.error, not rec.needs_review, rec.unknown, top))
    cols = list(zip(*out)) if out else [(), (), (), ()]
    return Answers(np.array(cols[0], bool), np.array(cols[1], bool), np.array(cols[2], bool), list(cols[3])), failed


def _per_ruling(values: np.ndarray, rulings: list[str], keys: list[str]) -> np.ndarray:
    index = {k: i for i, k in enumerate(keys)}
    return np.bincount([index[r] for r in rulings], weights=values.astype(float), minlength=len(keys))


def _ratio(num, den):
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=np.asarray(den) > 0)


def figures(a: Answers, rulings: list[str]) -> dict[str, float]:
    """One model's window figures, each with its 95 % interval over rulings."""
    out = {}
    for name, values, keep in (("top1", a.correct, None), ("unflagged_coverage", a.unflagged, None),
                               ("unknown_rate", a.unknown, None), ("unflagged_precision", a.correct, a.unflagged)):
        sel = np.ones(len(values), bool) if keep is None else keep
        point, low, high = ruling_interval(values[sel], [r for r, k in zip(rulings, sel) if k])
        out |= {name: point, f"{name}_ci_low": low, f"{name}_ci_high": high}
    return out


def paired(champion: Answers, challenger: Answers, rulings: list[str], seed: int = 0) -> dict[str, float]:
    """challenger - champion in each PAIRED figure, with the 95 % percentile interval of a paired bootstrap over
    rulings (the same resampled rulings for both models). A resample in which a model leaves no answer unflagged
    has no precision; that interval is taken over the others, and their share is kept."""
    keys = sorted(set(rulings))
    n = _per_ruling(np.ones(len(rulings)), rulings, keys)
    cols = [_per_ruling(v, rulings, keys) for m in (champion, challenger)
            for v in (m.correct, m.unflagged, m.correct & m.unflagged, m.unknown)]

    def stat(n, c0, u0, h0, k0, c1, u1, h1, k1, axis=-1):
        s = lambda x: x.sum(axis)  # noqa: E731 - the statistic's one operation
        return np.stack([(s(c1) - s(c0)) / s(n), (s(u1) - s(u0)) / s(n),
                         _ratio(s(h1), s(u1)) - _ratio(s(h0), s(u0)), (s(k1) - s(k0)) / s(n)])

    point = stat(n, *cols)
    out = {}
    if len(keys) > 1:
        dist = bootstrap((n, *cols), stat, paired=True, vectorized=True, n_resamples=RESAMPLES, method="percentile",
                         confidence_level=CONFIDENCE, rng=np.random.default_rng(seed)).bootstrap_distribution
    else:  # one ruling: nothing to resample; the interval is the point
        dist = point[:, None]
    tail = 100 * (1 - CONFIDENCE) / 2
    for i, name in enumerate(PAIRED):
        row = dist[i][~np.isnan(dist[i])]
        low, high = (np.percentile(row, [tail, 100 - tail]) if len(row) else (math.nan, math.nan))
        out |= {name: float(point[i]), f"{name}_ci_low": float(low), f"{name}_ci_high": float(high)}
    out["unflagged_precision_undefined_share"] = float(np.isnan(dist[2]).mean())
    return out


def decide(delta: dict, challenger: dict, margin: float, target: float) -> tuple[bool, str]:
    """MLflow's own validation (`mlflow.validate_evaluation_results` with `MetricThreshold`s) over the two gates:
    the low end of the paired top-1 interval >= -margin, the challenger's unflagged precision >= target.
    Returns (promote, reason in one line)."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    metrics = {"delta_top1_ci_low": delta["top1_ci_low"],
               # no unflagged answer at all: the flag promises nothing a broker can use; it fails the gate
               "unflagged_precision": _or(challenger["unflagged_precision"], -1.0)}
    thresholds = {"delta_top1_ci_low": MetricThreshold(threshold=-float(margin), greater_is_better=True),
                  "unflagged_precision": MetricThreshold(threshold=float(target), greater_is_better=True)}
    top1 = (f"top-1 {delta['top1']:+.3f} [{delta['top1_ci_low']:+.3f}, {delta['top1_ci_high']:+.3f}] "
            "against the champion")
    prec = f"unflagged precision {figure_text(challenger['unflagged_precision'])}"
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult(metrics, {}, run_id="refresh"))
    except ModelValidationFailedException:
        failed = [f"{top1}: its low end is below -{margin:g}"] if metrics[GATES[0]] < -margin else []
        failed += [f"{prec} is under the target {target:g}"] if metrics[GATES[1]] < target else []
        return False, "; ".join(failed)
    return True, f"{top1}, not worse beyond the margin {margin:g}; {prec} >= target {target:g}"


def _or(value: float, fallback: float) -> float:
    return fallback if value is None or math.isnan(value) else value


def figure_text(value: float) -> str:
    """A figure to 3 decimals, or why there is none."""
    return "n/a (no unflagged answer)" if value is None or math.isnan(value) else f"{value:.3f}"
