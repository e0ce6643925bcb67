"""Classification metrics that stay linear in the number of photos and classes, in deterministic mode too.

torchmetrics' multiclass stat scores (macro F1, ConfusionMatrix) count (target, prediction) pairs with
`_bincount(target * C + pred, minlength=C**2)`; with `torch.use_deterministic_algorithms` on (Lightning's
`deterministic=True`) that falls back to `arange(C**2).repeat(batch, 1) == x`: a batch x C^2 tensor per step,
2.3 GB at 3,000 classes and batch 32. `TopK` keeps instead each photo's top-k class indices and its label (k + 1
integers a photo, gathered across processes by torchmetrics' "cat" reduction) and computes everything at epoch end
with `scatter_add_` over C bins (deterministic on CPU and CUDA): micro and macro top-1/top-k, macro F1, the sparse
confusion pairs, and, given training counts, accuracy by frequency band and along the HS hierarchy.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _counts(index: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """bincount by scatter_add_: deterministic everywhere, no C^2 fallback."""
    w = torch.ones_like(index, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return torch.zeros(size, dtype=torch.float64, device=index.device).scatter_add_(0, index, w)


class TopK(Metric):
    """Accumulates top-k predictions; `compute()` returns {prefix+name: value} (see `summarize`)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int, k: int = 3, prefix: str = "", postfix: str = ""):
        super().__init__()
        self.num_classes, self.k, self.prefix, self.postfix = num_classes, min(k, num_classes), prefix, postfix
        self.add_state("topk", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.topk.append(logits.detach().topk(self.k, dim=1).indices.to(torch.int32))
        self.target.append(target.detach().to(torch.int32))

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k indices N x k, labels N) on the CPU, all processes' photos when synced."""
        if isinstance(self.topk, list) and not self.topk:  # a list before syncing, one tensor after it (DDP)
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return dim_zero_cat(self.topk).long().cpu().view(-1, self.k), dim_zero_cat(self.target).long().cpu()

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """states() over every process's photos (a no-op gather when not distributed)."""
        with self.sync_context():
            return self.states()

    def compute(self) -> dict[str, torch.Tensor]:
        topk, target = self.states()
        out = summarize(topk, target, self.num_classes)
        return {f"{self.prefix}{name}{self.postfix}": torch.tensor(v, dtype=torch.float32) for name, v in out.items()}


def summarize(topk: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top1/top3 (micro: share of photos), macro_top1/macro_top3 (mean over classes present of their recall),
    macro_f1 (torchmetrics' definition: mean F1 over classes with a photo or a prediction)."""
    n = len(target)
    if n == 0:
        return {"top1": float("nan"), "top3": float("nan"), "macro_top1": float("nan"),
                "macro_top3": float("nan"), "macro_f1": float("nan")}
    hit1 = (topk[:, 0] == target)
    hitk = (topk == target[:, None]).any(1)
    support = _counts(target, num_classes)
    present = support > 0
    tp = _counts(target, num_classes, hit1)
    tpk = _counts(target, num_classes, hitk)
    predicted = _counts(topk[:, 0], num_classes)
    fp, fn = predicted - tp, support - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    seen = denom > 0
    return {"top1": float(hit1.double().mean()), "top3": float(hitk.double().mean()),
            "macro_top1": float((tp[present] / support[present]).mean()),
            "macro_top3": float((tpk[present] / support[present]).mean()),
            "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0}


def band_of(train_counts: list[int], head_from: int, tail_below: int) -> list[str]:
    """Each class's frequency band by its training photos: head (>= head_from), tail (< tail_below), else body."""
    return ["head" if c >= head_from else "tail" if c < tail_below else "body" for c in train_counts]


def band_top1(topk: torch.Tensor, target: torch.Tensor, bands: list[str]) -> dict[str, float]:
    """Top-1 over the photos of each band's classes (micro within the band), and how many test photos it has."""
    out = {}
    hit = (topk[:, 0] == target).double()
    band = [bands[t] for t in target.tolist()]
    for name in ("head", "body", "tail"):
        mask = torch.tensor([b == name for b in band], dtype=torch.bool)
        out[f"{name}_top1"] = float(hit[mask].mean()) if mask.any() else float("nan")
        out[f"{name}_photos"] = int(mask.sum())
    return out


def hierarchy_top1(pred: torch.Tensor, target: torch.Tensor, classes: list[str], digits: int) -> float:
    """Top-1 at a coarser level of the nomenclature: the predicted code's first `digits` digits are right."""
    level = [c[:digits] for c in classes]
    p, t = pred.tolist(), target.tolist()
    return sum(level[a] == level[b] for a, b in zip(p, t)) / max(1, len(p))


def confusion_pairs(pred: torch.Tensor, target: torch.Tensor) -> list[tuple[int, int, int]]:
    """The confusion matrix as sparse (decided, predicted, count) triples: O(photos), never classes^2."""
    if len(target) == 0:
        return []
    pairs, counts = torch.unique(torch.stack([target, pred], 1), dim=0, return_counts=True)
    return [(int(a), int(b), int(c)) for (a, b), c in zip(pairs.tolist(), counts.tolist())]
