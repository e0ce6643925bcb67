"""Temperature scaling, ECE and the review threshold on synthetic logits with a known answer."""
import numpy as np
import pytest
import torch

from hsflow.models.calibration import NOTHING, ece, fit_temperature, review_threshold


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
    assert review_threshold(torch.tensor([[0.9, 0.1]]), torch.tensor([1]), 0.95) == NOTHING


def _confident(n_right: int, n_wrong_below: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n_right correct photos at falling confidence, then n_wrong_below wrong ones less confident still."""
    n = n_right + n_wrong_below
    conf = torch.linspace(0.99, 0.5, n)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.tensor([0] * n_right + [1] * n_wrong_below)
    return probs, labels


def test_clopper_pearson_lower_bound_matches_the_closed_form_when_all_are_right():
    from hsflow.models.calibration import precision_lower_bound

    # k = n: the one-sided lower bound is delta ** (1 / n)
    assert precision_lower_bound(30, 30, 0.1) == pytest.approx(0.1 ** (1 / 30))
    assert precision_lower_bound(0, 10, 0.1) == 0.0


def test_bound_threshold_needs_enough_right_answers_where_the_point_estimate_does_not():
    from hsflow.models.calibration import review_threshold_bound

    # 20 right answers: precision 1.0 (point estimate accepts all) but 0.1**(1/20) = 0.89 < 0.95: nothing passes
    probs, labels = _confident(20)
    assert review_threshold(probs, labels, 0.95) == pytest.approx(float(probs[-1, 0]))
    assert review_threshold_bound(probs, labels, 0.95, 0.1) == NOTHING
    # 60 right answers: 0.1**(1/45) >= 0.95, so the bound passes from the 45th photo on and accepts all 60
    probs, labels = _confident(60)
    assert review_threshold_bound(probs, labels, 0.95, 0.1) == pytest.approx(float(probs[-1, 0]))


def test_fixed_sequence_stops_at_the_first_failure_and_the_plain_bound_does_not():
    from hsflow.models.calibration import review_threshold_bound

    # 8 wrong answers among the first 50 (fails where testing starts), then many right ones: the plain bound
    # passes again much lower down, the fixed sequence has stopped
    conf = torch.linspace(0.99, 0.51, 800)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(800, dtype=torch.long)
    labels[:8] = 1
    assert review_threshold_bound(probs, labels, 0.95, 0.1, sequential=True) == NOTHING
    assert review_threshold_bound(probs, labels, 0.95, 0.1, sequential=False) == pytest.approx(0.51)


def test_rulings_count_once_so_near_copies_do_not_buy_confidence():
    from hsflow.models.calibration import review_threshold_bound

    probs, labels = _confident(60)
    by_photo = review_threshold_bound(probs, labels, 0.95, 0.1)
    six_rulings = [f"r{i // 10}" for i in range(60)]  # 60 right photos but only 6 rulings
    assert by_photo < 1.0
    assert review_threshold_bound(probs, labels, 0.95, 0.1, groups=six_rulings) == NOTHING


def test_the_configured_method_picks_the_threshold_a_run_stores():
    from omegaconf import OmegaConf

    from hsflow.models.calibration import fit_review_threshold, review_threshold_bound

    probs, labels = _confident(60, 5)
    cal = OmegaConf.create({"target_precision": 0.95, "method": "point", "delta": 0.1, "by_ruling": False})
    assert fit_review_threshold(probs, labels, cal) == review_threshold(probs, labels, 0.95)
    cal.method = "ltt"
    assert fit_review_threshold(probs, labels, cal) == review_threshold_bound(probs, labels, 0.95, 0.1)
    assert fit_review_threshold(probs, labels, cal) > review_threshold(probs, labels, 0.95)  # the bound costs coverage
    cal.method = "median"
    with pytest.raises(ValueError, match="calibration.method"):
        fit_review_threshold(probs, labels, cal)


def test_three_outcomes_from_one_rule():
    from hsflow.models.calibration import outcome, unflagged

    assert outcome(0.99, 0.9) == "answer" and outcome(0.5, 0.9) == "needs_review"
    assert outcome(0.99, 0.9, unknown=True) == "unknown"  # an unknown photo is never answered, however confident
    top, flags = np.array([0.99, 0.95, 0.5]), np.array([False, True, False])
    assert unflagged(top, 0.9, flags).tolist() == [True, False, False]
    assert unflagged(torch.tensor(top), 0.9, flags).tolist() == [True, False, False]  # torch in, torch out
    assert unflagged(top, 0.9).tolist() == [True, True, False]


def test_the_review_threshold_is_fitted_on_the_photos_not_called_unknown():
    from hsflow.models.calibration import fit_review_threshold

    # The two most confident answers are wrong but called unknown: they never go out, so they cost no precision.
    probs = torch.tensor([[0.99, 0.01], [0.98, 0.02]] + [[0.9 - 0.01 * i, 0.1 + 0.01 * i] for i in range(8)])
    labels = torch.tensor([1, 1] + [0] * 8)
    cal = {"method": "point", "target_precision": 0.95}
    assert fit_review_threshold(probs, labels, cal) == NOTHING  # counted, the wrong pair sinks every threshold
    eligible = np.array([False, False] + [True] * 8)
    assert fit_review_threshold(probs, labels, cal, eligible=eligible) == pytest.approx(0.83)
