"""Calibration on the validation split: temperature scaling, ECE, and the review threshold."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error


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
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins))


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
    return float(conf[order][ok.max()])
