"""The logged model installs away from the checkout it was trained in: it carries hsflow's code (MLflow code_paths),
its requirements name packages from the package index (never `file://<checkout>`), and it answers a photo from an
environment where the checkout does not exist.

That environment is a new virtualenv whose site-packages sees the installed libraries (one .pth line) but not hsflow:
the editable install's hook is not in it and the server runs from a folder with no checkout, so `import hsflow`
can only find the model's own copy. (Installing the requirements from the package index, what `--env-manager
virtualenv` adds, would download torch: too large for a test; the install is the index's job.)
"""
import base64
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from conftest import free_port

pytestmark = pytest.mark.slow


def _away_env(tmp: Path) -> Path:
    """A virtualenv that sees this environment's libraries but not hsflow nor the checkout; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    py = tmp / "venv" / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uvicorn = tmp / "venv" / "bin" / "uvicorn"  # mlflow starts the scoring server as `uvicorn` from PATH
    uvicorn.write_text(f"#!{py}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return py


def test_the_logged_model_answers_from_an_environment_without_the_checkout(tiny_run, tmp_path):
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = Path(mlflow.artifacts.download_artifacts(f"runs:/{tiny_run['run_id']}/model", dst_path=str(tmp_path)))
    requirements = (model / "requirements.txt").read_text()
    assert "file://" not in requirements and "onnxruntime==" in requirements
    assert (model / "code" / "hsflow" / "serving" / "recommend.py").is_file()
    assert (model / "code" / "hsflow" / "core" / "nomenclature").is_dir()

    away = tmp_path / "elsewhere"
    away.mkdir()
    py = _away_env(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "HSFLOW_ROOT")}
    env["PATH"] = f"{py.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"
    probe = subprocess.run([py, "-c", "import hsflow"], cwd=away, env=env, capture_output=True, text=True)
    assert "No module named 'hsflow'" in probe.stderr  # the checkout is nowhere in this environment

    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([py, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=away, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc, log)
        photo, answer = _ask(port, tiny_run["store"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert answer["error"] is None and answer["image"] == photo.name and answer["candidates"]
    from hsflow.models.bundle import load_model
    from hsflow.serving.recommend import as_json, recommend

    here = as_json(recommend(load_model(str(model)), [photo], 5, device="cpu", num_workers=0)[0])
    assert [c["hs_code"] for c in answer["candidates"]] == [c["hs_code"] for c in here["candidates"]]
    assert [c["probability"] for c in answer["candidates"]] == [c["probability"] for c in here["candidates"]]


def _ask(port: int, store: Path) -> tuple[Path, dict]:
    """One photo of the tiny store, as base64, to the model server on `port`: (the photo, its answer)."""
    photo = sorted((store / "photos").glob("*.jpg"))[0]
    body = {"dataframe_split": {"columns": ["image", "name"],
                                "data": [[base64.b64encode(photo.read_bytes()).decode(), photo.name]]}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return photo, json.loads(urllib.request.urlopen(req, timeout=120).read())["predictions"][0]


def _wait(url: str, proc: subprocess.Popen, log, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    log.seek(0)
    raise AssertionError(f"the model's server did not answer {url}:\n{log.read()[-3000:]}")


def test_the_model_builds_its_own_environment_without_torch_and_answers(tiny_run, tmp_path):
    """What a deployment does: `mlflow models serve --env-manager virtualenv` (uv when installed) from a folder with no
    checkout builds a new environment from the model's own files (python_env.yaml, requirements.txt: no torch) and
    answers a photo there. Installs from the package index (or pip's cache): the one test that may download."""
    import shutil

    manager = "uv" if shutil.which("uv") else "virtualenv" if shutil.which("pyenv") else None
    if manager is None:
        pytest.skip("neither uv nor pyenv (what mlflow's virtualenv manager needs) is installed")
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    model = Path(mlflow.artifacts.download_artifacts(f"runs:/{tiny_run['run_id']}/model", dst_path=str(tmp_path)))
    requirements = (model / "requirements.txt").read_text()
    assert "torch" not in requirements and "onnxruntime==" in requirements
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "HSFLOW_ROOT")}
    env["MLFLOW_ENV_ROOT"] = str(tmp_path / "envs")  # a new environment, not one a previous run left
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager",
                             manager, "--host", "127.0.0.1", "--port", str(port)], cwd=away, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc, log, timeout=600)
        ready = time.time() - started
        photo, answer = _ask(port, tiny_run["store"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert answer["error"] is None and answer["candidates"], answer
    pythons = list((tmp_path / "envs").rglob("bin/python"))
    assert pythons, "no environment was built"
    probe = subprocess.run([pythons[0], "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0  # the model's environment has no torch
    size = subprocess.run(["du", "-sm", str(tmp_path / "envs")], capture_output=True, text=True).stdout.split()[0]
    print(f"model environment ({manager}): built and answering in {ready:.0f} s, {size} MB")
