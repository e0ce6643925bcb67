"""The portal's scale: metrics that stay cheap at 3,000 classes in deterministic mode, DDP over two CPU processes,
the long-tail policy (rare codes, singletons in both split protocols, every dropped code named), and a plot that
fails without losing the trained run."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics

from conftest import PY, ROOT, tiny_overrides
from hsflow.data.builder import build_dataset
from hsflow.data.datamodule import HSDataModule
from hsflow.models.metrics import TopK, band_of, band_top1, confusion_pairs
from hsflow.models.classifier import HSClassifier, build_head
from hsflow.data.store import import_archive
from hsflow.data.synth import generate
from hsflow.core.timing import peak_rss_mb
from test_configs import compose_cfg


def test_topk_agrees_with_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(400, 12, generator=g), torch.randint(0, 12, (400,), generator=g)
    logits[torch.arange(200), y[:200]] += 2  # half the photos right, so the figures are not all chance
    m = TopK(12, 3, "t_")
    m.update(logits[:150], y[:150])
    m.update(logits[150:], y[150:])
    out = m.compute()
    ref = {"t_top1": torchmetrics.Accuracy(task="multiclass", num_classes=12),
           "t_top3": torchmetrics.Accuracy(task="multiclass", num_classes=12, top_k=3),
           "t_macro_top1": torchmetrics.Accuracy(task="multiclass", num_classes=12, average="macro"),
           "t_macro_top3": torchmetrics.Accuracy(task="multiclass", num_classes=12, average="macro", top_k=3),
           "t_macro_f1": torchmetrics.F1Score(task="multiclass", num_classes=12, average="macro")}
    for key, metric in ref.items():
        assert abs(float(out[key]) - float(metric(logits, y))) < 1e-5, key
    pairs = confusion_pairs(logits.argmax(1), y)
    assert sum(c for _, _, c in pairs) == 400 and all(c > 0 for _, _, c in pairs)


def test_frequency_bands():
    bands = band_of([500, 50, 3, 120], head_from=100, tail_below=10)
    assert bands == ["head", "body", "tail", "head"]
    topk = torch.tensor([[0], [1], [0], [3], [2]])
    out = band_top1(topk, torch.tensor([0, 1, 2, 3, 2]), bands)
    assert out["head_top1"] == 1.0 and out["body_top1"] == 1.0 and out["tail_top1"] == 0.5
    assert (out["head_photos"], out["body_photos"], out["tail_photos"]) == (2, 1, 2)


def test_3000_classes_train_a_few_steps_in_deterministic_mode():
    """torchmetrics' macro stat scores would allocate batch x 3,000^2 integers per step here (2.3 GB at batch 32)."""
    classes, dim = 3000, 1280
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(n, dim, generator=g) for k, n in (("train", 320), ("val", 64), ("test", 64))}
    labels = {k: torch.randint(0, classes, (len(v),), generator=g) for k, v in feats.items()}
    module = HSClassifier(torch.nn.Identity(), build_head(dim, classes, 0, 0.5), classes,
                          functools.partial(torch.optim.RMSprop, lr=1e-4))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", deterministic=True, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    rss = peak_rss_mb()
    start = time.perf_counter()
    trainer.fit(module, datamodule=HSDataModule.from_features(feats, labels, batch_size=32))
    test = trainer.test(module, datamodule=HSDataModule.from_features(feats, labels, batch_size=32),
                        verbose=False)[0]
    took = time.perf_counter() - start
    assert torch.are_deterministic_algorithms_enabled()
    assert took < 30, f"10 steps at 3,000 classes took {took:.1f} s"
    assert peak_rss_mb() - rss < 500, "metrics must not allocate classes^2 per step"
    for key in ("test/top1", "test/top3", "test/macro_top1", "test/macro_top3", "test/macro_f1"):
        assert 0 <= test[key] <= 1, key
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([PY, str(ROOT / "tests" / "ddp_fit.py"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    # Each rank tests half the photos; the metrics gather both halves before computing.
    assert res["local_test_photos"] == 150 and res["synced_test_photos"] == 300
    assert res["test/top1"] > 0.5


# -- long-tail policy ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_tail_store(tmp_path_factory) -> Path:
    """A synthetic portal archive with a long tail (60 codes, 150 rulings: many codes with a single ruling)."""
    root = tmp_path_factory.mktemp("longtail")
    stats = generate(root / "archive", 150, 60, seed=3, photo_size=48)
    assert stats["codes_with_one_ruling"] >= 10
    import_archive(root / "archive", root / "store", short_side=None)
    return root / "store"


def _rulings_per_code(store: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in (store / "rulings").glob("*.json"):
        rec = json.loads(p.read_text())
        out.setdefault(rec["hs_code"], []).append(rec)
    return out


def _build(store, tmp_path, *overrides, capsys=None):
    cfg = compose_cfg("dataset.quality.near_duplicates.max_distance=null", *overrides)
    return build_dataset(cfg.dataset, store, cache_dir=tmp_path, verbose=capsys is not None)


@pytest.mark.parametrize("by", ["ruling", "date"])
def test_singletons_are_handled_by_both_split_protocols(long_tail_store, tmp_path, by, capsys):
    per_code = _rulings_per_code(long_tail_store)
    singles = {c: recs[0] for c, recs in per_code.items() if len(recs) == 1}
    spec = _build(long_tail_store, tmp_path, f"dataset.split.by={by}", "dataset.long_tail.min_rulings=1",
                  capsys=capsys)
    err = capsys.readouterr().err
    for code, rec in singles.items():
        splits = {s.split for s in spec.samples if spec.classes[s.label] == code}
        if by == "date" and rec["fields"]["ENFR_DT"] >= "2018-01-01":
            assert code not in spec.classes and spec.codes[code]["fate"] == "dropped"
            assert "no ruling before 2018-01-01" in spec.codes[code]["reason"] and code in err
        else:  # learned, never evaluated, and said so
            assert splits == {"train"} and spec.codes[code]["fate"] == "train_only" and code in err
    assert "train_only (singleton)" in err
    if by == "ruling":
        dropped = _build(long_tail_store, tmp_path, "dataset.split.by=ruling", "dataset.long_tail.min_rulings=1",
                         "dataset.long_tail.singletons=drop")
        assert not set(singles) & set(dropped.classes)
        assert all(dropped.codes[c]["fate"] == "dropped" and "singleton" in dropped.codes[c]["reason"]
                   for c in singles)


def test_rare_codes_go_to_the_chapter_catch_all_or_are_dropped_and_named(long_tail_store, tmp_path, capsys):
    per_code = _rulings_per_code(long_tail_store)
    rare = sorted(c for c, recs in per_code.items() if len(recs) < 3)
    spec = _build(long_tail_store, tmp_path, "dataset.split.by=ruling", "dataset.long_tail.min_rulings=3",
                  capsys=capsys)
    err = capsys.readouterr().err
    assert not set(rare) & set(spec.classes)
    assert {c[:2] + "99999999" for c in rare} <= set(spec.classes)  # the study's catch-all, per chapter
    assert all(spec.codes[c]["fate"] == "catch_all" for c in rare)
    assert f"catch_all (fewer rulings than long_tail.min_rulings): {len(rare)} codes" in err
    dropped = _build(long_tail_store, tmp_path, "dataset.split.by=ruling", "dataset.long_tail.min_rulings=3",
                     "dataset.long_tail.rare=drop", capsys=capsys)
    err = capsys.readouterr().err
    assert not any(c.endswith("99999999") for c in dropped.classes)
    line = next(ln for ln in err.splitlines() if "dropped (fewer rulings" in ln)
    assert all(c in line for c in rare[:40])  # named, not only counted
    assert dropped.codes[rare[0]]["photos"] == sum(len(r["photos"]) for r in per_code[rare[0]])
    with pytest.raises(ValueError, match="long_tail.rare"):
        _build(long_tail_store, tmp_path, "dataset.long_tail.rare=bin")


@pytest.mark.slow
def test_a_failing_plot_does_not_lose_the_trained_run(tiny_store, session_cache, tmp_path, monkeypatch):
    """A plot that raises MemoryError (as the 3,000 x 3,000 matrix did): model and run_id line still come."""
    code = ("import sys, hsflow.training.tracking as t\n"
            "def boom(*a, **k): raise MemoryError('Unable to allocate 72.0 MiB')\n"
            "t.log_chapter_confusion = boom\n"
            "from hsflow.training.train import main\n"
            "sys.argv = ['hsflow.train'] + sys.argv[1:]\n"
            "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"})
    proc = subprocess.run([PY, "-c", code, *tiny_overrides(tiny_store, session_cache, tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("run_id=")
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: plots/confusion_chapters.png")]
    assert len(warnings) == 1 and "MemoryError" in warnings[0] and "model are kept" in warnings[0]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1]
    files = {a.path for a in client.list_artifacts(run_id, "plots")} | {a.path for a in client.list_artifacts(run_id)}
    assert "plots/confused_pairs.png" in files and "plots/confusion_headings.png" in files
    assert "plots/confusion_chapters.png" not in files
    assert client.get_run(run_id).info.status == "FINISHED"
    from hsflow.serving.recommend import load  # resolves runs:/ against MLFLOW_TRACKING_URI whatever an earlier test set

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert load(f"runs:/{run_id}/model").classes == ["0401200000", "0808100000", "2009120000"]
