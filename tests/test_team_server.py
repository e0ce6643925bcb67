"""A team's tracking server (issue 27): a real PostgreSQL and a real `mlflow server --app-name basic-auth`, started
once for this module by hsflow.server on free loopback ports, and every door against it with credentials: a training
run stopped by the server going away and resumed into the same run, a joblib sweep with 2 parallel workers, DDP
through the CLI, a refresh with promotion and rollback, the champion served to a read-only user who cannot move it,
concurrent writers, PostgreSQL restarted under the running server, and the push from the embedded store.

Skipped with one line where PostgreSQL is not installed (.ci/run installs it with apt)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conftest import PY, ROOT, Server, free_port, make_tiny_store, tiny_overrides, train_cli
from hsflow.serving import registry
from hsflow.team import server
from test_ddp import DDP
from test_refresh import CODES, LATE, refresh_cli, last_fields
from test_serve import b64, invoke
from test_sweeps import sweep_overrides

pytestmark = pytest.mark.slow


def _server_tests_possible() -> str | None:
    try:
        server.pg_bin("pg_ctl")
    except server.ServerError as exc:
        return str(exc)
    return None


class Team:
    """The running server: its layout, URL, ports, and an environment per user."""

    def __init__(self, root: Path):
        self.lay, self.port, self.pg_port = server.Layout(root), free_port(), free_port()
        self.state = server.start(root, port=self.port, pg_port=self.pg_port, workers=2)
        self.url = self.state["url"]
        self.users = {"admin": self.lay.read_secret("admin_password")}

    def env(self, user: str | None, **extra: str) -> dict[str, str]:
        """What a client of `user` sets (None: no credentials at all)."""
        creds = {} if user is None else {"MLFLOW_TRACKING_USERNAME": user,
                                         "MLFLOW_TRACKING_PASSWORD": self.users[user]}
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_DISABLE_TELEMETRY": "true", **creds, **extra}

    @contextlib.contextmanager
    def signed_in(self, user: str | None):
        """This process's MLflow client as `user` (MLflow reads the variables on every request)."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        with mock.patch.dict(os.environ, {**keep, **self.env(user)}, clear=True):
            yield MlflowClient(self.url)

    def add_user(self, name: str) -> None:
        self.users[name] = secrets.token_urlsafe(16)
        with self.signed_in("admin"):
            server.add_user(self.url, name, self.users[name])

    def restart_mlflow(self) -> None:
        self.state = server.restart_mlflow(self.lay.root)


@pytest.fixture(scope="module")
def team():
    why = _server_tests_possible()
    if why:
        pytest.skip(f"team server tests need PostgreSQL: {why}")
    # Not under pytest's 0700 tmp folder: PostgreSQL runs as the `postgres` user, who must reach its cluster.
    root = Path(tempfile.mkdtemp(prefix="hsflow-team-"))
    root.chmod(0o755)
    t0 = time.perf_counter()
    try:
        t = Team(root)
        t.started_seconds = time.perf_counter() - t0
        t.add_user("alice")  # trains, sweeps, refreshes: owns what she creates
        t.add_user("bob")    # a broker's service account: reads the registered model
        yield t
    finally:
        server.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def alice_train(team, *args, env=None, timeout=900):
    return train_cli(*args, env=team.env("alice", **(env or {})), timeout=timeout)


def server_overrides(store, cache, tmp, *extra):
    """tests/conftest.py's tiny overrides, with the store left to MLFLOW_TRACKING_URI."""
    return [a for a in tiny_overrides(store, cache, tmp, *extra) if not a.startswith("logger.tracking_uri")]


# --- the server itself --------------------------------------------------------------------------------------------

def test_server_refuses_strangers_and_says_one_line_for_each_setup_mistake(team, tmp_path):
    assert team.started_seconds < 240
    req = urllib.request.Request(f"{team.url}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401  # no credentials
    with team.signed_in("alice"), mock.patch.dict(os.environ, {"MLFLOW_TRACKING_PASSWORD": "not-her-password"}):
        with pytest.raises(MlflowException, match="401"):
            MlflowClient(team.url).search_experiments()
    # Nothing in the data folder is readable by others; the secrets are 0600.
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in team.lay.secret.iterdir())
    # A port in use, a wrong PostgreSQL password, a missing install: one line each, saying what to do.
    proc = subprocess.run([PY, "-m", "hsflow.server", "start", "--data", str(tmp_path / "other"), "--port",
                           str(team.port)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and f"port {team.port}" in proc.stderr
    assert "--port N" in proc.stderr and not (tmp_path / "other").exists()
    wrong = server.Layout(tmp_path / "wrong")
    (wrong.secret).mkdir(parents=True)
    (wrong.secret / "pg_password").write_text("not-the-password")
    with pytest.raises(server.ServerError, match="refused the password in .*pg_password"):
        server.ensure_databases(wrong, team.pg_port)
    proc = subprocess.run([PY, "-m", "hsflow.server", "start", "--data", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HSFLOW_PG_BIN": str(tmp_path)})
    assert proc.returncode == 2 and "apt-get install -y postgresql" in proc.stderr and "Traceback" not in proc.stderr


# --- training: the server goes away mid-run, the run resumes into itself ------------------------------------------

@pytest.fixture(scope="module")
def resumed(team, tiny_store, session_cache, tmp_path_factory):
    """A CLI training as alice whose server stops mid-fit; resumed once it is back."""
    tmp = tmp_path_factory.mktemp("resume")
    args = server_overrides(tiny_store, session_cache, tmp, "trainer.max_epochs=12", "batch_size=1",
                            "logger.log_model=false", "logger.experiment_name=team-resume", "unknown.enabled=false")
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **team.env("alice", **fail_fast)}
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:  # files: a full pipe would block it
        proc = subprocess.Popen([PY, "-m", "hsflow.train", *args], cwd=ROOT, env=env, stdout=out, stderr=err)
    last = tmp / "outputs" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    server.stop_mlflow(team.state["pid"])  # mid-fit: the next epoch's metrics find no server
    proc.wait(timeout=300)
    err = (tmp / "stderr").read_text()
    team.restart_mlflow()
    run_id = err.rsplit("resume=", 1)[-1].strip() if "resume=" in err else None
    again = alice_train(team, *args, f"resume={run_id}") if run_id else None
    return {"proc": proc, "err": err, "run_id": run_id, "checkpoint": last, "again": again}


def test_server_stopped_mid_run_is_one_line_and_resume_continues_the_same_run(team, resumed):
    err_lines = [ln for ln in resumed["err"].splitlines() if ln.startswith("error:")]
    assert resumed["proc"].returncode == 3, resumed["err"][-3000:]
    assert "Traceback" not in resumed["err"] and len(err_lines) == 1
    run_id = resumed["run_id"]
    assert err_lines[0] == resumed["err"].strip().splitlines()[-1]
    assert f"the tracking server {team.url} stopped answering" in err_lines[0] and f"resume={run_id}" in err_lines[0]
    assert resumed["checkpoint"].exists()  # kept
    again = resumed["again"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1].startswith(f"run_id={run_id} ")
    with team.signed_in("alice") as c:
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED" and "test/top1" in run.data.metrics
        steps = {m.step for m in c.get_metric_history(run_id, "curves/loss_train")}
        assert len(steps) >= 11  # at most the epoch in flight when the server went lacks its point
        assert {"plots/curves.png"} <= {a.path for a in c.list_artifacts(run_id, "plots")}
        assert run.data.tags["mlflow.user"] == "alice"


# --- sweeps and DDP ----------------------------------------------------------------------------------------------

def test_joblib_sweep_with_two_parallel_workers(team, tiny_store, session_cache, tmp_path):
    args = [a for a in sweep_overrides(tiny_store, session_cache, tmp_path, "team-grid")
            if not a.startswith("logger.tracking_uri")]
    proc = alice_train(team, *args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.max_epochs=1",
                       "model.head.dropout=0.3,0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with team.signed_in("alice") as c:
        exp = c.get_experiment_by_name("team-grid")
        runs = c.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("hsflow.kind") is None]
    (parent,) = [r for r in runs if r.data.tags.get("hsflow.kind") == "sweep"]  # one, though two jobs raced
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert sorted(r.data.params["model.head.dropout"] for r in trials) == ["0.3", "0.5"]
    assert {r.data.tags["mlflow.user"] for r in trials} == {"alice"}
    # `make ui` on the server: the server is the UI, so it prints links to it and starts nothing.
    ui = subprocess.run([PY, "-m", "hsflow.ui"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, **team.env("alice")})
    assert ui.returncode == 0 and f"  team-grid: {team.url}/#/experiments/{exp.experiment_id}/runs?" in ui.stdout


def test_ddp_through_the_cli(team, tiny_store, session_cache, tmp_path):
    proc = alice_train(team, *server_overrides(tiny_store, session_cache, tmp_path, "logger.experiment_name=team-ddp",
                                               "logger.log_model=false"), *DDP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("run_id=")] == proc.stdout.strip().splitlines()[-1:]
    with team.signed_in("alice") as c:
        (run,) = c.search_runs([c.get_experiment_by_name("team-ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.devices"] == "2"
    assert run.data.metrics["test/photos"] == int(run.data.params["counts.test_photos"])  # each photo once


# --- the registry: refresh, promotion, rollback, serving, permissions ---------------------------------------------

@pytest.fixture(scope="module")
def refreshed(team, session_cache, tmp_path_factory):
    """A refresh against the server (no champion yet: its challenger becomes version 1, the first champion), a
    second version of the same model, promoted by hand, then rolled back."""
    root = tmp_path_factory.mktemp("team-refresh")
    world = {"root": root, "cache": session_cache, "runs": 0, "uri": team.url,
             "crawled": make_tiny_store(root / "store", CODES, late_years=LATE, late_per_year=2, before="2019")}
    first = last_fields(refresh_cli(world, "trainer.max_epochs=3", "refit.enabled=false", "optimizer=adamw",
                                    "optimizer.lr=1e-3", env=team.env("alice")))
    with team.signed_in("alice") as c:
        v1 = c.get_model_version("hsflow", "1")
        c.create_model_version("hsflow", v1.source, run_id=v1.run_id, description="the same model, again",
                               model_id=v1.source.removeprefix("models:/"))
    moves = [subprocess.run([PY, "-m", "hsflow.refresh", *flags], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **team.env("alice")})
             for flags in (["--promote", "2", "--reason", "by hand"], ["--rollback", "--reason", "back"])]
    return {"first": first, "moves": moves}


def test_refresh_promotes_then_rolls_back_on_the_server(team, refreshed):
    assert refreshed["first"]["decision"] == "first" and refreshed["first"]["champion"] == "1"
    promote, rollback = refreshed["moves"]
    assert promote.returncode == 0, promote.stderr[-2000:]
    assert "champion of 'hsflow': version 2 (was 1" in promote.stdout
    assert rollback.returncode == 0, rollback.stderr[-2000:]
    assert "version 1 (was 2; rollback: back)" in rollback.stdout
    with team.signed_in("alice") as c:
        model = c.get_registered_model("hsflow")
        assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1", "challenger": "1"}
        assert model.tags[registry.STACK_TAG] == "1"
        assert "left champion (rollback" in c.get_model_version("hsflow", "2").description
        refresh_run = c.get_run(refreshed["first"]["run_id"])
        assert refresh_run.data.tags["hsflow.decision"] == "first"
        assert c.get_run(c.get_model_version("hsflow", "1").run_id).data.tags["mlflow.user"] == "alice"


def test_a_read_only_user_serves_the_champion_but_cannot_move_it(team, refreshed, tiny_store):
    with team.signed_in("admin"):
        from mlflow.server import get_app_client

        get_app_client("basic-auth", tracking_uri=team.url).grant_user_permission("bob", "registered_model",
                                                                                 "hsflow", "READ")
    with team.signed_in("bob") as c:
        assert str(c.get_model_version_by_alias("hsflow", "champion").version) == "1"
        for move in (lambda: c.set_registered_model_alias("hsflow", "champion", "2"),
                     lambda: c.delete_registered_model_alias("hsflow", "champion"),
                     lambda: c.set_model_version_tag("hsflow", "1", "x", "y")):
            with pytest.raises(MlflowException) as err:
                move()
            assert err.value.error_code == "PERMISSION_DENIED"
    with team.signed_in(None) as c, pytest.raises(MlflowException, match="401"):
        c.get_model_version_by_alias("hsflow", "champion")
    port = free_port()
    rest = Server([PY, "-m", "hsflow.serve", "--port", str(port)], f"http://127.0.0.1:{port}", "/ping",
                  env=team.env("bob"))
    try:
        photo = sorted((tiny_store / "photos").glob("0808100000_*"))[0]
        status, body = invoke(rest.url, {"dataframe_split": {"columns": ["image"], "data": [[b64(photo)]]}})
    finally:
        rest.stop()
    assert status == 200, body
    (answer,) = body["predictions"]
    assert answer["candidates"] and answer["model"]["version"] == "1" and "champion" in answer["model"]["aliases"]
    with team.signed_in("alice") as c:
        assert {k: str(v) for k, v in c.get_registered_model("hsflow").aliases.items()}["champion"] == "1"


# --- load and faults ------------------------------------------------------------------------------------------------

WRITER = """
import sys, time
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
exp, i, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = MlflowClient()
run = c.create_run(exp, run_name=f"writer {i}").info.run_id
c.log_param(run, "writer", i)
for start in range(0, steps, batch):
    now = int(time.time() * 1000)
    c.log_batch(run, metrics=[Metric("load/value", i * 100000 + s, now, s) for s in range(start, start + batch)])
c.set_terminated(run)
print("run_id=" + run)
"""


def writers(team, exp_id: str, n: int, steps: int, batch: int) -> list[subprocess.Popen]:
    env = {**os.environ, **team.env("alice")}
    return [subprocess.Popen([PY, "-c", WRITER, exp_id, str(i), str(steps), str(batch)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def run_of(out: str) -> str:
    """The writer's run id (its last line: MLflow prints a "View run" line of its own)."""
    return out.strip().splitlines()[-1].removeprefix("run_id=")


def exact(c: MlflowClient, run_id: str, i: int, steps: int) -> bool:
    history = c.get_metric_history(run_id, "load/value")
    return sorted((m.step, m.value) for m in history) == [(s, float(i * 100000 + s)) for s in range(steps)]


def test_four_concurrent_writers_lose_nothing(team):
    with team.signed_in("alice") as c:
        exp = c.create_experiment("team-load")
    t0 = time.perf_counter()
    procs = writers(team, exp, 4, 500, 10)  # 4 processes x 50 requests x 10 steps, all at once
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    seconds = time.perf_counter() - t0
    with team.signed_in("alice") as c:
        for i, (out, _) in enumerate(outs):
            assert exact(c, run_of(out), i, 500), f"writer {i}"
        assert len(c.search_runs([exp])) == 4
    print(f"4 writers x 500 steps: {seconds:.1f} s")


def test_postgres_restarted_under_the_running_server_loses_no_row_then_a_backup(team, tmp_path):
    with team.signed_in("alice") as c:
        exp = c.create_experiment("team-pg-restart")
    (proc,) = writers(team, exp, 1, 100, 1)  # one request per step, the client's own retries on
    time.sleep(3)
    server.restart_postgres(team.lay.root)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    with team.signed_in("alice") as c:
        assert exact(c, run_of(out), 0, 100)
        assert c.get_run(run_of(out)).info.status == "FINISHED"
    done = server.backup(team.lay.root, tmp_path)
    assert set(done["files"]) == {"mlflow.dump", "mlflow_auth.dump", "artifacts.tar.gz"}
    assert all(size > 0 for size in done["files"].values())
    print(f"backup: {done}")


# --- from the embedded store to the server ---------------------------------------------------------------------------

@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI for a moment (what it was is given back, as tests/test_refresh.py does)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved = getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)

def embedded_store(tiny_run, tmp: Path) -> str:
    """A copy of the tiny run's SQLite store with a registered version (alias, tag) and a run that cannot be copied
    (its artifact is a dangling link)."""
    shutil.copy(Path(tiny_run["tracking_dir"]) / "mlflow.db", tmp / "mlflow.db")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    (model,) = c.search_logged_models([c.get_run(tiny_run["run_id"]).info.experiment_id])
    c.create_registered_model("hsflow-pushed", tags={registry.STACK_TAG: "1"})
    with global_tracking_uri(uri):  # where MLflow looks the logged model up
        c.create_model_version("hsflow-pushed", f"models:/{model.model_id}", run_id=tiny_run["run_id"],
                               tags={"hsflow.window": "2018"}, description="pushed", model_id=model.model_id)
    c.set_registered_model_alias("hsflow-pushed", "champion", "1")
    broken_exp = c.create_experiment("team-broken", artifact_location=(tmp / "broken").as_uri())
    broken = c.create_run(broken_exp, run_name="broken").info.run_id
    c.log_param(broken, "p", "1")
    (tmp / "broken" / broken / "artifacts").mkdir(parents=True)
    (tmp / "broken" / broken / "artifacts" / "gone.txt").symlink_to(tmp / "nowhere")
    c.set_terminated(broken)
    return uri


def test_push_copies_runs_models_and_versions_once_and_names_a_run_it_cannot_copy(team, tiny_run, tmp_path):
    source = embedded_store(tiny_run, tmp_path)
    procs = [subprocess.run([PY, "-m", "hsflow.push", "--from", source, "--to", team.url], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, **team.env("alice")})
             for _ in range(2)]
    for proc in procs:
        failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed:")]
        assert proc.returncode == 1 and len(failed) == 1 and "(broken)" in failed[0], proc.stderr[-2000:]
    assert "pushed 1 runs (0 already there), 1 logged models, 1 model versions" in procs[0].stdout
    assert "pushed 0 runs (1 already there), 0 logged models, 0 model versions" in procs[1].stdout
    src = MlflowClient(source)
    with team.signed_in("alice") as dst:
        (run,) = dst.search_runs([dst.get_experiment_by_name("hsflow").experiment_id],
                                 f"tags.`hsflow.pushed_from` = '{tiny_run['run_id']}'")
        assert not dst.search_runs([dst.get_experiment_by_name("team-broken").experiment_id])  # no half copy
        old = src.get_run(tiny_run["run_id"])
        assert run.data.params == old.data.params
        assert json.dumps(run.data.metrics, sort_keys=True) == json.dumps(old.data.metrics, sort_keys=True)  # NaN too
        assert run.info.status == "FINISHED" and run.info.start_time == old.info.start_time
        for key in ("curves/loss_train", "curves/top1_val"):
            assert [(m.step, m.value, m.timestamp) for m in dst.get_metric_history(run.info.run_id, key)] == \
                [(m.step, m.value, m.timestamp) for m in src.get_metric_history(tiny_run["run_id"], key)]
        assert {a.path for a in dst.list_artifacts(run.info.run_id, "plots")} == \
            {a.path for a in src.list_artifacts(tiny_run["run_id"], "plots")}
        v = dst.get_model_version_by_alias("hsflow-pushed", "champion")
        assert v.run_id == run.info.run_id and v.tags["hsflow.window"] == "2018" and v.description == "pushed"
        assert dst.get_registered_model("hsflow-pushed").tags[registry.STACK_TAG] == str(v.version)
        from hsflow.models.bundle import load_model

        with global_tracking_uri(team.url):
            assert load_model("models:/hsflow-pushed@champion").classes == ["0401200000", "0808100000",
                                                                            "2009120000"]
