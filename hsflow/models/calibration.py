"""Calibration on the validation split: temperature scaling, ECE, the review threshold, and the one rule every answer
follows (`unflagged`, `outcome`): answer, needs_review or unknown.

Torch is imported only where a fit needs it: the served model decides with numpy alone."""
from __future__ import annotations

import math

import numpy as np

ANSWER, NEEDS_REVIEW, UNKNOWN = "answer", "needs_review", "unknown"
OUTCOMES = (ANSWER, NEEDS_REVIEW, UNKNOWN)


def fit_temperature(logits, labels, max_iter: int = 200) -> float:
    """The temperature T minimizing the validation NLL of softmax(logits / T) (Guo et al., 2017)."""
    import torch

    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    nll = torch.nn.CrossEntropyLoss()

    def closure():
        opt.zero_grad()
        loss = nll(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def ece(probs, labels, n_bins: int = 15) -> float:
    # Imported here: recommend imports this module for `unflagged` and needs no torchmetrics.
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins))


# The review threshold when validation vouches for none: above every probability (a float32 softmax can round to
# 1.0 exactly, and a threshold of 1.0 would let those answers out unflagged).
NOTHING = 1.000001


def unflagged(top_probability, threshold: float, unknown=None):
    """The review rule, the one place it is written: an answer goes out unflagged when its top calibrated probability
    reaches the review threshold (`>=`) and the photo is not unknown. Works on a float or an array (numpy or torch)
    of them, `unknown` on a bool or an array of flags. Fitting (fit_review_threshold), the test figures
    (hsflow.training.evaluation), the refresh decision and every answer (hsflow.recommend) apply it."""
    ok = top_probability >= threshold
    if unknown is None:
        return ok
    if isinstance(ok, (bool, np.bool_)):
        return bool(ok) and not bool(unknown)
    flags = np.asarray(unknown, dtype=bool)
    if isinstance(ok, np.ndarray):
        return ok & ~flags
    import torch  # a torch tensor stays a tensor

    return ok & ~torch.as_tensor(flags, device=ok.device)


def outcome(top_probability: float, threshold: float, unknown: bool = False) -> str:
    """One answer's outcome: `unknown` (unlike every trained product: never answered, only the nearest trained codes
    listed), `needs_review` (its top probability is under the review threshold) or `answer` (a broker may take it
    without a second look)."""
    if unknown:
        return UNKNOWN
    return ANSWER if unflagged(float(top_probability), threshold) else NEEDS_REVIEW


def _ranked(probs, labels, eligible=None):
    """Validation answers ranked by confidence, most confident first: (photo order, confidences, right or not).
    Photos not `eligible` (called unknown: never answered) are left out, since no threshold lets them through."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, pred = probs.max(1), probs.argmax(1)
    idx = np.arange(len(conf)) if eligible is None else np.nonzero(np.asarray(eligible, bool))[0]
    order = idx[np.argsort(-conf[idx], kind="stable")]
    return order, conf[order], (pred[order] == labels[order]).astype(float)


def review_threshold(probs, labels, target_precision: float, eligible=None) -> float:
    """The lowest top-probability threshold whose accepted suggestions reach `target_precision` on validation;
    below it a suggestion is flagged needs_review. NOTHING when no threshold reaches the target."""
    _, conf, correct = _ranked(probs, labels, eligible)
    precision = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    ok = np.nonzero(precision >= target_precision)[0]
    if len(ok) == 0:
        return NOTHING
    # The lowest confidence among the accepted prefix: unflagged(conf, threshold) then accepts exactly that prefix
    # (and any tie with its last member).
    return float(conf[ok.max()])


def precision_lower_bound(right: int, accepted: int, delta: float) -> float:
    """One-sided (1 - delta) Clopper-Pearson lower bound of a precision seen as `right` of `accepted`."""
    from scipy.stats import beta  # here: recommend imports this module for `unflagged` and needs no scipy

    return float(beta.ppf(delta, right, accepted - right + 1)) if right > 0 else 0.0


def review_threshold_bound(probs, labels, target_precision: float, delta: float = 0.1,
                           sequential: bool = True, groups: list[str] | None = None, eligible=None) -> float:
    """The review threshold with a confidence guarantee instead of a point estimate: the lowest top-probability
    threshold whose accepted validation answers have a Clopper-Pearson lower bound of precision >= target at
    confidence 1 - delta. `sequential` (Learn then Test, Angelopoulos et al. 2021: fixed-sequence testing from the
    most confident threshold down, stopping at the first that fails) makes the guarantee hold for the threshold
    chosen, not only for each one tried; the sequence starts where enough answers are accepted that a flawless record
    could pass at all (ln delta / ln target of them: 45 at 0.95 and delta 0.1), a point read from the confidences
    alone, not from which answers are right. `groups` (the photos' rulings) counts each ruling once, at its share of
    right answers: photos of one ruling are near-copies, not independent trials. `eligible`: the photos that may be
    answered at all (not unknown). NOTHING when none passes."""
    order, confs, right = _ranked(probs, labels, eligible)
    return bound_on_ranking(confs, right, target_precision, delta, sequential,
                            None if groups is None else [groups[int(i)] for i in order])


def bound_on_ranking(confs, right, target_precision: float, delta: float = 0.1, sequential: bool = True,
                     groups: list[str] | None = None) -> float:
    """review_threshold_bound's rule over any confidence: `confs` sorted most confident first, `right` (1/0) and
    `groups` (or None) in the same order. The lowest confidence whose accepted prefix passes the bound; NOTHING
    when none does."""
    best = NOTHING
    n_min = math.ceil(math.log(delta) / math.log(target_precision))
    for i, c in enumerate(confs):
        if i + 1 < len(confs) and confs[i + 1] == c:
            continue  # a threshold accepts every photo at its confidence: test only where the next one differs
        if groups is None:
            k, n = float(right[: i + 1].sum()), i + 1
        else:
            seen: dict = {}
            for j in range(i + 1):
                seen.setdefault(groups[j], []).append(right[j])
            n = len(seen)
            k = sum(sum(v) / len(v) for v in seen.values())
        if n < n_min:
            continue
        if precision_lower_bound(round(k, 6), n, delta) >= target_precision:
            best = float(c)
        elif sequential:
            break
    return float(best)


REVIEW_METHODS = ("point", "clopper_pearson", "ltt")


def fit_review_threshold(probs, labels, cal, rulings: list[str] | None = None, eligible=None) -> float:
    """The review threshold a run stores, as `calibration.*` asks: `method` point (the validation precision reaches
    the target), clopper_pearson (its lower bound does, at confidence 1 - `delta`) or ltt (the same, fixed-sequence
    tested so the guarantee holds for the threshold chosen); `by_ruling` counts rulings instead of photos.
    `eligible`: the validation photos not called unknown (the two thresholds are fitted together: the promise is
    about the answers that go out unflagged, and an unknown photo never does)."""
    method = str(cal.get("method", "point"))
    target = float(cal["target_precision"])
    if method == "point":
        return review_threshold(probs, labels, target, eligible)
    if method not in REVIEW_METHODS:
        raise ValueError(f"calibration.method={method!r}: choose one of {', '.join(REVIEW_METHODS)}")
    groups = rulings if cal.get("by_ruling", False) else None
    return review_threshold_bound(probs, labels, target, float(cal.get("delta", 0.1)),
                                  sequential=method == "ltt", groups=groups, eligible=eligible)
