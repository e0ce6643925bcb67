"""Calibration on the validation split: temperature scaling, ECE, and the review threshold."""
from __future__ import annotations

import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T minimizing the validation NLL of softmax(logits / T) (Guo et al., 2017)."""
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


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    # Imported here: recommend imports this module for `unflagged` and needs no torchmetrics.
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins))


def unflagged(top_probability, threshold: float):
    """The review rule, the one place it is written: an answer needs no review when its top calibrated probability
    reaches the threshold (`>=`); below it, `needs_review`. Works on a float or a tensor of them. Fitting
    (review_threshold), the test figures (hsflow.evaluation) and every answer (hsflow.recommend) apply this."""
    return top_probability >= threshold


def review_threshold(probs: torch.Tensor, labels: torch.Tensor, target_precision: float) -> float:
    """The lowest top-probability threshold whose accepted suggestions reach `target_precision` on validation;
    below it a suggestion is flagged needs_review. 1.0 when no threshold reaches the target."""
    conf, pred = probs.max(dim=1)
    order = torch.argsort(conf, descending=True)
    correct = (pred[order] == labels[order]).float()
    precision = torch.cumsum(correct, 0) / torch.arange(1, len(correct) + 1)
    ok = torch.nonzero(precision >= target_precision).flatten()
    if len(ok) == 0:
        return 1.0
    # The lowest confidence among the accepted prefix: unflagged(conf, threshold) then accepts exactly that prefix
    # (and any tie with its last member).
    return float(conf[order][ok.max()])
