"""Shared fixtures: a tiny real store cut from the shipped demo, and one real tiny training run.

Everything is real (photos, EfficientNet-Lite0 ImageNet weights, SQLite MLflow store); only the size is small,
so the suite stays within minutes on 2 cores.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SHARED = ROOT.parent / "shared"
PY = sys.executable

# 3 codes from 3 chapters, a handful of rulings each: ~50 photos.
TINY_CODES = {"0808100000": 6, "0401200000": 5, "2009120000": 5}
LATE_PER_YEAR = 1  # of those, rulings taken from each of 2018 and 2019, so the default dated split has val and test


def make_tiny_store(dst: Path, codes: dict[str, int] = TINY_CODES, *, late_years: tuple[str, ...] = ("2018", "2019"),
                    late_per_year: int = LATE_PER_YEAR, before: str | None = None) -> Path:
    """Copy N rulings of each code (with their photos) from the shipped demo into a new store: the first
    `late_per_year` of each of `late_years` (by default 2018 and 2019: the demo's dated validation and test years),
    then the earliest ones; `before` (a year) leaves out every ruling of that year and later, so the same call
    with and without it gives a store and the same store once later rulings arrived."""
    (dst / "rulings").mkdir(parents=True)
    (dst / "photos").mkdir()
    shutil.copy(DEMO / "STORE.json", dst / "STORE.json")
    taken = collections.Counter()
    for path in sorted((DEMO / "rulings").glob("*.json")):
        rec = json.loads(path.read_text())
        code, year = rec["hs_code"], rec["fields"]["ENFR_DT"][:4]
        period = year if year >= min(late_years) else "early"
        quota = (late_per_year if period in late_years else 0) if period != "early" else (
            codes.get(code, 0) - len(late_years) * late_per_year)
        if before and year >= before:
            continue
        if code in codes and taken[code, period] < quota:
            taken[code, period] += 1
            shutil.copy(path, dst / "rulings" / path.name)
            for p in rec["photos"]:
                shutil.copy(DEMO / "photos" / p["file"], dst / "photos" / p["file"])
    return dst


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("tiny") / "store")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train_cli(*overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run `python -m hsflow.train` as a user would; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # tests pick their store
    full_env.update({"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
    return subprocess.run([PY, "-m", "hsflow.train", *overrides], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_overrides(store: Path, cache: Path, tracking_dir: Path, *extra: str) -> list[str]:
    return [f"paths.raw_store={store}", f"paths.cache_dir={cache}",
            f"logger.tracking_uri=sqlite:///{tracking_dir}/mlflow.db", f"hydra.run.dir={tracking_dir}/outputs",
            "trainer.max_epochs=1", *extra]


@pytest.fixture(scope="session")
def tiny_run(tiny_store, session_cache, tmp_path_factory) -> dict:
    """One real one-epoch training on the tiny store; returns run_id, tracking_uri, test_top1."""
    tracking = tmp_path_factory.mktemp("mlflow")
    proc = train_cli(*tiny_overrides(tiny_store, session_cache, tracking, "trainer.max_epochs=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    return {"run_id": fields["run_id"], "test_top1": float(fields["test_top1"]), "last_line": last,
            "tracking_uri": f"sqlite:///{tracking}/mlflow.db", "tracking_dir": tracking, "store": tiny_store}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real server process (its own process group) answered at `url` once `ready` responds."""

    def __init__(self, cmd: list[str], url: str, ready: str, env: dict | None = None, timeout: float = 240):
        full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        full_env.update({"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
        self.url, self.log = url, tempfile.NamedTemporaryFile("w+", prefix="hsflow-server-", suffix=".log")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # a file, not a pipe: a full pipe would block it
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + ready, timeout=5)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited at start:\n{self.output()[-3000:]}")
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{cmd[:4]} did not answer {url + ready} in {timeout:.0f} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -- the network guard: every name lookup and connection a process makes, whichever library makes it ---------------
# Loaded by the guarded process's Python at start (a sitecustomize.py on PYTHONPATH): an audit hook appends each
# lookup and connection to $HSFLOW_NET_LOG. Child Pythons inherit PYTHONPATH, so a server's workers are guarded too.
NET_GUARD = '''
import os, sys
_log = os.environ.get("HSFLOW_NET_LOG")
if _log:
    def _hook(event, args):
        if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
            host = args[0]
        elif event == "socket.connect":
            host = args[1][0] if isinstance(args[1], tuple) else args[1]
        else:
            return
        with open(_log, "a") as fh:
            fh.write(f"{event} {host!r}\\n")
    sys.addaudithook(_hook)
'''
LOCAL = {"127.0.0.1", "localhost", "::1"}


def net_guard(tmp_path: Path) -> tuple[dict, Path]:
    """Environment entries that guard a Python process (PYTHONPATH, HSFLOW_NET_LOG) and the log it writes."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NET_GUARD)
    log = tmp_path / "net.log"
    return {"PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)]), "HSFLOW_NET_LOG": str(log)}, log


def hosts(log: Path) -> set[str]:
    """The hosts a guarded process looked up or connected to."""
    return {eval(line.split(" ", 1)[1]) for line in log.read_text().splitlines()} if log.exists() else set()


# -- the fast tier: `make test-fast` runs `pytest -m "not slow"`, the in-process unit tests (under 2 minutes) -------
# Slow: a test that needs a model trained through the command line, a server, a crawl, a sweep or another process
# that trains; whole modules of them are listed here, single tests carry @pytest.mark.slow.
SLOW_FIXTURES = {"tiny_run", "two_runs", "rest", "full_crawl"}
SLOW_MODULES = {"test_ddp", "test_offline", "test_sweeps", "test_mlflow_server", "test_resume", "test_cache",
                "test_refresh", "test_review", "test_runtime"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
