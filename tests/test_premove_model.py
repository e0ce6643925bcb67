"""A model folder logged before hsflow's modules moved into floor folders (issue 32) still loads and answers, through
every door, exactly as the code of its day answered.

tests/fixtures/premove_model.tar.gz is an MLflow model logged by commit 69aa752 (the flat layout) from a 3-epoch
Lite0 run on the tiny 3-code store (tests/conftest.py; network.onnx left out to keep the fixture small, so it
answers through torch from weights.pt). Its pyfunc file imports `hsflow.bundle` and `hsflow.recommend`, names that
now alias hsflow.models.bundle and hsflow.serving.recommend. premove_model.expected.jsonl is what 69aa752's
`python -m hsflow.recommend --format json` printed for three of the demo's 2019 photos (see tests/fixtures/README.md).
"""
import base64
import json
import os
import subprocess
import tarfile
import urllib.request

import pandas as pd
import pytest

from conftest import DEMO, PY, ROOT, Server, free_port

FIXTURES = ROOT / "tests" / "fixtures"
EXPECTED = [json.loads(line) for line in (FIXTURES / "premove_model.expected.jsonl").read_text().splitlines()]
PHOTOS = [DEMO / "photos" / e["image"] for e in EXPECTED]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    dst = tmp_path_factory.mktemp("premove")
    with tarfile.open(FIXTURES / "premove_model.tar.gz") as tar:
        tar.extractall(dst, filter="data")
    return dst / "premove_model"


def same_answer(got: dict, expected: dict) -> None:
    """Codes, probabilities (1e-6), the outcome and the unknown score, the precedents: as 69aa752 answered."""
    assert [c["hs_code"] for c in got["candidates"]] == [c["hs_code"] for c in expected["candidates"]]
    assert [c["probability"] for c in got["candidates"]] == pytest.approx(
        [c["probability"] for c in expected["candidates"]], abs=1e-6)
    assert got["outcome"] == expected["outcome"] and got["needs_review"] == expected["needs_review"]
    assert got["unknown_score"] == pytest.approx(expected["unknown_score"], abs=1e-6)
    assert [p["rrdc_no"] for p in got["precedents"]] == [p["rrdc_no"] for p in expected["precedents"]]
    assert [p["similarity"] for p in got["precedents"]] == pytest.approx(
        [p["similarity"] for p in expected["precedents"]], abs=1e-6)
    for level in ("chapters", "headings"):
        assert got["rollup"][level] == pytest.approx(expected["rollup"][level], abs=1e-6)
    assert got["model"]["run_id"] == expected["model"]["run_id"]


def env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "NO_ALBUMENTATIONS_UPDATE": "1"}


def test_the_premove_model_answers_through_the_cli_as_before(model_dir):
    proc = subprocess.run([PY, "-m", "hsflow.recommend", "--model", str(model_dir), "--format", "json",
                           *map(str, PHOTOS)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [os.path.basename(a["image"]) for a in answers] == [e["image"] for e in EXPECTED]
    for got, expected in zip(answers, EXPECTED):
        same_answer(got, expected)


def test_the_premove_model_answers_in_process_through_mlflow(model_dir):
    """In a process that already imported today's hsflow (a notebook, the review page), the model's own pyfunc code
    (`from hsflow.bundle import HSModel`) runs on today's modules through the old names."""
    import sys

    import mlflow

    import hsflow.models.bundle

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    assert sys.modules["hsflow.bundle"] is hsflow.models.bundle  # not the flat copy inside the model folder
    out = pyfunc.predict(pd.DataFrame({"path": [str(p) for p in PHOTOS]}))
    assert len(out) == len(EXPECTED)
    for got, expected in zip(out, EXPECTED):
        same_answer(got, expected)


@pytest.mark.slow
def test_the_premove_model_answers_through_make_serve_and_the_review_page(model_dir):
    port = free_port()
    rest = Server([PY, "-m", "hsflow.serve", "--model", str(model_dir), "--port", str(port), "--workers", "1"],
                  f"http://127.0.0.1:{port}", "/ping")
    try:
        rows = [[base64.b64encode(p.read_bytes()).decode(), p.name] for p in PHOTOS]
        req = urllib.request.Request(f"{rest.url}/invocations", json.dumps(
            {"dataframe_split": {"columns": ["image", "name"], "data": rows}}).encode(),
            {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        rest.stop()
    for got, expected in zip(served, EXPECTED, strict=True):
        same_answer(got, expected)

    port = free_port()
    page = Server([PY, "-m", "hsflow.review", "--model", str(model_dir), "--port", str(port)],
                  f"http://127.0.0.1:{port}", "/api/model")
    try:
        for photo, expected in zip(PHOTOS, EXPECTED):  # one photo a request: the page's answer for one product
            req = urllib.request.Request(f"{page.url}/api/recommend", json.dumps({"photos": [
                {"name": photo.name, "type": "image/jpeg", "data": base64.b64encode(photo.read_bytes()).decode()}]
            }).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as resp:
                (got,) = json.loads(resp.read())["results"]
            same_answer(got, expected)
    finally:
        page.stop()


def test_the_premove_model_asked_to_group_on_spark_is_one_line(model_dir, tmp_path):
    """Grouping in Spark sends each group back through the model (the `members` input): a model logged before it
    cannot answer that, so hsflow.score says so in one line before Spark starts; --engine local groups it."""
    args = [PY, "-m", "hsflow.score", "--model", str(model_dir), "--group-by", "folder", str(PHOTOS[0].parent)]
    proc = subprocess.run([*args, "--output", str(tmp_path / "o.jsonl")], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "o.jsonl").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: {model_dir}: this model was logged before hsflow.score could group in Spark (its signature has no "
        "`members` input): retrain it (make train), use --engine local, or score without --group-by"]
