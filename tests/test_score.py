"""hsflow.score: the demo's 2019 photos and one corrupt file scored on a real embedded Spark (local[2], two
partitions) through mlflow.pyfunc.spark_udf on the really logged tiny model, answer for answer equal to
`hsflow.recommend --format json` on the same model; and again in the model's own environment rebuilt by
virtualenv and by uv (base64 input)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import DEMO, PY, ROOT
from hsflow.serving.score import spark_missing

CORRUPT = "corrupt.jpg"
# Where Java or pyspark cannot be installed (.ci/run tries), the Spark tests skip with the line saying what is missing.
needs_spark = pytest.mark.skipif(spark_missing() is not None, reason=str(spark_missing()))


def _env(tiny_run, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"], "NO_ALBUMENTATIONS_UPDATE": "1",
                "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(ROOT), **extra})
    return env


@pytest.fixture(scope="module")
def photos_2019(tmp_path_factory):
    """The demo's 2019 photos in two sub-folders (found recursively) and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("photos2019")
    n = 0
    for path in sorted((DEMO / "rulings").glob("*.json")):
        rec = json.loads(path.read_text())
        if rec["fields"]["ENFR_DT"][:4] == "2019":
            for p in rec["photos"]:
                sub = root / ("a" if n % 2 else "b")
                sub.mkdir(exist_ok=True)
                shutil.copy(DEMO / "photos" / p["file"], sub / p["file"])
                n += 1
    (root / "a" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    return root


@pytest.fixture(scope="module")
def cli_answers(tiny_run, photos_2019) -> dict:
    proc = subprocess.run([PY, "-m", "hsflow.recommend", "--format", "json", "--model",
                           f"runs:/{tiny_run['run_id']}/model", str(photos_2019)], cwd=ROOT, env=_env(tiny_run),
                          capture_output=True, text=True, timeout=600)
    answers = {d["image"]: d for d in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 1 and len(answers) == 150, proc.stderr[-2000:]  # 149 photos + the corrupt one
    return answers


def score(tiny_run, photos, out, *args, timeout=900) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([PY, "-m", "hsflow.score", "--model", f"runs:/{tiny_run['run_id']}/model",
                           "--output", str(out), *args, str(photos)], cwd=ROOT, env=_env(tiny_run),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def assert_same(answers: dict, cli: dict) -> None:
    """Every photo answered once; top-3 codes and probabilities as the CLI's (1e-6); the corrupt file an error."""
    assert sorted(answers) == sorted(cli)
    for image, want in cli.items():
        got = answers[image]
        if image.endswith(CORRUPT):
            assert got["error"] and not got["candidates"] and got["error"] == want["error"]
            continue
        assert got["error"] is None
        assert [c["hs_code"] for c in got["candidates"][:3]] == [c["hs_code"] for c in want["candidates"][:3]]
        for g, w in zip(got["candidates"][:3], want["candidates"][:3]):
            assert abs(g["probability"] - w["probability"]) <= 1e-6
        # the distance score moves in the 6th decimal with the batch's make-up (ORT threads, batch size)
        assert abs(got.pop("unknown_score") - want["unknown_score"]) <= 1e-5
        assert got == {k: v for k, v in want.items() if k != "unknown_score"}  # rollup, precedents... the same


@needs_spark
def test_spark_local2_two_partitions_equals_recommend(tiny_run, photos_2019, cli_answers, tmp_path):
    proc, _ = score(tiny_run, photos_2019, tmp_path / "out.jsonl", "--engine", "spark", "--master", "local[2]",
                    "--partitions", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]  # one photo failed: its error row, not a failed job
    assert "150 photos scored in" in proc.stderr and "1 failed" in proc.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 150
    assert_same({d["image"]: d for d in map(json.loads, lines)}, cli_answers)


def test_local_engine_equals_recommend(tiny_run, photos_2019, cli_answers, tmp_path):
    proc, _ = score(tiny_run, photos_2019, tmp_path / "out.parquet", "--engine", "local")
    assert proc.returncode == 1, proc.stderr[-3000:]
    import pandas as pd

    table = pd.read_parquet(tmp_path / "out.parquet")
    assert list(table.columns) == ["image", "outcome", "error", "answer"]
    assert_same({r.image: json.loads(r.answer) for r in table.itertuples()}, cli_answers)


@pytest.mark.parametrize("manager", ["virtualenv", "uv"])
def test_spark_rebuilt_environment_base64_equals_recommend(manager, tiny_run, photos_2019, cli_answers, tmp_path):
    """The model's logged environment rebuilt by MLflow (virtualenv: pyenv's Python + pip; uv), pip packages from
    the package index; the photos cross to its scoring server base64 in JSON. The build time is printed (-s)."""
    if why := spark_missing(manager):
        pytest.skip(why)
    proc, took = score(tiny_run, photos_2019, tmp_path / "out.parquet", "--engine", "spark", "--master",
                       "local[2]", "--partitions", "2", "--env-manager", manager)
    print(f"{manager} scoring, environment build included: {took:.0f} s", file=sys.stderr)
    assert proc.returncode == 1, proc.stderr[-3000:] + proc.stdout[-3000:]
    import pandas as pd

    table = pd.read_parquet(tmp_path / "out.parquet")
    assert len(table) == 150
    assert_same({r.image: json.loads(r.answer) for r in table.itertuples()}, cli_answers)


def close(got, want, tol: float = 1e-5) -> bool:
    """Equal JSON, numbers within `tol` (the group means move in the 7th decimal with the batches' make-up)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k], tol) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want, [tol] * len(want)))
    if isinstance(want, float) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and abs(got - want) <= tol
    return got == want


@needs_spark
@pytest.mark.parametrize("engine", ["spark", "local"])
def test_group_by_folder_equals_recommend(engine, tiny_run, photos_2019, tmp_path):
    """--group-by folder: on Spark every photo is scored, then the photos are grouped by folder in Spark and each
    group answered through the model again; the answers are `hsflow.recommend --group-by folder`'s (two folders,
    the corrupt photo its own error row), top-3 probabilities within 1e-6."""
    proc = subprocess.run([PY, "-m", "hsflow.recommend", "--format", "json", "--group-by", "folder", "--model",
                           f"runs:/{tiny_run['run_id']}/model", str(photos_2019)], cwd=ROOT, env=_env(tiny_run),
                          capture_output=True, text=True, timeout=600)
    key = lambda d: d.get("folder") or d["image"]  # noqa: E731
    want = {key(d): d for d in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 1 and len(want) == 3, proc.stderr[-2000:]
    out, args = tmp_path / "groups.jsonl", ["--engine", engine, "--group-by", "folder"]
    proc, _ = score(tiny_run, photos_2019, out, *args, *(["--partitions", "2"] if engine == "spark" else []))
    assert proc.returncode == 1, proc.stderr[-3000:]
    got = {key(d): d for d in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert len(w.get("images") or [None]) == len(g.get("images") or [None])
        assert [c["hs_code"] for c in g["candidates"][:3]] == [c["hs_code"] for c in w["candidates"][:3]]
        for a, b in zip(g["candidates"][:3], w["candidates"][:3]):
            assert abs(a["probability"] - b["probability"]) <= 1e-6
        assert close(g, w), (name, g, w)
    assert sum(bool(d.get("images")) for d in got.values()) == 2  # the two folders, 149 photos between them
    assert sum(len(d.get("images") or []) for d in got.values()) == 149


def test_no_java_is_one_line(tmp_path):
    """No Java on PATH nor JAVA_HOME: one line naming what to install, exit 2, before any model is looked up."""
    (tmp_path / "p").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env.update({"PATH": str(tmp_path), "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"})
    proc = subprocess.run([PY, "-m", "hsflow.score", "--output", str(tmp_path / "o.jsonl"), str(tmp_path / "p")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no Java runtime for Spark (needs Java 17+): apt-get install openjdk-17-jre-headless, or set "
        "JAVA_HOME (or use --engine local)"]


def test_missing_folder_is_one_line_and_the_rest_goes_on(tmp_path):
    (tmp_path / "p").mkdir()
    proc = subprocess.run([PY, "-m", "hsflow.score", "--engine", "local", "--model", str(tmp_path / "nomodel"),
                           "--output", str(tmp_path / "o.jsonl"), str(tmp_path / "missing")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder; skipped"]
