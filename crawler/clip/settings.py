"""Settings of the CLIP crawler: manners for the real portal by default; tests and benchmarks turn throttling off
with -s (see crawler/runner.py FAST)."""
import os

from .portal import REAL_BASE_URL  # relative: this package is `clip` or `crawler.clip`

# Offline-quiet: Scrapy's cookie middleware asks tldextract whether a cookie's domain is a public suffix, and
# tldextract fetches the public-suffix list from the internet on first use (a multi-screen traceback where there is
# none). Its bundled snapshot answers that for one portal, so the crawl talks to the portal alone. tldextract reads
# this when scrapy.downloadermiddlewares.cookies is imported, which Scrapy does after loading these settings.
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

# `scrapy crawl` (cwd crawler/) imports this package as `clip`; `python -m crawler...` as `crawler.clip`.
_PKG = __name__.rpartition(".")[0]

BOT_NAME = "hsflow-clip"
SPIDER_MODULES = [f"{_PKG}.spiders"]
NEWSPIDER_MODULE = f"{_PKG}.spiders"

# -- what to crawl, and where to --------------------------------------------------------------------------------
CLIP_BASE_URL = REAL_BASE_URL
RAW_STORE = "../data/raw"          # relative to crawler/, where `scrapy crawl` runs
CLIP_PAGE_UNIT = 100               # rulings per list page
CLIP_MAX_PAGES = 20                # a date range needing more pages is halved (the portal fails from ~page 29)

# -- manners --------------------------------------------------------------------------------------------------
CLIP_CONTACT = "set CLIP_CONTACT to your e-mail"
CLIP_USER_AGENT = "hsflow-crawler/0.1 (research crawler for HS-code rulings; contact: {contact})"
ROBOTSTXT_OBEY = True
AUTOTHROTTLE_ENABLED = True
AUTOTHROTTLE_START_DELAY = 2.0
AUTOTHROTTLE_MAX_DELAY = 60.0
AUTOTHROTTLE_TARGET_CONCURRENCY = 1.0
DOWNLOAD_DELAY = 1.0               # AutoThrottle never goes below this: at least 1 s between requests
DOWNLOAD_DELAY_JITTER = 0.5         # 0.5-1.5 x the delay, as a person would
CONCURRENT_REQUESTS = 8
CONCURRENT_REQUESTS_PER_DOMAIN = 2
DOWNLOAD_TIMEOUT = 60

# -- robustness -----------------------------------------------------------------------------------------------
RETRY_ENABLED = True
RETRY_TIMES = 6
CLIP_BACKOFF_BASE = 2.0            # seconds before the first retry, doubled each time...
CLIP_BACKOFF_MAX = 120.0           # ...up to this
COOKIES_ENABLED = True             # the session (JSESSIONID, WMONID) from the screen
FILES_EXPIRES = 36500              # a stored photo never goes stale: rulings do not change their photos
MEDIA_ALLOW_REDIRECTS = True

ITEM_PIPELINES = {f"{_PKG}.pipelines.RawStorePipeline": 300}
DOWNLOADER_MIDDLEWARES = {
    "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
    f"{_PKG}.middlewares.BackoffRetryMiddleware": 550,
    f"{_PKG}.middlewares.RequestStatsMiddleware": 950,
}
EXTENSIONS = {f"{_PKG}.extensions.Progress": 500}
STATS_CLASS = f"{_PKG}.extensions.JsonFileStatsCollector"
HSFLOW_STATS_FILE = ""             # path: dump the crawl stats there as JSON
HSFLOW_PROGRESS = False            # a tqdm progress bar on stderr

LOG_LEVEL = "INFO"
