"""Downloader middlewares: retries with growing back-off, and counting what is actually sent."""
from __future__ import annotations

from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.utils.asyncio import sleep
from scrapy.utils.response import response_status_message

from .parsing import retry_reason


class BackoffRetryMiddleware(RetryMiddleware):
    """Scrapy's RetryMiddleware (5xx, timeouts, connection errors), plus the portal's error envelope and malformed
    answers, waiting CLIP_BACKOFF_BASE * 2**(n-1) seconds (at most CLIP_BACKOFF_MAX) before the n-th retry:
    the portal recovers "some seconds later", and hammering it meanwhile helps nobody."""

    def __init__(self, settings):
        super().__init__(settings)
        self.base = settings.getfloat("CLIP_BACKOFF_BASE")
        self.cap = settings.getfloat("CLIP_BACKOFF_MAX")

    async def _backoff(self, retry):
        if retry is not None:
            await sleep(min(self.cap, self.base * 2 ** (retry.meta["retry_times"] - 1)))
        return retry

    async def process_response(self, request, response):
        if request.meta.get("dont_retry", False):
            return response
        if response.status in self.retry_http_codes:
            reason = response_status_message(response.status)
        elif response.status == 200 and request.meta.get("clip") in ("list", "detail"):
            reason = retry_reason(request.meta["clip"], response.body)
        else:
            reason = None
        if reason is None:
            return response
        return await self._backoff(self._retry(request, reason)) or response

    async def process_exception(self, request, exception):
        if isinstance(exception, self.exceptions_to_retry) and not request.meta.get("dont_retry", False):
            return await self._backoff(self._retry(request, exception))
        return None


class RequestStatsMiddleware:
    """Counts requests as they go to the network, by kind (hsflow/requests/{screen,list,detail,photo}): the
    evidence that a rerun over a complete store asks for no detail or photo."""

    def __init__(self, stats):
        self.stats = stats

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler.stats)

    def process_request(self, request):
        self.stats.inc_value(f"hsflow/requests/{request.meta.get('clip', 'other')}")
        return None
