"""Run the spider in a child process (a Twisted reactor cannot restart, so each crawl gets its own process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Throttling off, for the local stand-in only (tests, benchmark, demo): never point these at the real portal.
FAST = {"AUTOTHROTTLE_ENABLED": False, "DOWNLOAD_DELAY": 0, "DOWNLOAD_DELAY_JITTER": 0,
        "CONCURRENT_REQUESTS": 32, "CONCURRENT_REQUESTS_PER_DOMAIN": 32, "CLIP_BACKOFF_BASE": 0.05,
        "CLIP_BACKOFF_MAX": 1.0, "DOWNLOAD_TIMEOUT": 10, "LOG_LEVEL": "INFO",
        # no consoles listening on local ports while tests run crawls side by side
        "TELNETCONSOLE_ENABLED": False, "REMOTE_CONTROL_ENABLED": False}


def crawl_command(base_url: str, store: Path, *, settings: dict | None = None, args: dict | None = None,
                  stats_file: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "scrapy", "crawl", "clip_rulings",
           "-s", f"CLIP_BASE_URL={base_url}", "-s", f"RAW_STORE={Path(store).resolve()}"]
    if stats_file:
        cmd += ["-s", f"HSFLOW_STATS_FILE={Path(stats_file).resolve()}"]
    for k, v in (settings or {}).items():
        cmd += ["-s", f"{k}={v}"]
    for k, v in (args or {}).items():
        cmd += ["-a", f"{k}={v}"]
    return cmd


def env() -> dict:
    # No public-suffix setting here: the project's settings keep tldextract offline for every `scrapy crawl`.
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


def crawl(base_url: str, store: Path, *, settings: dict | None = None, args: dict | None = None,
          log: Path | None = None, timeout: float | None = None) -> tuple[int, dict]:
    """Crawl `base_url` into the raw store `store`; returns (exit status, crawl stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.json"
        out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            rc = subprocess.run(crawl_command(base_url, store, settings=settings, args=args, stats_file=stats_file),
                                cwd=HERE, env=env(), stdout=out, stderr=subprocess.STDOUT if log else None,
                                timeout=timeout).returncode
        finally:
            if log:
                out.close()
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return rc, stats
