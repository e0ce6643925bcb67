"""Reporting: the crawl stats as a JSON file (a stats collector) and a progress display (an extension)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.asyncio import create_looping_call


class JsonFileStatsCollector(MemoryStatsCollector):
    """HSFLOW_STATS_FILE=path: also write the final crawl stats there as JSON (tests and the benchmark read it)."""

    def _persist_stats(self, stats):
        super()._persist_stats(stats)
        path = self._crawler.settings.get("HSFLOW_STATS_FILE")
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_text(json.dumps(stats, default=str, indent=1, sort_keys=True))
            tmp.replace(path)


class Progress:
    """HSFLOW_PROGRESS=1: a tqdm bar on stderr, rulings done / to fetch, with photos and errors."""

    def __init__(self, crawler):
        from tqdm import tqdm

        self.stats = crawler.stats
        self.bar = tqdm(total=0, unit="ruling", desc="crawl", file=sys.stderr, dynamic_ncols=True)
        self.loop = create_looping_call(self.update)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler):
        if not crawler.settings.getbool("HSFLOW_PROGRESS"):
            raise NotConfigured
        return cls(crawler)

    def value(self, key: str) -> int:
        return self.stats.get_value(f"hsflow/{key}", 0)

    def update(self):
        s = self.stats.get_stats()
        errors = sum(v for k, v in s.items() if k.startswith("hsflow/refused/")) + self.value("rulings_incomplete")
        self.bar.total = self.value("rulings_listed") - self.value("rulings_skipped_stored")
        self.bar.n = self.value("rulings_stored") + self.value("rulings_incomplete") + sum(
            v for k, v in s.items() if k.startswith("hsflow/refused/detail_"))
        self.bar.set_postfix(stored=self.value("rulings_stored"), skipped=self.value("rulings_skipped_stored"),
                             photos=self.value("photos_stored"), retries=s.get("retry/count", 0), errors=errors,
                             refresh=False)
        self.bar.refresh()

    def spider_opened(self, spider):
        self.loop.start(0.5)

    def spider_closed(self, spider, reason):
        if self.loop.running:
            self.loop.stop()
        self.update()
        self.bar.close()
