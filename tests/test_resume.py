"""A training killed mid-run (kill -9) resumes from its last checkpoint into the same MLflow run."""
import os
import signal
import subprocess
import time

from mlflow.tracking import MlflowClient

from conftest import PY, ROOT, tiny_overrides, train_cli


def test_kill_9_then_resume_into_the_same_run(tiny_store, session_cache, tmp_path):
    epochs = 120
    args = tiny_overrides(tiny_store, session_cache, tmp_path, f"trainer.max_epochs={epochs}", "batch_size=1",
                          "logger.log_model=false")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([PY, "-m", "hsflow.train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = tmp_path / "outputs" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let a few more epochs pass, then kill in the middle of one
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hsflow").experiment_id])
    done_before = len(client.get_metric_history(run.info.run_id, "curves/loss_train"))
    assert 0 < done_before < epochs, "the kill should land mid-training"

    resumed = train_cli(*args, f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith(f"run_id={run.info.run_id} ")
    history = client.get_metric_history(run.info.run_id, "curves/loss_train")
    steps = sorted({m.step for m in history})
    # Lightning saves an epoch's checkpoint just before that epoch's metrics reach MLflow: a kill in between
    # leaves that one epoch without a point (README, "Interrupted training"); every other epoch is there.
    assert epochs - 1 <= len(steps) <= epochs
    assert max(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) >= epochs - 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert "test/top1" in client.get_run(run.info.run_id).data.metrics


def test_resume_of_unknown_run_is_one_line(tmp_path):
    proc = train_cli(f"resume=0123456789abcdef0123456789abcdef", f"hydra.run.dir={tmp_path}",
                     f"logger.tracking_uri=sqlite:///{tmp_path}/m.db", "dataset.top_codes=2")
    assert proc.returncode == 2 and "resume=0123456789abcdef0123456789abcdef" in proc.stderr
    assert "Traceback" not in proc.stderr
