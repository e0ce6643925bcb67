"""Honest figures: intervals over rulings, the review flag on the test period, and choices that never read it."""
import json
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import tiny_overrides, train_cli
from hsflow.training.evaluation import ruling_interval, period_figures


def test_interval_is_a_point_without_variation_and_covers_the_estimate():
    assert ruling_interval([1, 1, 1, 1], ["a", "a", "b", "c"]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    correct = rng.random(150) < 0.8
    rulings = [f"r{i // 3}" for i in range(150)]
    acc, low, high = ruling_interval(correct, rulings)
    assert acc == correct.mean() and low < acc < high and 0.05 < high - low < 0.25


def test_interval_resamples_rulings_not_photos():
    """10 rulings of 10 photos, half all right and half all wrong: only 10 independent answers, so the interval
    must be far wider than 100 independent photos would give (about +-0.1)."""
    correct = np.repeat([1, 0] * 5, 10)
    rulings = [f"r{i // 10}" for i in range(100)]
    acc, low, high = ruling_interval(correct, rulings)
    per_photo = ruling_interval(correct, [f"p{i}" for i in range(100)])
    assert acc == 0.5 and high - low > 0.45 and (per_photo[2] - per_photo[1]) < 0.25


def test_review_figures_count_what_the_flag_lets_through():
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.1, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 1, 0, 1])
    f = period_figures(logits, labels, ["a", "b", "c", "d"], ["0808100000", "0401200000"], 1.0, 0.9)
    assert f["test/unflagged_coverage"] == 0.75  # the 0.1-margin photo is flagged
    assert abs(f["test/unflagged_precision"] - 2 / 3) < 1e-9 and f["test/top1"] == 0.75
    assert f["test/rulings"] == 4


def _replace_test_year(store, noise_seed: int):
    """Overwrite every 2019 photo with noise (records kept true to the files): the test period changes, nothing
    else does."""
    import hashlib

    rng = np.random.default_rng(noise_seed)
    for path in (store / "rulings").glob("*.json"):
        rec = json.loads(path.read_text())
        if rec["fields"]["ENFR_DT"] < "2019-01-01":
            continue
        for ph in rec["photos"]:
            img = Image.fromarray(rng.integers(0, 255, (ph["height"], ph["width"], 3), dtype=np.uint8))
            img.save(store / "photos" / ph["file"], "JPEG")
            ph["sha256"] = hashlib.sha256((store / "photos" / ph["file"]).read_bytes()).hexdigest()
        path.write_text(json.dumps(rec))


@pytest.mark.slow
def test_choices_never_read_the_test_period(tiny_store, session_cache, tmp_path):
    """Temperature and review threshold come from validation: replacing the 2019 photos by noise (and refitting on
    train + validation) changes the test figures and leaves every fitted choice exactly as it was."""
    noisy = tmp_path / "noisy"
    shutil.copytree(tiny_store, noisy)
    _replace_test_year(noisy, 1)
    runs = {}
    refit = ("refit.enabled=true", "refit.val_weight=3")
    for name, store, extra in (("clean", tiny_store, ()), ("noisy", noisy, refit)):
        proc = train_cli(*tiny_overrides(store, session_cache, tmp_path / name, "trainer.max_epochs=3", *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_id = proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1]
        runs[name] = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db").get_run(run_id).data
    clean, noisy_run = runs["clean"], runs["noisy"]
    for key in ("val/temperature", "val/review_threshold", "curves/top1_val", "val/ece_after"):
        assert clean.metrics[key] == noisy_run.metrics[key], key
    assert clean.metrics["test/loss"] != noisy_run.metrics["test/loss"]
    assert clean.tags["split_protocol"].startswith("date:") and noisy_run.tags["refit"] == "True"
    assert clean.metrics["test/top1_ci_low"] <= clean.metrics["test/top1"] <= clean.metrics["test/top1_ci_high"]
    assert "test/unflagged_precision" in clean.metrics and "refit_minutes" in noisy_run.metrics


def test_paired_difference_is_zero_for_the_same_model_and_positive_when_better_on_every_ruling():
    from hsflow.training.evaluation import paired_difference

    rulings = [f"r{i // 3}" for i in range(60)]
    a = [1, 1, 0] * 20
    assert paired_difference(a, a, rulings) == (0.0, 0.0, 0.0)
    better = [1, 1, 1] * 20
    diff, low, high = paired_difference(better, a, rulings)
    assert diff == pytest.approx(1 / 3) and low == high == pytest.approx(1 / 3)
    mixed = [1, 1, 1] * 10 + [1, 0, 0] * 10  # better on half the rulings, worse on the other half
    diff, low, high = paired_difference(mixed, a, rulings)
    assert diff == pytest.approx(0.0) and low < 0 < high
