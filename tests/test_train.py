"""A real tiny training: MLflow run with metrics, plots, dataset fingerprint and a model that loads back."""
import json
import re
import shutil
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_overrides, train_cli
from hsflow.data.builder import build_dataset
from hsflow.images import open_rgb
from hsflow.models.backbones import WeightsMissing, _load_torchvision_state
from hsflow.models.package import load_model


def test_last_line_is_run_id_and_test_top1(tiny_run):
    assert re.fullmatch(r"run_id=[0-9a-f]{32} test_top1=\d\.\d{4}", tiny_run["last_line"])


def test_run_has_metrics_plots_config_and_fingerprint(tiny_run):
    client = MlflowClient(tracking_uri=tiny_run["tracking_uri"])
    run = client.get_run(tiny_run["run_id"])
    m = run.data.metrics
    for key in ("test_top1", "test_top3", "test_macro_f1", "val_top1", "train_loss", "val_loss",
                "val_ece_before", "val_ece_after", "temperature"):
        assert key in m, key
    assert abs(m["test_top1"] - tiny_run["test_top1"]) < 1e-4
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3  # one point per epoch
    assert run.data.params["optimizer._target_"] == "torch.optim.RMSprop"
    assert run.data.tags["mlflow.source.git.commit"]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/curves.png", "plots/confusion_matrix.png"} <= files
    fp = json.loads(open(client.download_artifacts(run.info.run_id, "dataset/fingerprint.json")).read())
    counts = fp["photos_per_class_per_split"]
    assert set(counts) == {"train", "val", "test"} and set(counts["train"]) == {"0401200000", "0808100000",
                                                                               "2009120000"}


def test_logged_model_loads_back_and_predicts(tiny_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = load_model(f"runs:/{tiny_run['run_id']}/model")
    assert model.classes == ["0401200000", "0808100000", "2009120000"]
    photo = next((tiny_run["store"] / "photos").glob("0808100000_*"))
    x = model.preprocess()(open_rgb(photo)).unsqueeze(0)
    probs = model.probabilities(x)
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5
    # The same model through MLflow's own pyfunc interface.
    import pandas as pd

    df = mlflow.pyfunc.load_model(f"runs:/{tiny_run['run_id']}/model").predict(pd.DataFrame({"path": [str(photo)]}))
    # Probabilities per code, then the unknown decision (the pyfunc decodes as hsflow.recommend does: JPEG draft).
    assert list(df.columns) == [*model.classes, "unknown", "unknown_score"]
    x = model.preprocess()(open_rgb(photo, draft_size=model.meta["preprocess"]["resize"])).unsqueeze(0)
    assert torch.allclose(torch.tensor(df[model.classes].values, dtype=torch.float32), model.probabilities(x),
                          atol=1e-5)


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


def test_training_with_a_corrupt_photo_still_finishes(tiny_store, session_cache, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    (sorted((store / "photos").iterdir())[5]).write_bytes(b"")
    proc = train_cli(*tiny_overrides(store, session_cache, tmp_path, "logger.log_model=false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "empty file" in proc.stderr and proc.stdout.strip().splitlines()[-1].startswith("run_id=")


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
