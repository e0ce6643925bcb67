"""`make crawl-demo`: serve the shipped demo store through the local stand-in portal and crawl it, offline.

    python -m crawler.crawl_demo [--out data/crawl] [--port 8765] [--archive data/demo] [--faults 0.2 --seed 1]

The stand-in listens on 127.0.0.1 only; the spider runs with throttling off (it is our own server), writes the
raw store to --out with a progress bar (rulings done / to fetch, photos, errors) and its log to <out>/crawl.log,
and the store is described at the end. Run it again: only what is missing is fetched.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hsflow.data.store import RawStore

from .runner import FAST, crawl
from .standin import serve

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crawler.crawl_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=ROOT / "data" / "demo", help="what the stand-in serves")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "crawl", help="the raw store to crawl into")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--faults", type=float, default=0.0, help="let the stand-in misbehave this often")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    log = out / "crawl.log"  # beside rulings/ and photos/: store readers ignore it, and data/crawl/ is git-ignored
    out.mkdir(parents=True, exist_ok=True)
    try:
        server = serve(args.archive, port=args.port, faults=args.faults, seed=args.seed)
        portal = server.__enter__()
    except OSError as exc:
        print(f"error: cannot serve on 127.0.0.1:{args.port} ({exc}); try --port", file=sys.stderr)
        return 2
    try:
        print(f"stand-in portal on {portal.url}: {len(portal.rulings)} rulings from {args.archive}", flush=True)
        print(f"crawling into {out} (log: {log})", flush=True)
        settings = {**FAST, "HSFLOW_PROGRESS": True, "LOG_FILE": log, "LOG_FILE_APPEND": False}
        rc, stats = crawl(portal.url, out, settings=settings)
    finally:
        server.__exit__(None, None, None)
    keys = ("rulings_listed", "rulings_skipped_stored", "rulings_stored", "rulings_incomplete", "photos_stored")
    summary = {k: stats.get(f"hsflow/{k}", 0) for k in keys}
    summary["refused"] = {k.split("/", 2)[2]: v for k, v in stats.items() if k.startswith("hsflow/refused/")}
    summary["retries"] = stats.get("retry/count", 0)
    summary["seconds"] = round(stats.get("elapsed_time_seconds", 0), 1)
    print("crawl:", json.dumps(summary, ensure_ascii=False))
    if rc:
        print(f"error: the crawl exited with status {rc}; see {log}", file=sys.stderr)
        return rc
    info = RawStore(out).info()
    info.pop("undecodable")
    print("store:", json.dumps(info, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
