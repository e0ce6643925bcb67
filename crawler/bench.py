"""Benchmark: rulings per second for a full crawl of an archive through the local stand-in, throttling off.

    python -m crawler.bench [--archive ../shared/demo-portal] [--rulings N]

A measure of the crawler's own cost (parsing, validation, atomic writes), not of the portal: against the real
site the 1 s politeness delay bounds a crawl at under one request per second.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from .runner import FAST, crawl
from .standin import serve

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "demo-portal"


def _subset(archive: Path, n: int, dst: Path) -> Path:
    """The first n records of a portal-shaped archive, images linked, as a new archive."""
    lines = (archive / "rulings.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (dst / "images").mkdir(parents=True)
    for line in lines:
        for name in json.loads(line).get("images", []):
            (dst / "images" / name).symlink_to(archive / "images" / name)
    (dst / "rulings.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def crawl_rulings_per_s(archive: str | Path = DEFAULT_ARCHIVE, n_rulings: int | None = None) -> dict:
    """Time one full crawl of `archive` (optionally its first `n_rulings` records) into a temporary store."""
    archive = Path(archive)
    with tempfile.TemporaryDirectory(prefix="hsflow-crawl-bench-") as tmp:
        tmp = Path(tmp)
        if n_rulings:
            archive = _subset(archive, n_rulings, tmp / "archive")
        with serve(archive) as portal:
            t0 = time.perf_counter()
            rc, stats = crawl(portal.url, tmp / "store", settings={**FAST, "LOG_LEVEL": "WARNING"})
            seconds = time.perf_counter() - t0
        shutil.rmtree(tmp / "store", ignore_errors=True)
    rulings = stats.get("hsflow/rulings_stored", 0)
    return {"rulings": rulings, "photos": stats.get("hsflow/photos_stored", 0), "seconds": round(seconds, 2),
            "rulings_per_s": round(rulings / seconds, 1), "photos_per_s": round(stats.get(
                "hsflow/photos_stored", 0) / seconds, 1), "requests": stats.get("downloader/request_count", 0),
            "exit_status": rc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crawler.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--rulings", type=int, default=None, help="crawl only the first N records")
    args = ap.parse_args(argv)
    result = crawl_rulings_per_s(args.archive, args.rulings)
    print(json.dumps(result))
    return result["exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
