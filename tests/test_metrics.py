"""Top-1 and top-3 stay separate metrics even when their first batches agree (a torchmetrics grouping trap)."""
import torch

from hsflow.models.classifier import _metrics


def test_top3_is_not_merged_into_top1():
    m = _metrics(5, "test/")
    y = torch.tensor([0, 1])
    m.update(torch.eye(5)[:2] * 5, y)  # first batch: both right at top-1, so top-1 and top-3 states coincide
    wrong_top1 = torch.tensor([[1.0, 3.0, 2.0, 0.0, 0.0]])  # class 0 is second: a top-3 hit, a top-1 miss
    m.update(wrong_top1, torch.tensor([0]))
    out = m.compute()
    assert abs(float(out["test/top1"]) - 2 / 3) < 1e-6
    assert float(out["test/top3"]) == 1.0
