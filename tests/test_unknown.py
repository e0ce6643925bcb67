"""The unknown score: far photos are flagged, the threshold comes from validation only, it survives save/load, and
every door (hsflow.recommend, the MLflow pyfunc) takes the same decision."""
import hashlib
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import ROOT, tiny_overrides, train_cli
from hsflow.serving import recommend as R
from hsflow.models import unknown
from hsflow.data.builder import build_dataset
from hsflow.models.bundle import HSModel
from test_configs import compose_cfg

OOD = ROOT / "data" / "ood"
FAR = [OOD / "gen_texture_ground.jpg", OOD / "gen_checkerboard.jpg", OOD / "document_scanned_page.jpg"]


@pytest.fixture(scope="module")
def tiny_model(tiny_run) -> HSModel:
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]}):
        return R.load(f"runs:/{tiny_run['run_id']}/model")


def split_rows(tiny_run, tmp_path, split):
    import csv

    client = MlflowClient(tiny_run["tracking_uri"])
    path = client.download_artifacts(tiny_run["run_id"], "dataset/split.csv", str(tmp_path))
    return [r for r in csv.DictReader(open(path)) if r["split"] == split and r["view"] == "0"]


def logged_meta(tracking_uri: str, run_id: str, dst: Path) -> tuple[dict, dict]:
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tracking_uri}):
        model = R.load(f"runs:/{run_id}/model")
    return model.meta["unknown"], model.unknown.arrays


def test_threshold_calls_at_most_the_allowed_share_of_validation_unknown():
    scores = np.arange(100, dtype=np.float32)
    t = unknown.fit_threshold(scores, 0.05)
    assert int((scores > t).sum()) == 5 and t == 94
    assert unknown.fit_threshold(scores, 0.10) == 89
    assert unknown.fit_threshold(np.array([0.3, 0.1, 0.2]), 0.05) == pytest.approx(0.3)  # < 20 photos: the max
    with pytest.raises(ValueError, match="validation split is empty"):
        unknown.fit_threshold(np.empty(0))


def synthetic(seed=0, codes=6, per_code=40, dim=32):
    """Photos of `codes` products as embeddings around their own centres, logits from a linear head that knows the
    first codes - 1 of them; the last code is the one held out of training."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(codes, dim)) * 3
    def photos(c, n):
        return centres[c] + rng.normal(size=(n, dim))
    train = np.concatenate([photos(c, per_code) for c in range(codes - 1)])
    labels = np.repeat(np.arange(codes - 1), per_code)
    head = centres[: codes - 1] / 3  # a head that points at the trained centres
    val = np.concatenate([photos(c, 8) for c in range(codes - 1)])
    new = photos(codes - 1, 30)
    known = np.concatenate([photos(c, 6) for c in range(codes - 1)])
    return train, labels, val, head, new, known


@pytest.mark.parametrize("method", unknown.METHODS)
def test_each_score_ranks_a_held_out_code_above_the_trained_ones(method):
    train, labels, val, head, new, known = synthetic()
    scorer = unknown.fit(train, labels, val, val @ head.T, 1.0, method, 0.10, pca_dim=16)
    s_new, s_known = scorer.score(new, new @ head.T), scorer.score(known, known @ head.T)
    assert unknown.auroc(s_known, s_new) > 0.8, method
    assert scorer.val_rate <= 0.10 and scorer.decide(s_new).mean() > scorer.decide(s_known).mean()
    comps = scorer.components(new, new @ head.T)
    assert set(comps) == set(unknown.METHODS) and np.allclose(comps[method], s_new, atol=1e-6)


def test_relative_mahalanobis_is_the_class_distance_minus_the_background_distance():
    train, labels, val, head, new, _ = synthetic(seed=1)
    arrays = unknown.gaussians(train, labels, pca_dim=8, shrinkage=0.0, normalize="l2")
    x = unknown._l2(new[:3]).astype(np.float64)
    xn = unknown._l2(train).astype(np.float64)
    basis = np.linalg.svd(xn - xn.mean(0), full_matrices=False)[2][:8].T
    z, zt = (x - xn.mean(0)) @ basis, (xn - xn.mean(0)) @ basis
    means = np.stack([zt[labels == c].mean(0) for c in range(labels.max() + 1)])
    within = np.cov((zt - means[labels]).T, bias=True)
    cls = np.min([((z - m) @ np.linalg.inv(within) * (z - m)).sum(1) for m in means], axis=0)
    bg = (z @ np.linalg.inv(np.cov(zt.T, bias=True)) * z).sum(1)
    scorer = unknown.UnknownScorer("rmd", 0.0, arrays)
    assert np.allclose(scorer.rmd(new[:3]), cls - bg, rtol=1e-3, atol=1e-3)


def test_a_refit_scorer_learns_validation_but_keeps_the_reference_threshold(tmp_path):
    """make train's refit: the shipped Gaussians learn the validation photos, from a later photo collection (all
    shifted alike), while the threshold and the validation reference come from the fit that never saw them. Later
    photos of trained codes are then flagged less, a held-out code's photos still caught."""
    train, labels, val, head, new, known = synthetic(seed=1)
    shift = np.random.default_rng(101).normal(size=train.shape[1]) * 1.5
    val, new, known = val + shift, new + shift, known + shift
    val_labels = np.repeat(np.arange(len(head)), 8)
    plain = unknown.fit(train, labels, val, val @ head.T, 1.0, "rmd", 0.10, pca_dim=16, normalize="none")
    refit = unknown.fit(train, labels, val, val @ head.T, 1.0, "rmd", 0.10, pca_dim=16, val_labels=val_labels,
                        normalize="none")
    assert refit.threshold == plain.threshold and np.array_equal(refit.reference["score"], plain.reference["score"])
    assert refit.arrays["bank"].shape[0] == len(train) + len(val)
    flagged = {n: s.decide(s.score(known, known @ head.T)).mean() for n, s in (("plain", plain), ("refit", refit))}
    assert flagged["refit"] < flagged["plain"], flagged
    assert refit.decide(refit.score(new, new @ head.T)).mean() > 0.9
    refit.save(tmp_path)
    back = unknown.UnknownScorer.load(tmp_path, refit.meta())
    assert back.normalize == "none" and np.allclose(back.score(new, new @ head.T), refit.score(new, new @ head.T))


def test_fused_score_is_the_mean_of_validation_quantiles():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    assert unknown.quantile(ref, np.array([0.0, 2.0, 2.5, 4.0])).tolist() == [0.125, 0.375, 0.5, 0.875]
    assert unknown.quantile(ref, np.array([5.0, 6.0])).tolist() == [1.875, 2.875]  # beyond: the upper half's spread
    assert unknown.auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert unknown.fpr_at_tpr(np.array([0.1, 0.35]), np.array([0.3, 0.4]), 0.95) == 0.5


def test_a_photo_far_outside_the_training_data_is_unknown(tiny_model, tiny_run, tmp_path, capsys):
    val = [r["path"] for r in split_rows(tiny_run, tmp_path, "val")]
    recs = R.recommend(tiny_model, FAR + val, top_k=2, num_workers=0)
    far, known = recs[: len(FAR)], recs[len(FAR):]
    t = tiny_model.unknown.threshold
    for r in far:
        assert r.unknown and r.needs_review and r.unknown_score > t, (r.image, r.unknown_score, t)
        assert len(r.candidates) == 2 and all(c["nearest_only"] for c in r.candidates)  # listed, marked
    # Fewer than 20 validation photos: the threshold is their highest score, so none of them is unknown.
    assert known and not any(r.unknown for r in known) and all(r.unknown_score <= t for r in known)
    assert not any(c["nearest_only"] for r in known for c in r.candidates)

    assert R.main(["--model", tiny_model_dir(tiny_model, tmp_path), "--top-k", "2", str(FAR[0]), val[0]]) == 0
    out = capsys.readouterr().out.split("\n\n")
    assert out[0].splitlines()[0] == f"{FAR[0]}  {R.UNKNOWN_MARK}  [NEEDS REVIEW]"
    assert "only the nearest trained ones" in out[0].splitlines()[1]
    assert "UNKNOWN" not in out[1]

    assert R.main(["--model", tiny_model_dir(tiny_model, tmp_path), "--format", "json", str(FAR[0])]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["unknown"] is True and d["needs_review"] is True and d["unknown_score"] > t
    assert all(c["nearest_only"] is True for c in d["candidates"])


def tiny_model_dir(model: HSModel, tmp_path: Path) -> str:
    folder = tmp_path / "model"
    if not folder.exists():
        model.save(folder)
    return str(folder)


def test_group_by_folder_scores_the_mean_of_its_photos(tiny_model, tiny_run, tmp_path):
    val = [Path(r["path"]) for r in split_rows(tiny_run, tmp_path, "val")]
    for name, files in {"textures": FAR, "trained": val[:3], "mixed": [FAR[0], *val[:3]]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / name / f.name)
    each = R.recommend(tiny_model, [tmp_path / n for n in ("textures", "trained", "mixed")], num_workers=0)
    groups = {Path(g.image).name: g for g in R.recommend(tiny_model, [tmp_path], group_by="folder", num_workers=0)}
    for name, g in groups.items():
        scores = [r.unknown_score for r in each if Path(r.image).parent.name == name]
        assert g.unknown_score == pytest.approx(sum(scores) / len(scores), abs=1e-6)
        assert g.unknown == (g.unknown_score > tiny_model.unknown.threshold)
        assert g.to_dict()["unknown"] == g.unknown and (g.needs_review or not g.unknown)
    assert groups["textures"].unknown and not groups["trained"].unknown


def test_the_score_survives_save_and_load(tiny_model, tmp_path):
    x = torch.stack([tiny_model.preprocess()(Image.open(f).convert("RGB")) for f in FAR[:2]])
    files = tiny_model.save(tmp_path / "m")
    assert {"meta.json", "unknown.npz", "weights.pt"} <= {f.name for f in files}
    back = HSModel.load(tmp_path / "m")
    assert back.meta["unknown"] == tiny_model.meta["unknown"] == json.loads((tmp_path / "m" / "meta.json").read_text(
    ))["unknown"]
    assert back.meta["unknown"]["method"] == "rmd_msp"  # the default
    assert set(back.unknown.arrays) == set(tiny_model.unknown.arrays) >= {"bank", "proj", "means", "val_msp"}
    assert all(np.array_equal(back.unknown.arrays[k], v) for k, v in tiny_model.unknown.arrays.items())
    p1, s1 = tiny_model.outputs(x)
    p2, s2 = back.outputs(x)  # (the fixture's network may run channels-last after recommend: float-level noise)
    assert torch.allclose(s1, s2, atol=1e-5) and torch.allclose(p1, p2, atol=1e-5)
    assert np.array_equal(tiny_model.unknown.decide(s1), back.unknown.decide(s2)) and back.unknown.decide(s2).all()
    # The embedding is the penultimate output: the head applied to it gives the logits.
    with torch.inference_mode():
        assert torch.allclose(back.net[2](back.embedding(x)), back.logits(x), atol=1e-5)
    # A model saved without a scorer (an older run) loads, and nothing is ever unknown.
    HSModel(tiny_model.net, dict(tiny_model.meta)).save(tmp_path / "plain")
    plain = HSModel.load(tmp_path / "plain")
    assert plain.unknown is None and "unknown" not in plain.meta and not (tmp_path / "plain" / "unknown.npz").exists()
    assert [r.unknown for r in R.recommend(plain, FAR[:1], num_workers=0)] == [False]


def test_recommend_and_the_mlflow_pyfunc_take_the_same_decision(tiny_run, tiny_model, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    shots = [*FAR, *sorted((tiny_run["store"] / "photos").glob("*.jpg"))[:3]]
    served = mlflow.pyfunc.load_model(f"runs:/{tiny_run['run_id']}/model").predict(
        pd.DataFrame({"path": list(map(str, shots))}))
    recs = R.recommend(tiny_model, shots, num_workers=0)
    flags = [d["unknown"] for d in served]  # the pyfunc answers with recommend's JSON object per photo
    assert flags == [r.unknown for r in recs] and any(flags) and not all(flags)
    assert [d["unknown_score"] for d in served] == pytest.approx([r.unknown_score for r in recs], abs=1e-5)


def test_training_logs_the_unknown_rates(tiny_run):
    m = MlflowClient(tiny_run["tracking_uri"]).get_run(tiny_run["run_id"]).data.metrics
    assert m["val/unknown_rate"] <= 0.10 and 0 <= m["test/unknown_rate"] <= 1 and m["val/unknown_threshold"] > 0
    assert "test/heldout_unknown_rate" not in m  # no code was held out


def _replace_test_photos_with_textures(store: Path) -> int:
    """Every photo of the test period (2019) becomes a different generated texture; the records follow."""
    n = 0
    for path in sorted((store / "rulings").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["fields"]["ENFR_DT"] < "2019":
            continue
        for p in rec["photos"]:
            g = torch.Generator().manual_seed(n)
            img = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).resize((256, 256))
            img.save(store / "photos" / p["file"], quality=90)
            data = (store / "photos" / p["file"]).read_bytes()
            p.update(sha256=hashlib.sha256(data).hexdigest(), width=256, height=256, bytes=len(data))
            n += 1
        path.write_text(json.dumps(rec))
    return n


def test_the_threshold_is_fitted_on_validation_only(tiny_run, tiny_store, session_cache, tmp_path):
    """The same training with every test-period photo replaced by noise: same bank and threshold, while the test
    photos themselves are now all unknown (so the change did reach the run)."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    assert _replace_test_photos_with_textures(store) >= 3
    proc = train_cli(*tiny_overrides(store, session_cache, tmp_path, "trainer.max_epochs=3"))  # as tiny_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1].split()[0].removeprefix("run_id=")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    changed, changed_bank = logged_meta(uri, run_id, tmp_path)
    base, base_bank = logged_meta(tiny_run["tracking_uri"], tiny_run["run_id"], tmp_path)
    assert changed["threshold"] == base["threshold"]
    assert all(np.array_equal(changed_bank[k], v) for k, v in base_bank.items())
    m_changed = MlflowClient(uri).get_run(run_id).data.metrics
    m_base = MlflowClient(tiny_run["tracking_uri"]).get_run(tiny_run["run_id"]).data.metrics
    assert m_changed["test/unknown_rate"] == 1.0 > m_base["test/unknown_rate"]
    assert m_changed["val/unknown_rate"] == m_base["val/unknown_rate"]


def test_held_out_codes_are_left_out_of_every_split(tiny_store, tmp_path):
    cfg = compose_cfg('dataset.exclude_codes=["2009120000"]')
    spec = build_dataset(cfg.dataset, tiny_store, cache_dir=tmp_path, verbose=False)
    assert spec.classes == ["0401200000", "0808100000"]
    assert not any("2009120000" in s.path for s in spec.samples)
    samples, photos = unknown.heldout_photos(compose_cfg('dataset.exclude_codes=["2009120000"]',
                                                         f"paths.raw_store={tiny_store}"))
    assert len(samples) == len(list((tiny_store / "photos").glob("2009120000_*"))) > 0
    with pytest.raises(ValueError, match="'200912' is not a 10-digit HS code"):
        build_dataset(compose_cfg("dataset.exclude_codes=[200912]").dataset, tiny_store, cache_dir=tmp_path)
