"""The raw store: the one on-disk format the crawler writes and every dataset reads.

Layout (one folder):

    STORE.json                      {"format": "hsflow-raw-store", "version": 1}
    rulings/<RRDC_NO>.json          one ruling: portal fields in full, normalized code, its photos
    photos/<hs10>_<RRDC_NO>_<n>.jpg the photos, named as in the study ("HS code + document number + serial")

One file per ruling, each written atomically (temp file + rename), so a killed writer leaves no half record and
a rerun can tell what is stored by listing a folder. A ruling record looks like:

    {"rrdc_no": "9920160000001", "category": "rulings", "hs_code": "2106900000",
     "hs_code_given": "2106.90-0000", "fields": {"RRDC_NO": ..., "DTRM_HS_SGN": ..., "CMDT_DESC": ...},
     "photos": [{"file": "2106900000_9920160000001_1.jpg", "sha256": "...", "width": 256, "height": 256,
                 "bytes": 12345, "source": "9920160000001-1.jpg"}]}

CLI: `python -m hsflow.store info PATH` and `python -m hsflow.store import-archive SRC DST [--short-side 256]`.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FORMAT = {"format": "hsflow-raw-store", "version": 1}
# The portal writes decided codes as 8708.29-0000, 제2208.90-9000호, 6109.10-1000(상의), 3207.20-9000 관세율표 해설서.
HS_PATTERN = re.compile(r"(\d{4})\.?(\d{2})-?(\d{4})")
SAFE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,200}$")


class StoreError(ValueError):
    """A store that cannot be read or written as asked; the message is one line naming the thing."""


def normalize_hs(code: str) -> str:
    """'0808.10-0000' (or any portal spelling, or plain digits of 6-10) -> '0808100000'."""
    m = HS_PATTERN.search(code or "")
    if m:
        return "".join(m.groups())
    digits = re.sub(r"\D", "", code or "")
    if 6 <= len(digits) <= 10 and len(digits) % 2 == 0:
        return digits.ljust(10, "0")
    raise StoreError(f"not an HS code: {code!r} (expected e.g. 0808.10-0000)")


def photo_name(hs_code: str, rrdc_no: str, serial: int, ext: str = ".jpg") -> str:
    ext = ext.lower() if ext.lower() in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp") else ".jpg"
    name = f"{hs_code}_{rrdc_no}_{serial}{ext}"
    if not SAFE_NAME.match(name):
        raise StoreError(f"unsafe photo name {name!r} (ruling {rrdc_no})")
    return name


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file, even after kill -9.
    `durable`: fsync before the rename (a power cut too); a bulk writer passes False and syncs once per batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Photo:
    """One stored photo with the ruling facts a dataset needs."""
    path: Path
    file: str
    sha256: str
    width: int
    height: int
    rrdc_no: str
    hs_code: str
    date: str = ""  # the ruling's enforcement date (ENFR_DT, YYYY-MM-DD); "" when the record has none


class RawStore:
    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root)
        marker = self.root / "STORE.json"
        if create:
            (self.root / "rulings").mkdir(parents=True, exist_ok=True)
            (self.root / "photos").mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                atomic_write(marker, json.dumps(FORMAT).encode())
        elif not self.root.is_dir():
            raise StoreError(f"raw store not found: {self.root} (set paths.raw_store, or run `make crawl-demo`)")
        elif not marker.is_file():
            raise StoreError(f"{self.root} is not an hsflow raw store (no STORE.json); "
                             "create one with `python -m hsflow.store import-archive` or the crawler")

    # -- reading ------------------------------------------------------------------------------------------------
    def ruling_ids(self) -> set[str]:
        return {p.stem for p in (self.root / "rulings").glob("*.json")}

    def has_ruling(self, rrdc_no: str) -> bool:
        return (self.root / "rulings" / f"{rrdc_no}.json").is_file()

    def rulings(self) -> Iterator[dict]:
        for path in sorted((self.root / "rulings").glob("*.json")):
            try:
                yield json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                print(f"warning: skipping unreadable ruling record {path}: {exc}", file=sys.stderr)

    def photos(self) -> Iterator[Photo]:
        for r in self.rulings():
            for p in r.get("photos", []):
                yield Photo(self.root / "photos" / p["file"], p["file"], p["sha256"], p["width"], p["height"],
                            r["rrdc_no"], r["hs_code"], ruling_date(r))

    # -- writing ------------------------------------------------------------------------------------------------
    def photo_path(self, name: str) -> Path:
        """The path for a photo file name, refusing names that would escape the store (`../`, `/abs`)."""
        if not SAFE_NAME.match(name) or ".." in name:
            raise StoreError(f"refusing photo name {name!r}: it would escape the store or is not a plain name")
        return self.root / "photos" / name

    def write_photo(self, name: str, data: bytes, *, source: str = "", durable: bool = True) -> dict:
        """Validate (decodes, within the pixel limit) and store one photo atomically; returns its record entry."""
        from hsflow.core.images import open_rgb  # PIL only where photos are written

        path = self.photo_path(name)
        img = open_rgb(data, name=name)  # raises PhotoError for non-images and bombs
        atomic_write(path, data, durable)
        return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "width": img.width,
                "height": img.height, "bytes": len(data), "source": source}

    def write_ruling(self, record: dict, durable: bool = True) -> Path:
        """Store one ruling record atomically; its photos must be written first (record last = ruling complete)."""
        rrdc = str(record.get("rrdc_no", ""))
        if not SAFE_NAME.match(rrdc):
            raise StoreError(f"refusing ruling number {rrdc!r}: not a plain identifier")
        path = self.root / "rulings" / f"{rrdc}.json"
        atomic_write(path, json.dumps(record, ensure_ascii=False, indent=1).encode("utf-8"), durable)
        return path

    # -- description --------------------------------------------------------------------------------------------
    def info(self, *, check_decode: bool = True) -> dict:
        from hsflow.core.images import PhotoError, open_rgb

        codes, per_chapter, bad = set(), collections.Counter(), []
        n_rulings = n_photos = 0
        for r in self.rulings():
            n_rulings += 1
            codes.add(r["hs_code"])
            for p in r.get("photos", []):
                n_photos += 1
                per_chapter[r["hs_code"][:2]] += 1
                if check_decode:
                    try:
                        open_rgb(self.root / "photos" / p["file"])
                    except PhotoError as exc:
                        bad.append({"file": p["file"], "rrdc_no": r["rrdc_no"], "reason": exc.reason})
        return {"path": str(self.root), "rulings": n_rulings, "photos": n_photos, "codes": len(codes),
                "photos_per_chapter": dict(sorted(per_chapter.items())), "undecodable_photos": len(bad),
                "undecodable": bad}


def ruling_date(record: dict) -> str:
    """The ruling's enforcement date as YYYY-MM-DD ("" when missing): the portal writes 2016-04-06 or 20160406."""
    raw = str((record.get("fields") or {}).get("ENFR_DT") or "")
    digits = re.sub(r"\D", "", raw)
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}" if len(digits) >= 8 else ""


def ruling_record(fields: dict, category: str, photos: list[dict]) -> dict:
    """Build a store record from the portal's fields (detail values in full) and the stored photo entries."""
    given = fields.get("DTRM_HS_SGN", "")
    return {"rrdc_no": str(fields["RRDC_NO"]), "category": category, "hs_code": normalize_hs(given),
            "hs_code_given": given, "fields": fields, "photos": photos}


IMPORT_BATCH = 500  # rulings per sync of an archive import


def import_archive(src: Path, dst: Path, short_side: int | None = 256, quality: int = 72) -> dict:
    """Convert a portal-shaped archive (rulings.jsonl + images/, like shared/demo-portal) into a raw store,
    optionally re-encoding photos so the short side is at most `short_side` pixels (keeps the shipped demo lean)."""
    from hsflow.core.images import PhotoError, open_rgb
    from tqdm import tqdm

    store = RawStore(dst, create=True)
    lines = (src / "rulings.jsonl").read_text(encoding="utf-8").splitlines()
    skipped = 0
    # One fsync per file made a 26,000-photo import wait minutes on the disk: rulings go in batches instead, each
    # batch's photos synced before its records are written (a record still never points at a photo a power cut
    # could lose), the records synced before the next batch.
    batch: list[dict] = []

    def flush():
        os.sync()
        for record in batch:
            store.write_ruling(record, durable=False)
        os.sync()
        batch.clear()

    for line in tqdm(lines, desc="import rulings", unit="ruling"):
        fields = json.loads(line)
        images = fields.pop("images", [])
        hs = normalize_hs(fields["DTRM_HS_SGN"])
        photos = []
        for serial, name in enumerate(images, 1):
            data = (src / "images" / Path(name).name).read_bytes()
            if short_side:
                try:
                    img = open_rgb(data, name=name)
                except PhotoError as exc:
                    print(f"warning: {exc}; skipped", file=sys.stderr)
                    skipped += 1
                    continue
                if min(img.size) > short_side:
                    scale = short_side / min(img.size)
                    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=3)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=quality, optimize=True)
                data = buf.getvalue()
            photos.append(store.write_photo(photo_name(hs, fields["RRDC_NO"], serial), data, source=name,
                                            durable=False))
        batch.append(ruling_record(fields, "rulings", photos))
        if len(batch) >= IMPORT_BATCH:
            flush()
    flush()
    return {"rulings": len(lines), "skipped_photos": skipped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.store", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="print one JSON object describing a store")
    p_info.add_argument("path", type=Path)
    p_info.add_argument("--no-decode", action="store_true", help="skip decoding every photo")
    p_imp = sub.add_parser("import-archive", help="convert a portal-shaped archive into a raw store")
    p_imp.add_argument("src", type=Path)
    p_imp.add_argument("dst", type=Path)
    p_imp.add_argument("--short-side", type=int, default=256, help="re-encode to at most this short side (0: keep)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            print(json.dumps(RawStore(args.path).info(check_decode=not args.no_decode), ensure_ascii=False))
        else:
            print(json.dumps(import_archive(args.src, args.dst, args.short_side or None)))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
