"""The raw-store writer: Scrapy's FilesPipeline fetches a ruling's photos, hsflow's RawStore stores them.

FilesPipeline brings scheduling through the downloader (retries, throttling, robots.txt), de-duplication of
photo requests and its "already stored?" check, pointed at the store's photos/ folder so that photos a killed
crawl had written are not fetched again. Storing goes through RawStore: every photo is validated (decodes, within
the pixel limit) and written atomically under the study's name, bytes unchanged; the ruling record is written last,
so a record on disk means a complete ruling.

A photo refused for what it is (not an image, a decompression bomb) is left out of the record for good; a photo
that failed to arrive (HTTP error, truncated body after retries) leaves the ruling unstored, so a rerun fetches it.
"""
from __future__ import annotations

import logging

from scrapy import Request
from scrapy.exceptions import DropItem, IgnoreRequest
from scrapy.http.request import NO_CALLBACK
from scrapy.pipelines.files import FilesPipeline
from scrapy.pipelines.media import FileException
from scrapy.utils.asyncio import run_in_thread

from hsflow.core.images import PhotoError
from hsflow.data.store import RawStore, StoreError, ruling_record

logger = logging.getLogger(__name__)
# PhotoError reasons that no retry can cure; anything else ("cannot decode": e.g. a cut body) may be transient.
PERMANENT = ("not an image", "image too large", "empty file")


class RawStorePipeline(FilesPipeline):
    @classmethod
    def from_crawler(cls, crawler):
        raw = RawStore(crawler.settings["RAW_STORE"], create=True)
        pipe = cls(str(raw.root / "photos"), crawler=crawler)
        pipe.raw = raw
        pipe.stored = {}  # photo file name -> its record entry, for photos written this run
        return pipe

    def open_spider(self):
        super().open_spider()
        # Temp files of a crawl killed mid-write (kill -9 skips atomic_write's cleanup). One crawler per store.
        stale = [p for folder in ("photos", "rulings") for p in (self.raw.root / folder).glob(".*.part")]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            logger.info("removed %d temp files left by an interrupted crawl", len(stale))
            self.stat("stale_temp_files_removed", len(stale))

    def stat(self, key: str, n: int = 1) -> None:
        self.crawler.stats.inc_value(f"hsflow/{key}", n)

    def get_media_requests(self, item, info):
        return [Request(p["url"], callback=NO_CALLBACK,
                        meta={"clip": "photo", "photo_name": p["name"], "photo_source": p["source"],
                              "rrdc_no": item["rrdc_no"]})
                for p in item["photos"]]

    def file_path(self, request, response=None, info=None, *, item=None):
        return request.meta["photo_name"]

    async def media_downloaded(self, response, request, info, *, item=None):
        if response.status != 200 or not response.body:
            return await super().media_downloaded(response, request, info, item=item)  # raises, logged there
        name, rrdc = request.meta["photo_name"], request.meta["rrdc_no"]
        try:  # decode + fsync off the reactor thread
            entry = await run_in_thread(self.raw.write_photo, name, response.body,
                                        source=request.meta["photo_source"])
        except (PhotoError, StoreError) as exc:
            reason = getattr(exc, "reason", str(exc))
            if isinstance(exc, PhotoError) and not reason.startswith(PERMANENT):
                raise FileException(reason) from None  # -> media_failed: the ruling stays unstored
            logger.warning("refused (photo): ruling %s: %s from %s", rrdc, exc, request.url)
            self.stat(f"refused/photo_{reason.split(' (')[0].replace(' ', '_')}")
            return {"url": request.url, "path": name, "checksum": None, "status": "refused"}
        self.inc_stats("downloaded")
        self.stored[name] = entry
        return {"url": request.url, "path": name, "checksum": entry["sha256"], "status": "downloaded"}

    def media_failed(self, failure, request, info):
        if isinstance(failure.value, IgnoreRequest):
            return super().media_failed(failure, request, info)
        logger.warning("photo failed: ruling %s: %s from %s", request.meta.get("rrdc_no"), failure.value,
                       request.url)
        self.stat("photos_failed")
        raise FileException(str(failure.value))

    def _entry(self, photo: dict, result: dict) -> dict:
        """The record entry for a photo FilesPipeline did not write this run: one stored by an earlier run
        ("uptodate"), or the same URL already fetched for another ruling (stored under that ruling's name)."""
        entry = self.stored.pop(photo["name"], None)
        if entry is None:
            data = (self.raw.root / "photos" / result["path"]).read_bytes()
            entry = self.raw.write_photo(photo["name"], data, source=photo["source"])
            self.stat("photos_reused")
        return entry

    def item_completed(self, results, item, info):
        rrdc, entries, failed = item["rrdc_no"], [], 0
        for (ok, result), photo in zip(results, item["photos"]):
            if not ok:
                failed += 1
            elif result["status"] != "refused":
                try:
                    entries.append(self._entry(photo, result))
                except (OSError, PhotoError, StoreError) as exc:
                    logger.warning("photo failed: ruling %s: %s", rrdc, exc)
                    failed += 1
        if failed:
            self.stat("rulings_incomplete")
            raise DropItem(f"ruling {rrdc}: {failed} of {len(item['photos'])} photos failed; not stored, "
                           "a rerun fetches it")
        return ruling_record(dict(item["fields"]), item["category"], entries)

    async def process_item(self, item):
        record = await super().process_item(item)  # photos fetched and stored, then item_completed's record
        try:  # the record last, off the reactor thread (fsync)
            await run_in_thread(self.raw.write_ruling, record)
        except StoreError as exc:
            self.stat("refused/ruling")
            raise DropItem(f"refused (ruling): {exc}") from None
        self.stat("rulings_stored")
        self.stat("photos_stored", len(record["photos"]))
        return item
