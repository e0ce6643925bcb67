"""Nothing leaves the machine unasked: a training run through every stage of `make train`'s configuration, and the REST
service answering photos, make no name lookup and no connection outside 127.0.0.1 (conftest.net_guard records
every one a process makes, child processes too).

MLflow 3 sends usage telemetry from every process that imports it unless told not to, and keeps quiet on its own
under pytest or CI (PYTEST_CURRENT_TEST, CI): the guarded processes here run without those variables, so what keeps
them quiet is hsflow's own setting. The first test shows the guard would see MLflow's telemetry if it were on.
"""
import base64
import json
import os
import subprocess
import urllib.request

from conftest import LOCAL, PY, ROOT, Server, free_port, hosts, net_guard, tiny_overrides

QUIET_ON_THEIR_OWN = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def user_env(tmp_path) -> tuple[dict, object]:
    """A user's environment (no test or CI markers, no telemetry setting) with the network guard."""
    guard, log = net_guard(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ON_THEIR_OWN and k != "MLFLOW_TRACKING_URI"}
    return {**env, **guard, "NO_ALBUMENTATIONS_UPDATE": "1"}, log


def test_the_guard_sees_mlflow_telemetry_when_a_user_turns_it_on(tmp_path):
    env, log = user_env(tmp_path)
    code = ("import time, mlflow; mlflow.set_tracking_uri('sqlite:///{0}/m.db'); mlflow.set_experiment('x'); "
            "time.sleep(4)").format(tmp_path)
    subprocess.run([PY, "-c", code], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, cwd=tmp_path,
                   capture_output=True, timeout=120)
    assert hosts(log) - LOCAL, "the guard recorded no lookup of MLflow's telemetry host"


def test_training_with_every_stage_reaches_nothing_outside_this_machine(tiny_store, session_cache, tmp_path):
    """experiment=recommended (make train's configuration: generated copies, refit, calibration, unknown score,
    precedents, model logging, plots) on the tiny store, one epoch."""
    env, log = user_env(tmp_path)
    proc = subprocess.run([PY, "-m", "hsflow.train", "experiment=recommended",
                           *tiny_overrides(tiny_store, session_cache, tmp_path), "trainer.max_epochs=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hosts(log) <= LOCAL, f"training reached beyond this machine: {sorted(hosts(log) - LOCAL)}"


def test_the_rest_service_answers_without_reaching_outside(tiny_run, tmp_path):
    env, log = user_env(tmp_path)
    port = free_port()
    server = Server([PY, "-m", "hsflow.serve", "--port", str(port)], f"http://127.0.0.1:{port}", "/ping",
                    env={**env, "MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]})
    try:
        photo = sorted((tiny_run["store"] / "photos").iterdir())[0]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[
            base64.b64encode(photo.read_bytes()).decode()]]}}).encode()
        req = urllib.request.Request(server.url + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())["predictions"][0]
        assert answer["error"] is None and answer["candidates"]
    finally:
        server.stop()
    seen = hosts(log)
    assert seen <= LOCAL, f"the REST service reached beyond this machine: {sorted(seen - LOCAL)}"


def test_hsflow_turns_telemetry_off_unless_the_user_turned_it_on(tmp_path):
    """hsflow sets MLFLOW_DISABLE_TELEMETRY=true only where the user said nothing: a user's `false` stands."""
    code = "import hsflow, os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    env, _ = user_env(tmp_path)
    assert subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "true"
    assert subprocess.run([PY, "-c", code], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"}, capture_output=True,
                          text=True).stdout.strip() == "false"
