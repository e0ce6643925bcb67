"""The raw store: code normalization, safe names, atomic records, `info`, import of a portal archive."""
import json
import subprocess

import pytest

from conftest import DEMO, PY, ROOT, SHARED
from hsflow.data.store import RawStore, StoreError, import_archive, normalize_hs, photo_name


@pytest.mark.parametrize("given, expected", [
    ("0808.10-0000", "0808100000"), ("제2208.90-9000호", "2208909000"), ("6109.10-1000(상의)", "6109101000"),
    ("3207.20-9000 관세율표 해설서", "3207209000"), ("080810", "0808100000"), ("8708299000", "8708299000")])
def test_normalize_hs(given, expected):
    assert normalize_hs(given) == expected


def test_normalize_hs_rejects_garbage():
    with pytest.raises(StoreError, match="not an HS code"):
        normalize_hs("apple")


def test_photo_names_follow_the_study_and_refuse_escapes(tmp_path):
    assert photo_name("0808100000", "9920160000001", 1) == "0808100000_9920160000001_1.jpg"
    store = RawStore(tmp_path / "s", create=True)
    for bad in ("../evil.jpg", "/etc/passwd", "a/../../b.jpg", ".hidden"):
        with pytest.raises(StoreError, match="refusing"):
            store.photo_path(bad)


def test_write_ruling_is_atomic_and_complete(tmp_path):
    store = RawStore(tmp_path / "s", create=True)
    data = next((DEMO / "photos").glob("*.jpg")).read_bytes()
    entry = store.write_photo("0808100000_1_1.jpg", data, source="x.jpg")
    assert entry["width"] > 0 and len(entry["sha256"]) == 64 and entry["bytes"] == len(data)
    store.write_ruling({"rrdc_no": "1", "hs_code": "0808100000", "photos": [entry]})
    assert store.has_ruling("1") and not list(tmp_path.rglob("*.part"))
    assert [p.file for p in store.photos()] == ["0808100000_1_1.jpg"]


def test_write_photo_refuses_non_images(tmp_path):
    from hsflow.core.images import PhotoError

    store = RawStore(tmp_path / "s", create=True)
    with pytest.raises(PhotoError, match="not an image"):
        store.write_photo("0808100000_1_1.jpg", b"<html>not a photo</html>")
    assert not list((tmp_path / "s" / "photos").iterdir())


def test_shipped_demo_info_cli():
    out = subprocess.run([PY, "-m", "hsflow.store", "info", str(DEMO)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    info = json.loads(out)
    assert (info["rulings"], info["photos"], info["codes"], info["undecodable_photos"]) == (955, 2936, 42, 0)
    assert info["photos_per_chapter"]["08"] == 1253


def test_info_counts_undecodable_photos(tiny_store, tmp_path):
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(tiny_store, store_dir)
    victim = sorted((store_dir / "photos").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    info = RawStore(store_dir).info()
    assert info["undecodable_photos"] == 1 and info["undecodable"][0]["file"] == victim.name


def test_missing_store_is_one_clear_line(tmp_path):
    proc = subprocess.run([PY, "-m", "hsflow.store", "info", str(tmp_path / "nope")], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "raw store not found" in proc.stderr


@pytest.mark.skipif(not (SHARED / "demo-portal").is_dir(), reason="needs ../shared/demo-portal")
def test_import_archive_keeps_fields_and_names(tmp_path):
    src = tmp_path / "archive"
    (src / "images").mkdir(parents=True)
    lines = (SHARED / "demo-portal" / "rulings.jsonl").read_text().splitlines()[:3]
    (src / "rulings.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        for name in json.loads(line)["images"]:
            (src / "images" / name).write_bytes((SHARED / "demo-portal" / "images" / name).read_bytes())
    import_archive(src, tmp_path / "store", short_side=None)
    rec = json.loads(lines[0])
    stored = json.loads((tmp_path / "store" / "rulings" / f"{rec['RRDC_NO']}.json").read_text())
    assert stored["fields"]["CMDT_DESC"] == rec["CMDT_DESC"] and stored["hs_code_given"] == rec["DTRM_HS_SGN"]
    assert [p["source"] for p in stored["photos"]] == rec["images"]
    assert stored["photos"][0]["file"] == f"{stored['hs_code']}_{rec['RRDC_NO']}_1.jpg"
