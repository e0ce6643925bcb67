"""A real tiny training: MLflow run with metrics, plots, dataset fingerprint and a model that loads back."""
import json
import re
import shutil
import time
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides, train_cli
from hsflow.data.builder import build_dataset
from hsflow.core.images import open_rgb
from hsflow.models.backbones import WeightsMissing, _load_torchvision_state
from hsflow.models.bundle import load_model


def test_last_line_is_run_id_and_test_top1(tiny_run):
    assert re.fullmatch(r"run_id=[0-9a-f]{32} test_top1=\d\.\d{4}", tiny_run["last_line"])


def test_run_has_metrics_plots_config_and_fingerprint(tiny_run):
    client = MlflowClient(tracking_uri=tiny_run["tracking_uri"])
    run = client.get_run(tiny_run["run_id"])
    m = run.data.metrics
    for key in ("test/top1", "test/top3", "test/macro_f1", "curves/top1_val", "curves/loss_train", "curves/loss_val",
                "val/ece_before", "val/ece_after", "val/temperature"):
        assert key in m, key
    assert abs(m["test/top1"] - tiny_run["test_top1"]) < 1e-4
    assert len(client.get_metric_history(run.info.run_id, "curves/loss_train")) == 3  # one point per epoch
    assert run.data.params["optimizer._target_"] == "torch.optim.RMSprop"
    assert run.data.tags["mlflow.source.git.commit"]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/curves.png", "plots/confusion_matrix.png"} <= files
    fp = json.loads(open(client.download_artifacts(run.info.run_id, "dataset/fingerprint.json")).read())
    counts = fp["photos_per_class_per_split"]
    assert set(counts) == {"train", "val", "test"} and set(counts["train"]) == {"0401200000", "0808100000",
                                                                               "2009120000"}


def test_run_is_laid_out_for_the_mlflow_ui(tiny_run):
    """Model-training experiment with the accuracy view; grouped metric keys; counts as params; a description."""
    from hsflow.training.tracking import VIEW_COLUMNS, VIEW_ID

    client = MlflowClient(tracking_uri=tiny_run["tracking_uri"])
    run = client.get_run(tiny_run["run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{VIEW_ID}"])
    state = json.loads(view["state"])
    assert state["selectedColumns"] == VIEW_COLUMNS and "orderByKey" not in state  # default order keeps sweeps folded
    logged = set(run.data.metrics)
    assert all(col.split("`")[1] in logged for col in VIEW_COLUMNS if col.startswith("metrics."))
    assert not [k for k in logged if k.startswith("dataset")]  # counts are not charts
    assert {k.split("/")[0] for k in logged if "/" in k} == {"curves", "test", "val"}
    p = run.data.params
    assert int(p["counts.train_photos"]) > 0 and int(p["counts.classes"]) == 3 and "counts.removed_undecodable" in p
    note = run.data.tags["mlflow.note.content"]
    assert "**efficientnet_lite0**" in note and "dataset **demo**" in note
    assert f"test top-1 **{run.data.metrics['test/top1']:.4f}**" in note


def test_logged_model_loads_back_and_predicts(tiny_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    assert model.classes == ["0401200000", "0808100000", "2009120000"]
    photo = next((tiny_run["store"] / "photos").glob("0808100000_*"))
    x = model.preprocess()(open_rgb(photo)).unsqueeze(0)
    probs = model.probabilities(x)
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5
    # The same model through MLflow's own pyfunc interface: recommend's answer, the same probabilities.
    import pandas as pd

    (out,) = mlflow.pyfunc.load_model(f"runs:/{tiny_run['run_id']}/model").predict(
        pd.DataFrame({"path": [str(photo)]}), params={"top_k": 3})
    served = {c["hs_code"]: c["probability"] for c in out["candidates"]}
    assert torch.allclose(torch.tensor([served[c] for c in model.classes]), probs[0], atol=1e-5)
    assert isinstance(out["unknown"], bool) and isinstance(out["unknown_score"], float)


def test_corrupt_photo_is_skipped_with_a_warning_at_build_time(tiny_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    victim = sorted((store / "photos").iterdir())[3]
    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    from test_configs import compose_cfg

    cfg = compose_cfg()
    spec = build_dataset(cfg.dataset, store, verbose=False)
    err = capsys.readouterr().err
    assert victim.name in err and "skipping photo" in err
    assert len(spec.skipped) == 1 and all(s.path != str(victim) for s in spec.samples)
    assert len(spec.samples) == len(list((store / "photos").iterdir())) - 1


@pytest.mark.slow
def test_training_with_a_corrupt_photo_still_finishes(tiny_store, session_cache, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    (sorted((store / "photos").iterdir())[5]).write_bytes(b"")
    proc = train_cli(*tiny_overrides(store, session_cache, tmp_path, "logger.log_model=false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "empty file" in proc.stderr and proc.stdout.strip().splitlines()[-1].startswith("run_id=")


@pytest.mark.slow
def test_missing_weights_message_names_file_place_and_alternative(tmp_path):
    proc = train_cli("model=vgg16", "model.allow_download=false", f"hydra.run.dir={tmp_path}",
                     f"logger.tracking_uri=sqlite:///{tmp_path}/m.db", env={"TORCH_HOME": str(tmp_path / "th")})
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "vgg16-397923af.pth" in line and str(tmp_path / "th" / "hub" / "checkpoints") in line
    assert "model.pretrained=false" in line and "Traceback" not in proc.stderr


def test_failed_download_becomes_the_same_message(tmp_path, monkeypatch):
    """A real download attempt against a closed local port, as when the machine has no internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = SimpleNamespace(url="http://127.0.0.1:9/vgg16-397923af.pth")
    with pytest.raises(WeightsMissing, match=r"put vgg16-397923af.pth at .*model.pretrained=false"):
        _load_torchvision_state(weights, "vgg16", allow_download=True)
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.slow
def test_the_headline_command_on_the_demo_fails_in_seconds_with_one_line(tmp_path):
    """`python -m hsflow.train dataset=ch87_balanced model=vgg16` on a fresh clone (no VGG weights, no MLflow store):
    the dataset line comes first, before torch loads, weights are fetched or a photo is decoded."""
    t0 = time.perf_counter()
    proc = train_cli("dataset=ch87_balanced", "model=vgg16", f"hydra.run.dir={tmp_path}",
                     f"logger.tracking_uri=sqlite:///{tmp_path}/m.db", env={"TORCH_HOME": str(tmp_path / "th")})
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset ch87_balanced selects no photos"), proc.stderr
    assert "scrapy crawl clip_rulings" in lines[0] and "dataset=demo_ch08_balanced" in lines[0]
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "th").exists()
    assert seconds < 15, seconds


def test_ui_links_open_each_experiment_on_its_runs_in_the_accuracy_view(tiny_run):
    from hsflow.team.ui import links

    (line,) = [x for x in links(tiny_run["tracking_uri"], "http://127.0.0.1:5000") if "hsflow:" in x]
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning"
                     r"&viewStateShareKey=hsflow-accuracy$", line), line
