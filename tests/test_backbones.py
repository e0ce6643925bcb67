"""A backbone is one YAML + one class (docs/backbones.md): the protocol, its one-line errors, the saved model that
carries the class's module, and a backbone defined only in a test's YAML that trains, logs, exports and answers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import PY, ROOT, tiny_overrides, train_cli
from hsflow.models.backbones import build_backbone, instantiate_backbone
from hsflow.models.bundle import CODE, HSModel
from hsflow.models.network import build_network

TINY_YAML = """\
# A backbone of one's own: the class named by net._target_, its arguments beside it.
name: tiny_convnet
pretrained: false
allow_download: false
net:
  _target_: tiny_backbone.TinyConvNet
  name: ${..name}
  width: 8
  pretrained: ${..pretrained}
input_size: 64
resize_size: 64
mean: [0.5, 0.5, 0.5]
std: [0.5, 0.5, 0.5]
unfreeze: 0
concat: []
backbone_lr_scale: 0.1
head: {hidden: 0, dropout: 0.5, kind: softmax, scale: 16.0, margin: 0.2}
"""
TINY_NET = {"_target_": "tiny_backbone.TinyConvNet", "name": "tiny_convnet", "width": 8, "pretrained": False}
PRE = {"size": 64, "resize": 64, "mean": [0.5] * 3, "std": [0.5] * 3}


def tiny_meta(**extra) -> dict:
    return {"backbone": "tiny_convnet", "net": TINY_NET, "unfreeze": 0, "concat": [], "classes": ["a", "b"],
            "head": {"hidden": 0, "dropout": 0.5}, "preprocess": PRE, **extra}


def test_a_class_that_breaks_the_protocol_is_one_line():
    with pytest.raises(ValueError, match=r"^model.net._target_=tiny_backbone.NoStages: NoStages does not follow the "
                                         r"backbone protocol: it needs `stages`, a non-empty list of nn.Module"):
        instantiate_backbone({"_target_": "tiny_backbone.NoStages"})
    with pytest.raises(ValueError, match=r"'collections.OrderedDict' is not a backbone: subclass "):
        instantiate_backbone({"_target_": "collections.OrderedDict"})  # meta.json may name Backbone classes only
    with pytest.raises(ValueError, match=r"^model.net: tiny_backbone.TinyConvNet\(pretrained=...\) failed: ValueError"
                                         r": TinyConvNet has no pretrained weights"):
        instantiate_backbone({"_target_": "tiny_backbone.TinyConvNet", "pretrained": True})


def test_old_meta_without_net_rebuilds_the_same_network():
    """Models saved before meta.json recorded `net` rebuild from the backbone's name, to the same parameters."""
    spec = {"_target_": "hsflow.models.backbones.EfficientNetLite", "name": "efficientnet_lite0",
            "pretrained": True, "allow_download": True}
    meta = {"backbone": "efficientnet_lite0", "unfreeze": 1, "concat": [], "classes": ["a", "b", "c"],
            "head": {"hidden": 0, "dropout": 0.5}, "preprocess": {**PRE, "size": 224, "resize": 224}}
    torch.manual_seed(0)
    old = build_network(meta).state_dict()
    torch.manual_seed(0)
    new = build_network({**meta, "net": spec}).state_dict()  # rebuilt with pretrained=False, as the old path did
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert type(build_backbone("efficientnet_lite0", pretrained=False)).__name__ == "EfficientNetLite"


def test_saved_model_carries_the_backbone_module(tmp_path):
    """A class outside hsflow: the model folder keeps a copy of its module, and loads and answers from it."""
    net = build_network(tiny_meta()).eval()
    files = HSModel(net, tiny_meta()).save(tmp_path)
    copy = tmp_path / CODE / "tiny_backbone.py"
    assert tmp_path / CODE in files and copy.read_text() == (ROOT / "tests" / "tiny_backbone.py").read_text()
    assert (tmp_path / "network.onnx").is_file()  # the protocol's export: prefix + suffix + head in one graph
    loaded = HSModel.load(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.logits(x), net(x), atol=1e-5)


def test_a_target_that_does_not_import_is_one_line(tiny_store, tmp_path):
    proc = train_cli(*tiny_overrides(tiny_store, tmp_path / "cache", tmp_path, "model.net._target_=nosuch.Net"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: model.net._target_='nosuch.Net' is not an importable class (ModuleNotFoundError: No module "
        "named 'nosuch'): give module.Class of a backbone importable here (installed, or its folder on PYTHONPATH); "
        "docs/backbones.md"]


@pytest.mark.slow
def test_a_backbone_in_a_yaml_alone_trains_logs_exports_and_answers(tiny_store, tmp_path):
    """The issue's "done when": a user's YAML (its own config dir) names a user's class (its own folder on
    PYTHONPATH); training logs one run whose model carries network.onnx and the class's module; hsflow.recommend
    answers from the logged model in a place where that module is not importable."""
    project = tmp_path / "project"
    (project / "conf" / "model").mkdir(parents=True)
    (project / "conf" / "model" / "tiny_convnet.yaml").write_text(TINY_YAML)
    shutil.copy(ROOT / "tests" / "tiny_backbone.py", project / "tiny_backbone.py")
    path = os.pathsep.join(p for p in (str(project), os.environ.get("PYTHONPATH")) if p)
    proc = train_cli(*tiny_overrides(tiny_store, tmp_path / "cache", tmp_path, f"hydra.searchpath=[file://{project}/conf]",
                                     "model=tiny_convnet"), env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())["run_id"]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["model.name"] == "tiny_convnet"
    assert run.data.params["model.net._target_"] == "tiny_backbone.TinyConvNet"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # runs:/ of a logged model resolves through the current tracking store
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model",
                                                          dst_path=str(tmp_path / "dl")))
    finally:
        mlflow.set_tracking_uri(before)
    meta = json.loads(next(folder.rglob("meta.json")).read_text())
    assert meta["net"] == TINY_NET and meta["backbone"] == "tiny_convnet"
    assert next(folder.rglob("network.onnx")).is_file() and next(folder.rglob(f"{CODE}/tiny_backbone.py")).is_file()

    photo = next((tiny_store / "photos").glob("*.jpg"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # PYTHONPATH without the project
    env.update({"NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_TRACKING_URI": uri})
    answers = []
    for runtime in ("onnx", "torch"):  # ONNX Runtime, then torch rebuilding the class from the carried module
        ask = subprocess.run([PY, "-m", "hsflow.recommend", "--model", f"runs:/{run_id}/model", str(photo),
                              "--format", "json", "--top-k", "3"], env={**env, "HSFLOW_RUNTIME": runtime},
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ask.returncode == 0, ask.stderr[-3000:]
        answers.append(json.loads(ask.stdout.splitlines()[0]))
    assert [c["hs_code"] for c in answers[0]["candidates"]] == [c["hs_code"] for c in answers[1]["candidates"]]
    assert len(answers[0]["candidates"]) == 3 and answers[0]["error"] is None
