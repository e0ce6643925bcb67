"""Temperature scaling, ECE and the review threshold on synthetic logits with a known answer."""
import pytest
import torch

from hsflow.calibration import ece, fit_temperature, review_threshold


def test_temperature_undoes_overconfidence():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2000,), generator=g)
    true_logits = torch.randn(2000, 5, generator=g)
    true_logits[torch.arange(2000), labels] += 1.5
    # Draw labels from the calibrated distribution, then make the model 3x overconfident.
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3, labels)
    assert 2.5 < t < 3.5
    before = ece(torch.softmax(true_logits * 3, 1), labels)
    after = ece(torch.softmax(true_logits * 3 / t, 1), labels)
    assert after < before / 2


def test_review_threshold_reaches_target_precision():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0, 1, 0])  # the 0.6 one is wrong
    assert review_threshold(probs, labels, 1.0) == pytest.approx(0.7)
    assert review_threshold(probs, labels, 0.8) == pytest.approx(0.55)
    assert review_threshold(torch.tensor([[0.9, 0.1]]), torch.tensor([1]), 0.95) == 1.0
