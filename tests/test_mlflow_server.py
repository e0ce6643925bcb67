"""Integration: a team's tracking server. A real `mlflow server` on 127.0.0.1, training logs to it through
MLFLOW_TRACKING_URI, and the model loads back from it by URI."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_overrides, train_cli

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited at start")
            time.sleep(0.5)
    else:
        pytest.fail("mlflow server did not answer in 90 s")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def test_training_logs_to_a_tracking_server(mlflow_server, tiny_store, session_cache, tmp_path):
    args = tiny_overrides(tiny_store, session_cache, tmp_path)
    args = [a for a in args if not a.startswith("logger.tracking_uri")]
    proc = train_cli(*args, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1]
    assert not (tmp_path / "mlflow.db").exists()

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert "test/top1" in run.data.metrics
    assert {"plots/curves.png", "plots/confusion_matrix.png"} <= {a.path for a in client.list_artifacts(run_id,
                                                                                                          "plots")}
    mlflow.set_tracking_uri(mlflow_server)
    from hsflow.models.bundle import load_model

    assert load_model(f"runs:/{run_id}/model").classes == ["0401200000", "0808100000", "2009120000"]
