"""The spider: open the session screen, list rulings by enforcement-date range, fetch each ruling's detail.

    scrapy crawl clip_rulings [-a category=rulings|council|committee|all] [-a start=YYYY-MM-DD -a end=YYYY-MM-DD]

Ranges are calendar years, halved again while a range needs more than CLIP_MAX_PAGES pages (the portal fails on
deep pages). Rulings already in the raw store are skipped before any detail or photo request, so a rerun fetches
only what is missing. Photos are downloaded and stored by the pipeline.
"""
from __future__ import annotations

import math
from datetime import date, timedelta
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

import scrapy
from scrapy.settings import SETTINGS_PRIORITIES

from hsflow.data.store import SAFE_NAME, RawStore, StoreError, normalize_hs, photo_name

from ..items import RulingItem
from ..parsing import FULL_ONLY, PortalError, parse_detail, parse_list
from ..portal import CATEGORIES, ajax_headers, detail_form, list_form

FIELD_ORDER = ("RRDC_NO", "REFF_NO", "DOCID", "ENFR_DT", "ENFR_ISTT", "DTRM_HS_SGN", "CMDT_NM", "CMDT_DESC",
               "DTRM_RSN_CN")


def year_ranges(start: date, end: date) -> list[tuple[date, date]]:
    return [(max(start, date(y, 1, 1)), min(end, date(y, 12, 31))) for y in range(start.year, end.year + 1)]


def halves(start: date, end: date) -> list[tuple[date, date]]:
    mid = start + timedelta(days=(end - start).days // 2)
    return [(start, mid), (mid + timedelta(days=1), end)]


def unsafe_src(src: str) -> bool:
    """A photo src that names a path outside its folder (`../`), a local path or a non-web scheme."""
    parts = urlsplit(src)
    path = unquote(parts.path)
    return (parts.scheme not in ("", "http", "https") or "\\" in path or "\x00" in path
            or ".." in path.split("/"))


class ClipRulingsSpider(scrapy.Spider):
    name = "clip_rulings"

    def __init__(self, category: str = "all", start: str = "1990-01-01", end: str | None = None, **kwargs):
        super().__init__(**kwargs)
        names = list(CATEGORIES) if category in ("all", "") else [c.strip() for c in category.split(",")]
        unknown = [n for n in names if n not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown category {unknown} (choose from {', '.join(CATEGORIES)} or all)")
        self.category_names = names
        self.start_date = date.fromisoformat(start)
        self.end_date = date.fromisoformat(end) if end else date.today()
        self.seen: set[str] = set()  # ruling numbers listed this run: the portal repeats items

    @classmethod
    def update_settings(cls, settings):
        super().update_settings(settings)
        # An honest User-Agent names a contact; -s CLIP_CONTACT=... fills it in unless USER_AGENT is set outright.
        if settings.getpriority("USER_AGENT") <= SETTINGS_PRIORITIES["project"]:
            settings.set("USER_AGENT", settings["CLIP_USER_AGENT"].format(contact=settings["CLIP_CONTACT"]),
                         priority="spider")

    @classmethod
    def from_crawler(cls, crawler, *args, **kwargs):
        spider = super().from_crawler(crawler, *args, **kwargs)
        s = crawler.settings
        spider.base_url = s["CLIP_BASE_URL"].rstrip("/")
        spider.store = RawStore(s["RAW_STORE"], create=True)
        spider.page_unit = s.getint("CLIP_PAGE_UNIT")
        spider.max_pages = s.getint("CLIP_MAX_PAGES")
        return spider

    # -- helpers ------------------------------------------------------------------------------------------------
    def stat(self, key: str, n: int = 1) -> None:
        self.crawler.stats.inc_value(f"hsflow/{key}", n)

    def refuse(self, what: str, message: str) -> None:
        """Hostile or broken data: one log line naming the ruling/range, one stat, and the crawl goes on."""
        self.logger.warning("refused (%s): %s", what, message)
        self.stat(f"refused/{what}")

    def screen_url(self, category: str) -> str:
        cat = CATEGORIES[category]
        return cat.url(self.base_url, cat.screen)

    def list_request(self, category: str, start: date, end: date, page: int) -> scrapy.FormRequest:
        cat = CATEGORIES[category]
        return scrapy.FormRequest(
            cat.url(self.base_url, "retrieveDmstPrlstClsfCaseLst2.do"),
            formdata=list_form(cat, start.isoformat(), end.isoformat(), page, self.page_unit),
            headers=ajax_headers(self.screen_url(category)), callback=self.parse_list,
            cb_kwargs={"category": category, "start": start.isoformat(), "end": end.isoformat(), "page": page},
            meta={"clip": "list"})

    # -- callbacks ----------------------------------------------------------------------------------------------
    async def start(self):
        for category in self.category_names:
            # Always fetched (dont_filter), first (priority): it sets the session cookies every data call needs,
            # also when a JOBDIR resume brings queued list/detail requests from an earlier session.
            yield scrapy.Request(self.screen_url(category), callback=self.parse_screen, dont_filter=True,
                                 priority=100, cb_kwargs={"category": category}, meta={"clip": "screen"})

    def parse_screen(self, response, category: str):
        for start, end in year_ranges(self.start_date, self.end_date):
            yield self.list_request(category, start, end, 1)

    def parse_list(self, response, category: str, start: str, end: str, page: int):
        where = f"{category} {start}..{end} page {page}"
        try:
            total, items = parse_list(response.body)
        except PortalError as exc:
            if exc.reason == "html_page":
                self.logger.error("list %s: %s", where, exc)
            self.refuse(f"list_{exc.reason}", f"list {where}: {exc}")
            return
        self.stat("requests_ok/list")
        pages = math.ceil(total / self.page_unit)
        if page == 1:
            st, ed = date.fromisoformat(start), date.fromisoformat(end)
            if pages > self.max_pages and st < ed:  # too deep: list the two halves instead
                self.stat("list_splits")
                for a, b in halves(st, ed):
                    yield self.list_request(category, a, b, 1)
                return
            if pages > self.max_pages:
                self.logger.warning("list %s: %d rulings on one day (%d pages): deep pages may fail", where, total,
                                    pages)
            if total > len(items) < self.page_unit:
                self.logger.error("list %s: %d items for pageUnit=%d of %d: the portal no longer reads pageUnit?",
                                  where, len(items), self.page_unit, total)
            for p in range(2, pages + 1):
                yield self.list_request(category, st, ed, p)
        for listed in items:
            rrdc = listed.get("RRDC_NO", "")
            if not SAFE_NAME.match(rrdc):
                self.refuse("ruling_id", f"list {where}: ruling number {rrdc!r} is not a plain identifier")
                continue
            if rrdc in self.seen:
                self.stat("rulings_repeated")
                continue
            self.seen.add(rrdc)
            self.stat("rulings_listed")
            if self.store.has_ruling(rrdc):
                self.stat("rulings_skipped_stored")
                continue
            cat = CATEGORIES[category]
            yield scrapy.FormRequest(
                cat.url(self.base_url, cat.detail), formdata=detail_form(cat, rrdc),
                headers=ajax_headers(self.screen_url(category)), callback=self.parse_detail,
                cb_kwargs={"category": category, "listed": listed}, meta={"clip": "detail", "rrdc_no": rrdc})

    def parse_detail(self, response, category: str, listed: dict):
        rrdc = listed["RRDC_NO"]
        try:
            detail = parse_detail(response.body)
            hs = normalize_hs(detail.fields["DTRM_HS_SGN"])
        except (PortalError, StoreError) as exc:
            self.refuse(f"detail_{getattr(exc, 'reason', 'code')}", f"ruling {rrdc}: {exc}")
            return
        self.stat("requests_ok/detail")
        for key in FULL_ONLY:
            if key not in detail.fields and key in listed:
                self.logger.warning("ruling %s: the detail has no %s; keeping the list's (cut) text", rrdc, key)
                self.stat("detail_missing_field")
        if listed.get("DTRM_HS_SGN") and normalize_hs_or_none(listed["DTRM_HS_SGN"]) not in (None, hs):
            self.logger.warning("ruling %s: list code %s differs from detail code %s; keeping the detail's", rrdc,
                                listed["DTRM_HS_SGN"], detail.fields["DTRM_HS_SGN"])
        merged = {**listed, **detail.fields, "RRDC_NO": rrdc}
        fields = {k: merged[k] for k in FIELD_ORDER if k in merged} | merged
        photos = []
        for serial, src in enumerate(detail.photos, 1):
            if unsafe_src(src):
                self.refuse("photo_path", f"ruling {rrdc}: photo src {src!r} would escape its folder")
                continue
            url = response.urljoin(src)
            path = PurePosixPath(unquote(urlsplit(url).path))
            photos.append({"url": url, "name": photo_name(hs, rrdc, serial, path.suffix), "source": path.name})
        yield RulingItem(rrdc_no=rrdc, category=category, fields=fields, photos=photos)


def normalize_hs_or_none(code: str) -> str | None:
    try:
        return normalize_hs(code)
    except StoreError:
        return None
