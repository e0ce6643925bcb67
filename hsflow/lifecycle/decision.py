"""Champion against challenger on the same window photos: what each answers, the paired differences, the decision.

Both models answer through the door brokers use (`hsflow.recommend.iter_recommend` over the saved model folder),
so the figures are those of the live service: top-1 of the decided code (by string: a window photo of a code a model
never learned, or one it learned only inside a catch-all class, counts as wrong for it), `needs_review` (the review
threshold and the unknown score, as the page and REST show them) and `unknown`.

Photos of one ruling are near-copies of one item, so every interval resamples whole rulings (as hsflow.training.evaluation
does); the differences resample the same rulings for both models (paired), which is what makes a small window
informative: the rulings both get right or both get wrong cancel out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import bootstrap

from hsflow.training.evaluation import CONFIDENCE, RESAMPLES, ruling_interval

# What the decision compares (MetricThreshold names): the challenger's top-1 may fall at most `margin` below the
# champion's at the low end of the paired interval, its unflagged answers must keep the review flag's promise, and it
# must be at least as safe as the champion: unflagged answers right at least as often, and photos of goods it never
# learned (window photos of codes it has no class for, out-of-scope photos) flagged at least as often.
GATES = ("delta_top1_ci_low", "unflagged_precision", "safety_precision_gap", "safety_catch_gap")
PAIRED = ("top1", "unflagged_coverage", "unflagged_precision", "unknown_rate")  # the differences paired()


@dataclass
class Answers:
    """One model's answers on the window, one entry per photo (in the window's photo order)."""
    correct: np.ndarray    # top-1 == the decided code
    unflagged: np.ndarray  # not needs_review: what a broker may take without a second look
    unknown: np.ndarray    # unlike every trained product
    predicted: list[str] = field(default_factory=list)
    trained: np.ndarray | None = None  # the decided code is one the model has a class for


def answer(model, photos: list, truth: list[str]) -> tuple[Answers, list[str]]:
    """Run a model over the window photos (PhotoInputs) as the doors do; also the photos that failed to decode."""
    from hsflow.core import hs
    from hsflow.serving.recommend import iter_recommend

    out, failed = [], []
    known = {hs.describe(c).hs_code for c in model.classes}
    for rec, code in zip(iter_recommend(model, photos, 1, num_workers=0, precedents=0, progress=False), truth):
        if rec.error:
            failed.append(rec.error)
        top = rec.candidates[0]["hs_code"] if rec.candidates else ""
        out.append((top == code and not rec.error, not rec.needs_review, rec.unknown, top, code in known))
    cols = list(zip(*out)) if out else [(), (), (), (), ()]
    return Answers(np.array(cols[0], bool), np.array(cols[1], bool), np.array(cols[2], bool), list(cols[3]),
                   np.array(cols[4], bool)), failed


def catch_rate(window: Answers, outside: Answers) -> tuple[float, int]:
    """The share of photos of goods the model never learned that it flags (unknown or needs_review): window photos
    whose decided code it has no class for, and out-of-scope photos (`outside`, data/ood). (rate, photos)."""
    untrained = ~window.trained if window.trained is not None else np.zeros(len(window.unflagged), bool)
    flags = np.concatenate([~window.unflagged[untrained], ~outside.unflagged])
    return (float(flags.mean()) if len(flags) else math.nan), int(len(flags))


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


def decide(delta: dict, challenger: dict, margin: float, target: float, champion: dict | None = None
           ) -> tuple[bool, str]:
    """MLflow's own validation (`mlflow.validate_evaluation_results` with `MetricThreshold`s) over the gates: the
    low end of the paired top-1 interval >= -margin, the challenger's unflagged precision >= target, and (with the
    champion's figures) the challenger's unflagged precision and catch rate not below the champion's.
    Returns (promote, reason in one line)."""
    import mlflow
    from mlflow.models import MetricThreshold
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    champion = champion or {}
    metrics = {"delta_top1_ci_low": delta["top1_ci_low"],
               # no unflagged answer at all: the flag promises nothing a broker can use; it fails the gate
               "unflagged_precision": _or(challenger["unflagged_precision"], -1.0),
               "safety_precision_gap": _or(challenger["unflagged_precision"], -1.0)
               - _or(champion.get("unflagged_precision"), -1.0),
               "safety_catch_gap": _or(challenger.get("catch_rate"), 0.0) - _or(champion.get("catch_rate"), 0.0)}
    floors = {"delta_top1_ci_low": -float(margin), "unflagged_precision": float(target),
              "safety_precision_gap": -1e-9, "safety_catch_gap": -1e-9}
    thresholds = {k: MetricThreshold(threshold=v, greater_is_better=True) for k, v in floors.items()}
    top1 = (f"top-1 {delta['top1']:+.3f} [{delta['top1_ci_low']:+.3f}, {delta['top1_ci_high']:+.3f}] "
            "against the champion")
    prec = f"unflagged precision {figure_text(challenger['unflagged_precision'])}"
    said = {"delta_top1_ci_low": f"{top1}: its low end is below -{margin:g}",
            "unflagged_precision": f"{prec} is under the target {target:g}",
            "safety_precision_gap": f"less safe: {prec} is below the champion's "
                                    f"{figure_text(champion.get('unflagged_precision', math.nan))}",
            "safety_catch_gap": f"less safe: it flags {_pct(challenger.get('catch_rate'))} of photos of goods it never "
                                f"learned, the champion {_pct(champion.get('catch_rate'))}"}
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult(metrics, {}, run_id="refresh"))
    except ModelValidationFailedException:
        return False, "; ".join(said[k] for k in GATES if metrics[k] < floors[k])
    return True, (f"{top1}, not worse beyond the margin {margin:g}; {prec} >= target {target:g}; as safe as the "
                  f"champion (flags {_pct(challenger.get('catch_rate'))} of goods it never learned, champion "
                  f"{_pct(champion.get('catch_rate'))})")


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f} %"


def _or(value: float, fallback: float) -> float:
    return fallback if value is None or math.isnan(value) else value


def figure_text(value: float) -> str:
    """A figure to 3 decimals, or why there is none."""
    return "n/a (no unflagged answer)" if value is None or math.isnan(value) else f"{value:.3f}"
