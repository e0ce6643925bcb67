"""The frozen networks through ONNX Runtime on the CPU (hsflow/core/runtime.py): the same features as torch within
runtime.TOLERANCE, the same test top-1, the export cached and keyed like the feature cache, and one warning line
(then torch) when the runtime cannot be used."""
import sys
from pathlib import Path

import pytest
import torch

from hsflow.core import runtime as rt
from hsflow.data.transforms import build_preprocess, spec_id
from hsflow.core.images import open_rgb
from hsflow.models.backbones import build_backbone, split_backbone

SPEC = {"size": 224, "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3}


def _photos(store, n=8):
    pre = build_preprocess(SPEC)
    files = sorted((store / "photos").glob("*.jpg"))[:n]
    return torch.stack([pre(open_rgb(p, draft_size=SPEC["resize"])) for p in files])


@pytest.mark.parametrize("unfreeze", [0, 1])
def test_runtime_features_equal_torch_and_the_export_is_cached(tiny_store, tmp_path, unfreeze, capsys):
    net = split_backbone(build_backbone("efficientnet_lite0"), unfreeze, spec_id(SPEC))
    x = _photos(tiny_store)
    shape = tuple(x.shape[1:])
    onnx = rt.frozen_network(net.prefix, cache_dir=tmp_path, cache_id=net.cache_id, input_shape=shape)
    ours, theirs = onnx(x), rt.torch_forward(net.prefix, "cpu")(x)
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < rt.TOLERANCE
    path = rt.prefix_path(tmp_path, net.cache_id, shape)
    assert path.is_file() and net.cache_id in path.name and f"opset{rt.OPSET}" in path.name
    assert f"ort{rt.ort_version()}" in path.name and "3x224x224" in path.name
    stamp = path.stat().st_mtime_ns
    again = rt.frozen_network(net.prefix, cache_dir=tmp_path, cache_id=net.cache_id, input_shape=shape)
    assert path.stat().st_mtime_ns == stamp  # exported once, then read from the cache
    assert (again(x[:3]) - ours[:3]).abs().max().item() < rt.TOLERANCE
    assert "warning" not in capsys.readouterr().err


def test_top1_through_the_runtime_equals_torch(tiny_run):
    """The trained tiny model's head over ONNX Runtime features and over torch features: the same top-1 on every
    photo of the tiny store (test split included)."""
    import mlflow

    from hsflow.models.bundle import load_model

    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    pre = model.preprocess()
    x = torch.stack([pre(open_rgb(p, draft_size=model.meta["preprocess"]["resize"]))
                     for p in sorted((tiny_run["store"] / "photos").glob("*.jpg"))])
    prefix, rest = model.net[0], torch.nn.Sequential(model.net[1], model.net[2])
    feats_ort = rt.frozen_network(prefix, cache_dir=tiny_run["tracking_dir"], cache_id="tiny",
                                  input_shape=tuple(x.shape[1:]))(x)
    feats_torch = rt.torch_forward(prefix, "cpu")(x)
    assert (feats_ort - feats_torch).abs().max().item() < rt.TOLERANCE
    with torch.inference_mode():
        assert torch.equal(rest(feats_ort).argmax(1), rest(feats_torch).argmax(1))


def test_runtime_not_installed_falls_back_to_torch_with_one_line(tiny_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what Python does for a package that is not installed
    monkeypatch.setattr(rt, "_warned", set())
    net = split_backbone(build_backbone("efficientnet_lite0"), 0, spec_id(SPEC))
    x = _photos(tiny_store, 2)
    for _ in range(2):
        forward = rt.frozen_network(net.prefix, cache_dir=tmp_path, cache_id=net.cache_id,
                                    input_shape=tuple(x.shape[1:]))
    assert torch.equal(forward(x), rt.torch_forward(net.prefix, "cpu")(x))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime is not installed" in err[0] and err[0].startswith("warning:")
    assert not (tmp_path / "onnx").exists()


def test_runtime_choice_is_checked():
    with pytest.raises(ValueError, match="runtime='tvm'"):
        rt.frozen_network(torch.nn.Identity(), cache_dir="/nonexistent", cache_id="x", input_shape=(3, 4, 4),
                          runtime="tvm")


def test_saved_model_answers_through_the_runtime_as_torch_does(tiny_run, tmp_path):
    """The model folder carries network.onnx; every door (they all call iter_recommend) answers through it on a CPU
    with the codes, probabilities, flags and precedents the torch path gives, and a corrupt photo is one error."""
    import mlflow

    from hsflow.models.bundle import ONNX, load_model
    from hsflow.serving.recommend import as_json, recommend

    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    assert model.onnx is not None and model.onnx.path.name == ONNX
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    photos = sorted((tiny_run["store"] / "photos").glob("*.jpg"))[::4] + [bad]
    through_onnx = [as_json(r) for r in recommend(model, photos, 3, device="cpu", num_workers=0)]
    model.runtime = "torch"
    through_torch = [as_json(r) for r in recommend(model, photos, 3, device="cpu", num_workers=0)]
    assert through_onnx[-1]["error"] and through_onnx[-1] == through_torch[-1]
    for a, b in zip(through_onnx[:-1], through_torch[:-1]):
        assert [c["hs_code"] for c in a["candidates"]] == [c["hs_code"] for c in b["candidates"]]
        assert [c["probability"] for c in a["candidates"]] == pytest.approx(
            [c["probability"] for c in b["candidates"]], abs=1e-5)
        assert (a["needs_review"], a["unknown"]) == (b["needs_review"], b["unknown"])
        assert a["unknown_score"] == pytest.approx(b["unknown_score"], abs=1e-5)
        assert [p["rrdc_no"] for p in a["precedents"]] == [p["rrdc_no"] for p in b["precedents"]]


def test_numpy_preprocessing_equals_torchvision(tiny_store):
    """The torch-free input path (hsflow.core.images.preprocess_array) gives torchvision's numbers to the bit, for the
    Lite configs' sizes and photos of every orientation."""
    import numpy as np
    from PIL import Image

    from hsflow.core.images import preprocess_array

    photos = [open_rgb(p, draft_size=256) for p in sorted((tiny_store / "photos").glob("*.jpg"))[:4]]
    photos += [Image.new("RGB", (300, 500), (10, 200, 30)), photos[0].rotate(90, expand=True).resize((611, 257))]
    for spec in (SPEC, {"size": 240, "resize": 274, "mean": [0.5] * 3, "std": [0.5] * 3},
                 {"size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}):
        torchvision = build_preprocess(spec)
        for img in photos:
            assert np.array_equal(preprocess_array(img, spec), torchvision(img).numpy())


NO_TORCH = "import sys; sys.modules['torch'] = None\n"  # what Python does for a package that is not installed


def _model_folder(tiny_run, tmp_path, unknown: bool = True):
    import json
    import shutil

    import mlflow

    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{tiny_run['run_id']}/model", dst_path=str(tmp_path)))
    meta_path = next(folder.rglob("meta.json"))
    if not unknown:
        meta = json.loads(meta_path.read_text())
        meta.pop("unknown", None)
        meta_path.write_text(json.dumps(meta))
    (meta_path.parent / "weights.pt").unlink()  # nothing but network.onnx can answer
    shutil.rmtree(folder / "code", ignore_errors=True)
    return meta_path.parent


def test_the_saved_network_answers_without_torch(tiny_run, tmp_path):
    """With torch absent, a model folder loads from meta.json + network.onnx + the numpy precedent index and gives,
    through the numpy seam (preprocess_array, answer_arrays), the probabilities and precedents torch gives."""
    import json
    import subprocess

    from hsflow.models.bundle import load_model

    folder = _model_folder(tiny_run, tmp_path, unknown=False)
    photo = sorted((tiny_run["store"] / "photos").glob("*.jpg"))[1]
    script = NO_TORCH + (
        "import json; from hsflow.models.bundle import HSModel; from hsflow.core.images import open_rgb\n"
        f"m = HSModel.load({str(folder)!r}); assert m.net is None\n"
        f"x = m.preprocess_array(open_rgb({str(photo)!r}, draft_size=m.meta['preprocess']['resize']))[None]\n"
        "p, e, _ = m.answer_arrays(x)\n"
        "print(json.dumps({'p': p[0].tolist(), 'prec': [r['rrdc_no'] for r in m.precedents.nearest(e)[0]]}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    import mlflow

    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    model.runtime = "torch"
    x = model.preprocess()(open_rgb(photo, draft_size=model.meta["preprocess"]["resize"]))[None]
    probs, emb = model.probabilities_and_embeddings(x)
    assert got["p"] == pytest.approx(probs[0].tolist(), abs=1e-5)
    assert got["prec"] == [r["rrdc_no"] for r in model.precedents.nearest(emb)[0]]


def test_recommend_answers_without_torch_as_with_it(tiny_run, tmp_path):
    """The whole answer (codes, probabilities, outcome, unknown score, precedents) from a model folder without
    weights.pt, in a Python where torch cannot be imported, equals the torch path's."""
    import json
    import subprocess

    from hsflow.models.bundle import load_model
    from hsflow.serving.recommend import as_json, recommend

    folder = _model_folder(tiny_run, tmp_path)
    photos = [str(p) for p in sorted((tiny_run["store"] / "photos").glob("*.jpg"))[1:4]]
    script = NO_TORCH + ("import json; from hsflow.serving.recommend import as_json, recommend\n"
                         f"print(json.dumps([as_json(r) for r in recommend({str(folder)!r}, {photos!r}, 3)]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    without = json.loads(proc.stdout.strip().splitlines()[-1])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    model.runtime = "torch"
    for a, b in zip(without, [as_json(r) for r in recommend(model, photos, 3, device="cpu", num_workers=0)]):
        assert [c["hs_code"] for c in a["candidates"]] == [c["hs_code"] for c in b["candidates"]]
        assert [c["probability"] for c in a["candidates"]] == pytest.approx(
            [c["probability"] for c in b["candidates"]], abs=1e-5)
        assert [a[k] for k in ("needs_review", "unknown", "outcome")] == [b[k] for k in ("needs_review", "unknown",
                                                                                       "outcome")]
        assert a["unknown_score"] == pytest.approx(b["unknown_score"], abs=1e-4)
        assert [p["rrdc_no"] for p in a["precedents"]] == [p["rrdc_no"] for p in b["precedents"]]
