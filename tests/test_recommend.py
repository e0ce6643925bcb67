"""hsflow.recommend and hsflow.core.hs: the JSON schema and the table, the hierarchy roll-up, catch-all classes,
--group-by folder, a batch of bad files, top-1 equal to training's test top-1, and safe model loading."""
import copy
import csv
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import PY, ROOT
from hsflow.core import config, hs
from hsflow.serving import recommend as R
from hsflow.models.bundle import HSModel

CANDIDATE_KEYS = {"hs_code", "probability", "description", "heading", "chapter", "nearest_only"}


def cli(*args, env=None, cwd=None):
    full = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full.update({"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})
    return subprocess.run([PY, "-m", "hsflow.recommend", *map(str, args)], env=full, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


def photos(store: Path, code: str) -> list[Path]:
    return sorted((store / "photos").glob(f"{code}_*.jpg"))


def demo_photo(code: str = "0808100000") -> Path:
    return photos(ROOT / "data" / "demo", code)[0]


@pytest.fixture(scope="module")
def tiny_model(tiny_run) -> HSModel:
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]}):
        return R.load(f"runs:/{tiny_run['run_id']}/model")


def save_variant(model: HSModel, folder: Path, **meta) -> Path:
    """A copy of the model with some meta values replaced (classes, review_threshold), saved as a folder."""
    HSModel(model.net, {**copy.deepcopy(model.meta), **meta}, model.precedents, model.unknown).save(folder)
    return folder


@pytest.fixture(scope="module")
def catch_all_dir(tiny_model, tmp_path_factory) -> Path:
    # Two classes in chapter 08, one of them the catch-all "other codes of chapter 08".
    return save_variant(tiny_model, tmp_path_factory.mktemp("catch_all"),
                        classes=["0401200000", "0808100000", "0899999999"])


# --- the nomenclature ---------------------------------------------------------------------------------------------

def test_describe_uses_the_shipped_nomenclature():
    info = hs.describe("0808100000")
    assert info.description == "Fruit, edible; apples, fresh"
    assert info.heading == "Apples, pears and quinces; fresh"
    assert info.chapter == "Fruit and nuts, edible; peel of citrus fruit or melons"
    other = hs.describe("8799999999")
    assert other.description == "other codes of chapter 87" and other.heading is None
    assert other.chapter.startswith("Vehicles; other than railway")
    assert "not in the HS 2022" in hs.describe("0808990000").description
    assert hs.display("0808100000") == "0808.10-0000"
    assert (Path(hs.__file__).parent / "nomenclature" / "NOTICE.md").read_text().count("ODC-PDDL") >= 1


def test_rollup_sums_along_the_hierarchy():
    probs = {"0808100000": 0.5, "0808300000": 0.2, "0899999999": 0.1, "2009120000": 0.2}
    assert hs.chapters(probs) == pytest.approx({"08": 0.8, "20": 0.2})
    assert hs.headings(probs) == pytest.approx({"0808": 0.7, "2009": 0.2})  # a catch-all has no heading
    assert list(hs.chapters(probs)) == ["08", "20"]  # highest first


# --- output formats -----------------------------------------------------------------------------------------------

def test_json_schema_with_runs_uri_from_the_default_store(tiny_run, tmp_path, monkeypatch, capsys):
    """`runs:/<id>/model` resolves against <project root>/mlflow.db with no MLFLOW_TRACKING_URI, as after make
    train (the project root pointed at the tiny run's store), from any working directory."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(config, "ROOT_DIR", tiny_run["tracking_dir"])
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    shots = photos(tiny_run["store"], "0808100000")[:2] + photos(tiny_run["store"], "0401200000")[:1]
    code = R.main(["--model", f"runs:/{tiny_run['run_id']}/model", "--format", "json", "--top-k", "3",
                   *map(str, shots)])
    proc = capsys.readouterr()
    assert code == 0, proc.err
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ  # restored
    assert proc.err.strip() == ""
    lines = [json.loads(line) for line in proc.out.splitlines()]
    assert [d["image"] for d in lines] == [str(p) for p in shots]
    for d in lines:
        assert set(d) == {"image", "outcome", "candidates", "rollup", "needs_review", "unknown", "unknown_score",
                          "precedents", "precedent_agrees", "error", "model"}
        assert d["outcome"] in ("answer", "needs_review", "unknown")
        assert d["needs_review"] == (d["outcome"] != "answer") and d["unknown"] == (d["outcome"] == "unknown")
        assert d["model"] == {"run_id": tiny_run["run_id"], "registered_model": None, "version": None, "aliases": []}
        assert d["error"] is None and isinstance(d["unknown"], bool) and isinstance(d["unknown_score"], float)
        assert isinstance(d["needs_review"], bool)
        assert len(d["candidates"]) == 3 and all(set(c) == CANDIDATE_KEYS for c in d["candidates"])
        ps = [c["probability"] for c in d["candidates"]]
        assert ps == sorted(ps, reverse=True) and sum(ps) == pytest.approx(1, abs=1e-5)
        assert all(isinstance(c["description"], str) and c["chapter"] for c in d["candidates"])
        # Roll-up: every chapter and heading is the sum of its codes (all 3 classes are in the top 3).
        for level, digits in (("chapters", 2), ("headings", 4)):
            expect = {}
            for c in d["candidates"]:
                expect[c["hs_code"][:digits]] = expect.get(c["hs_code"][:digits], 0) + c["probability"]
            assert d["rollup"][level] == pytest.approx(expect, abs=1e-5)
    assert not (tmp_path / "mlflow.db").exists()  # nothing created where the command ran


def test_table_shows_rollup_beside_codes_and_review_marker(tiny_model, tmp_path, capsys):
    shot = demo_photo()
    strict = save_variant(tiny_model, tmp_path / "strict", review_threshold=1.01)
    assert R.main(["--model", str(strict), "--top-k", "2", str(shot)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = out.out.splitlines()
    assert lines[0] == f"{shot}  [NEEDS REVIEW]"
    assert lines[1].lstrip().startswith("1. ") and len([ln for ln in lines if ". " in ln[:6]]) == 2
    top = lines[1].split()
    code = top[1].replace(".", "").replace("-", "")
    assert f"chapter {code[:2]}: " in lines[1] and f"heading {code[:4]}: " in lines[1]
    assert hs.describe(code).description[:40] in lines[1]
    assert f"heading {code[:4]}: {hs.describe(code).heading[:40]}" in lines[3]

    lenient = save_variant(tiny_model, tmp_path / "lenient", review_threshold=0.0)
    assert R.main(["--model", str(lenient), str(shot)]) == 0
    assert "NEEDS REVIEW" not in capsys.readouterr().out


def test_catch_all_class_is_other_codes_of_its_chapter(catch_all_dir, capsys):
    shots = photos(ROOT / "data" / "demo", "2009120000")[:2]
    assert R.main(["--model", str(catch_all_dir), "--format", "json", "--top-k", "3", *map(str, shots)]) == 0
    for line in capsys.readouterr().out.splitlines():
        d = json.loads(line)
        by_code = {c["hs_code"]: c for c in d["candidates"]}
        other = by_code["0899999999"]
        assert other["description"] == "other codes of chapter 08" and other["heading"] is None
        assert other["chapter"] == "Fruit and nuts, edible; peel of citrus fruit or melons"
        p = {k: c["probability"] for k, c in by_code.items()}
        assert d["rollup"]["chapters"] == pytest.approx({"08": p["0808100000"] + p["0899999999"],
                                                         "04": p["0401200000"]}, abs=1e-5)
        assert d["rollup"]["headings"] == pytest.approx({"0808": p["0808100000"], "0401": p["0401200000"]},
                                                        abs=1e-5)
    assert R.main(["--model", str(catch_all_dir), "--top-k", "3", str(shots[0])]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if "0899.99-9999" in ln)
    assert "other codes of chapter 08" in row and "chapter 08: " in row and "heading" not in row


def test_group_by_folder_averages_the_photos(tiny_model, tmp_path):
    items = {"apple": demo_photo().parent.glob("0808100000_*.jpg"),
             "milk": demo_photo().parent.glob("0401200000_*.jpg")}
    for name, found in items.items():
        (tmp_path / name).mkdir()
        for src in sorted(found)[:3]:
            (tmp_path / name / src.name).write_bytes(src.read_bytes())
    (tmp_path / "milk" / "notes.txt").write_text("not a photo: folders take image extensions only")
    each = R.recommend(tiny_model, [tmp_path], top_k=3, num_workers=0)
    groups = R.recommend(tiny_model, [tmp_path], top_k=3, group_by="folder", num_workers=0)
    assert len(each) == 6 and [g.image for g in groups] == [str(tmp_path / "apple"), str(tmp_path / "milk")]
    for g in groups:
        members = [r for r in each if Path(r.image).parent == Path(g.image)]
        assert g.images == [r.image for r in members]
        mean = {c: sum(next(x["probability"] for x in r.candidates if x["hs_code"] == c) for r in members) / 3
                for c in tiny_model.classes}
        assert {c["hs_code"]: c["probability"] for c in g.candidates} == pytest.approx(mean, abs=1e-6)
        assert set(g.to_dict()) == {"folder", "images", "outcome", "candidates", "rollup", "needs_review", "unknown",
                                    "unknown_score", "precedents", "precedent_agrees", "error", "model"}
        assert g.candidates[0]["hs_code"] == max(mean, key=mean.get)


# --- bad input ----------------------------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A valid PNG start declaring width x height: enough for a decoder to see the size (and refuse it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_bad_input_batch(tiny_run, tmp_path, capsys):
    src = photos(tiny_run["store"], "0808100000")[0]
    rgb = Image.open(src).convert("RGB")
    d = tmp_path / "batch"
    d.mkdir()
    (d / "a_truncated.jpg").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (d / "b_empty.jpg").write_bytes(b"")
    (d / "c_text.jpg").write_text("this is not a photo\n")
    (d / "d_huge.png").write_bytes(png_header(20000, 20000))
    rgb.convert("CMYK").save(d / "e_cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(d / "f_alpha.png")
    rgb.convert("L").save(d / "g_gray.jpg")
    reasons = {"a_truncated.jpg": "cannot decode", "b_empty.jpg": "empty file", "c_text.jpg": "not an image",
               "d_huge.png": "too large"}

    proc = cli("--model", f"runs:/{tiny_run['run_id']}/model", "--format", "json", d,
               env={"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]})
    assert proc.returncode == 1, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 7 and "Traceback" not in proc.stderr
    for rec in out:
        name = Path(rec["image"]).name
        if name in reasons:
            assert rec["candidates"] == [] and rec["rollup"] == {} and rec["needs_review"] is True
            assert rec["error"].startswith(rec["image"] + ": ") and reasons[name] in rec["error"]
            assert "\n" not in rec["error"]
        else:
            assert rec["error"] is None and len(rec["candidates"]) == 3
    assert proc.stderr.strip() == "4 of 7 photos failed"

    # Table (in-process: the same main() the command runs): three blocks on stdout, one error line per bad file.
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]}):
        assert R.main(["--model", f"runs:/{tiny_run['run_id']}/model", str(d)]) == 1
    out = capsys.readouterr()
    errors = out.err.strip().splitlines()
    assert len(errors) == 5 and errors[-1] == "4 of 7 photos failed"
    assert sorted(e.split(": ", 2)[1] for e in errors[:4]) == sorted(str(d / n) for n in reasons)
    assert [line.split()[0] for line in out.out.splitlines() if line.startswith(str(d))] == [
        str(d / n) for n in ("e_cmyk.jpg", "f_alpha.png", "g_gray.jpg")]


def test_usage_errors_exit_2_with_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"])
    shot = str(photos(tiny_run["store"], "0808100000")[0])
    for uri in ("runs:/0123456789abcdef0123456789abcdef/model", "models:/no-such-model/1", "no/such/folder"):
        assert R.main(["--model", uri, shot]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: cannot load model {uri!r}"), err
    (tmp_path / "empty").mkdir()
    assert R.main(["--model", "runs:/x/model", str(tmp_path / "empty")]) == 2
    assert "no photos found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        R.main(["--model", "runs:/x/model", "--top-k", "0", shot])
    assert exc.value.code == 2


class _Payload:
    """Pickled, it would create a file when unpickled: stands in for hostile code in a model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_model_loading_runs_no_pickled_code(tiny_model, tmp_path, capsys):
    folder = save_variant(tiny_model, tmp_path / "hostile")
    marker = tmp_path / "pwned"
    # torch.load(weights_only=False) would call Path.touch(marker) while reading this file.
    torch.save({**tiny_model.net.state_dict(), "payload": _Payload(marker)}, folder / "weights.pt")
    assert R.main(["--model", str(folder), str(demo_photo())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load model" in err[0] and "refused" in err[0]
    assert not marker.exists()


# --- agreement with training --------------------------------------------------------------------------------------

def test_top1_on_the_test_split_equals_the_logged_test_top1(tiny_run, tiny_model, tmp_path):
    client = MlflowClient(tiny_run["tracking_uri"])
    split = client.download_artifacts(tiny_run["run_id"], "dataset/split.csv", str(tmp_path))
    rows = [r for r in csv.DictReader(open(split)) if r["split"] == "test" and r["view"] == "0"]
    recs = R.recommend(tiny_model, [r["path"] for r in rows], top_k=1, batch_size=4)  # several batches, workers
    assert [r.image for r in recs] == [r["path"] for r in rows] and not any(r.error for r in recs)
    correct = sum(rec.candidates[0]["hs_code"] == row["hs_code"] for rec, row in zip(recs, rows))
    logged = client.get_run(tiny_run["run_id"]).data.metrics["test/top1"]
    assert correct == round(logged * len(rows)) and correct / len(rows) == pytest.approx(logged, abs=1e-6)
