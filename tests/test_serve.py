"""The model as the service: the precedent index saved with it, the pyfunc returning recommend's JSON, and a real
`mlflow models serve` (started by `python -m hsflow.serve`, as `make serve` does) answering base64 photos."""
import base64
import csv
import io
import json
import os
import urllib.error
import urllib.request
import zipfile
from unittest import mock

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import PY, Server, free_port
from hsflow.serving import recommend as R
from hsflow.models.bundle import HSModel
from hsflow.models.network import build_network
from hsflow.serving.pyfunc import photo_bytes
from hsflow.models.precedents import PrecedentIndex
from hsflow.serving.serve import latest_model_uri

PRECEDENT_KEYS = {"rrdc_no", "date", "hs_code", "product", "reasoning", "photo", "similarity"}


@pytest.fixture(scope="module")
def tiny_model(tiny_run) -> HSModel:
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]}):
        return R.load(f"runs:/{tiny_run['run_id']}/model")


def split_rows(tiny_run, tmp_path, split: str) -> list[dict]:
    path = MlflowClient(tiny_run["tracking_uri"]).download_artifacts(tiny_run["run_id"], "dataset/split.csv",
                                                                      str(tmp_path))
    return [r for r in csv.DictReader(open(path)) if r["split"] == split and r["view"] == "0"]


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


# --- the precedent index ------------------------------------------------------------------------------------------

def test_model_folder_holds_the_training_photos_rulings(tiny_run, tiny_model, tmp_path):
    index = tiny_model.precedents
    train = split_rows(tiny_run, tmp_path, "train")
    assert len(index) == len(train) and sorted(index.photo_file) == sorted(os.path.basename(r["path"]) for r in train)
    assert index.embeddings.dtype == np.float16
    assert np.allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    # Ruling facts come from the store's records, as the portal gave them.
    rec = json.loads((tiny_run["store"] / "rulings" / f"{index.rulings[0]['rrdc_no']}.json").read_text())
    assert index.rulings[0] == {"rrdc_no": rec["rrdc_no"], "date": rec["fields"]["ENFR_DT"],
                                     "hs_code": rec["hs_code"], "label": rec["hs_code"],
                                     "product": rec["fields"]["CMDT_NM"], "reasoning": rec["fields"]["DTRM_RSN_CN"]}
    with zipfile.ZipFile(io.BytesIO(index.thumbs)) as zf:
        assert sorted(zf.namelist()) == sorted(index.photo_file)
        img = Image.open(io.BytesIO(zf.read(index.photo_file[0])))
        assert img.format == "JPEG" and max(img.size) == 96
    # Saved and loaded again with the model, whole.
    HSModel(tiny_model.net, tiny_model.meta, index).save(tmp_path / "copy")
    again = PrecedentIndex.load(tmp_path / "copy")
    assert np.array_equal(again.embeddings, index.embeddings) and again.rulings == index.rulings
    assert again.thumbs == index.thumbs and again.k == 3


def test_precedent_top1_is_logged_and_matches_what_recommend_lists(tiny_run, tiny_model, tmp_path):
    logged = MlflowClient(tiny_run["tracking_uri"]).get_run(tiny_run["run_id"]).data.metrics["test/precedent_top1"]
    rows = split_rows(tiny_run, tmp_path, "test")
    recs = R.recommend(tiny_model, [r["path"] for r in rows], top_k=1, precedents=1)
    hits = [rec.precedents[0]["hs_code"] == row["hs_code"] for rec, row in zip(recs, rows)]
    assert sum(hits) / len(hits) == pytest.approx(logged, abs=1e-6)
    for rec in recs:
        agrees = rec.precedents[0]["hs_code"] == rec.candidates[0]["hs_code"]
        assert rec.precedent_agrees is agrees


def test_a_training_photo_finds_its_own_ruling_first(tiny_run, tiny_model, tmp_path):
    row = split_rows(tiny_run, tmp_path, "train")[0]
    rec = R.recommend(tiny_model, [row["path"]])[0]
    assert len(rec.precedents) == 3 and all(set(p) == PRECEDENT_KEYS for p in rec.precedents)
    assert rec.precedents[0]["rrdc_no"] == row["rrdc_no"] and rec.precedents[0]["similarity"] > 0.99
    assert len({p["rrdc_no"] for p in rec.precedents}) == 3  # rulings, each once
    sims = [p["similarity"] for p in rec.precedents]
    assert sims == sorted(sims, reverse=True)
    assert R.recommend(tiny_model, [row["path"]], precedents=0)[0].precedents == []


def test_embedding_is_what_the_head_reads_for_fine_tuned_models_too(tiny_model):
    x = torch.randn(2, 3, 224, 224)
    for unfreeze in (0, 2):
        net = build_network({**tiny_model.meta, "unfreeze": unfreeze}).eval()
        model = HSModel(net, {**tiny_model.meta, "unfreeze": unfreeze})
        emb = model.embed(x)
        assert emb.shape == (2, 1280)
        with torch.inference_mode():
            assert torch.allclose(net[2](emb), net(x), atol=1e-5)
        assert torch.allclose(model.probabilities_and_embeddings(x)[1], emb)


# --- the pyfunc, in process ---------------------------------------------------------------------------------------

def test_photo_bytes_takes_base64_text_or_raw_bytes(tiny_run):
    raw = next((tiny_run["store"] / "photos").glob("*.jpg")).read_bytes()
    assert photo_bytes(base64.b64encode(raw).decode()) == raw
    assert photo_bytes(base64.encodebytes(raw)) == raw  # MIME line breaks, as bytes (MLflow's `inputs` format)
    assert photo_bytes(raw) == raw


def test_pyfunc_returns_what_recommend_prints(tiny_run, tiny_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    shots = sorted((tiny_run["store"] / "photos").glob("0808100000_*"))[:2]
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{tiny_run['run_id']}/model")
    assert [c.name for c in pyfunc.metadata.get_input_schema().inputs] == ["image", "path", "name", "item",
                                                                            "members"]
    out = pyfunc.predict(pd.DataFrame({"image": [shots[0].read_bytes(), b"not a photo"],
                                       "name": [str(shots[0]), "junk.jpg"]}))
    assert out[0] == json.loads(R.to_json(R.recommend(tiny_model, [shots[0]])[0]))
    assert out[1]["error"] == "junk.jpg: not an image (unrecognised format)" and out[1]["candidates"] == []
    # Paths, in process; rows sharing an item are one answer from the mean of their probabilities.
    grouped = pyfunc.predict(pd.DataFrame({"path": [str(s) for s in shots], "item": ["apple", "apple"]}),
                             params={"top_k": 2, "precedents": 1})
    assert len(grouped) == 1 and grouped[0]["item"] == "apple" and grouped[0]["images"] == [str(s) for s in shots]
    assert len(grouped[0]["candidates"]) == 2 and len(grouped[0]["precedents"]) == 1
    same = R.recommend(tiny_model, [R.PhotoInput(str(s), item="apple") for s in shots], top_k=2, precedents=1)
    assert grouped == [R.as_json(r) for r in same]
    # Grouped after scoring (hsflow.score --group-by): each photo's parts, then the item's members sent back.
    parts = pyfunc.predict(pd.DataFrame({"path": [str(s) for s in shots]}), params={"result": "parts"})
    assert len(parts) == 2 and all(json.loads(p)["error"] is None for p in parts["answer"])
    members = "[" + ",".join(parts["answer"]) + "]"
    assert pyfunc.predict(pd.DataFrame({"item": ["apple"], "members": [members]}),
                          params={"top_k": 2, "precedents": 1}) == grouped


# --- the real REST server -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rest(tiny_run):
    port = free_port()
    server = Server([PY, "-m", "hsflow.serve", "--port", str(port)], f"http://127.0.0.1:{port}", "/ping",
                    env={"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]})
    yield server
    server.stop()


def invoke(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_latest_make_train_model_is_found_through_mlflow_search(tiny_run):
    assert latest_model_uri(tracking_uri=tiny_run["tracking_uri"]) == f"runs:/{tiny_run['run_id']}/model"
    with pytest.raises(LookupError, match="no MLflow experiment 'nope'.*make train"):
        latest_model_uri("nope", tracking_uri=tiny_run["tracking_uri"])


def test_rest_answers_base64_photos_and_one_error_for_a_corrupt_one(rest, tiny_run, tiny_model):
    shots = [sorted((tiny_run["store"] / "photos").glob(f"{code}_*"))[0] for code in ("0808100000", "2009120000")]
    corrupt = shots[0].read_bytes()[: shots[0].stat().st_size // 2]  # a truncated JPEG
    status, body = invoke(rest.url, {"dataframe_split": {
        "columns": ["image", "name"],
        "data": [[b64(shots[0]), str(shots[0])], [base64.b64encode(corrupt).decode(), "corrupt.jpg"],
                 [b64(shots[1]), str(shots[1])]]}})
    assert status == 200, body
    out = body["predictions"]
    assert [d["image"] for d in out] == [str(shots[0]), "corrupt.jpg", str(shots[1])]
    errors = [d for d in out if d["error"]]
    assert len(errors) == 1 and errors[0]["error"].startswith("corrupt.jpg: cannot decode")
    assert errors[0]["candidates"] == [] and errors[0]["needs_review"] is True
    cli = [json.loads(R.to_json(r)) for r in R.recommend(tiny_model, shots)]
    for served, local in zip([out[0], out[2]], cli):
        codes = [c["hs_code"] for c in served["candidates"]]
        assert codes == [c["hs_code"] for c in local["candidates"]] and len(codes) == 3  # ranked the same
        assert [c["probability"] for c in served["candidates"]] == pytest.approx(
            [c["probability"] for c in local["candidates"]], abs=1e-5)
        assert all(c["description"] and c["chapter"] for c in served["candidates"])
        assert [p["rrdc_no"] for p in served["precedents"]] == [p["rrdc_no"] for p in local["precedents"]]
        assert served["precedent_agrees"] == local["precedent_agrees"]
        assert set(served) == set(local) and served["rollup"].keys() == {"chapters", "headings"}

    # MLflow's other JSON shapes reach the same answer; params set top_k and the number of precedents.
    status, body = invoke(rest.url, {"inputs": {"image": [b64(shots[0])]}, "params": {"top_k": 2, "precedents": 1}})
    assert status == 200, body
    (d,) = body["predictions"]
    assert d["image"] == "row 0" and [c["hs_code"] for c in d["candidates"]] == [
        c["hs_code"] for c in out[0]["candidates"][:2]] and len(d["precedents"]) == 1
    status, body = invoke(rest.url, {"dataframe_records": [{"image": b64(s), "item": "one product"} for s in shots]})
    assert status == 200 and [d["item"] for d in body["predictions"]] == ["one product"]
    # The server reads no path on its own disk.
    status, body = invoke(rest.url, {"dataframe_split": {"columns": ["path"], "data": [[str(shots[0])]]}})
    assert status == 200 and "reads no paths" in body["predictions"][0]["error"]


def test_every_door_defaults_to_the_champion_else_the_latest_make_train_model(tiny_run, monkeypatch, capsys):
    """One rule (hsflow.serving.registry.default_model_uri) for the CLI, make serve and make review: right after
    `make train`, with no champion yet, `python -m hsflow.recommend photo.jpg` answers with the latest model."""
    from hsflow.serving.registry import default_model_uri

    latest = f"runs:/{tiny_run['run_id']}/model"
    assert default_model_uri(tracking_uri=tiny_run["tracking_uri"]) == latest
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    photo = sorted((tiny_run["store"] / "photos").glob("*.jpg"))[0]
    assert R.main(["--format", "json", str(photo)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["model"]["run_id"] == tiny_run["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_run['tracking_dir']}/none.db")
    assert R.main([str(photo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no --model given" in err[0] and "make train" in err[0]
