"""The REST fallback poll: prices while the socket is down or silent.

Runs only while the supervisor's fallback is active: at once when it
starts, then every poll_interval, for the subscribed symbols. Its prices are
tagged `poll`. A 429 is respected: the next request waits for Retry-After
(seconds or an HTTP date).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.intake import OnPrices, PriceIntake
from tickguard.feed.protocol import PollSource
from tickguard.feed.supervisor import FeedSupervisor
from tickguard.metrics import Metrics
from tickguard.replies import read_json
from tickguard.status import PollStatus

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 300.0  # a broken Retry-After never parks the poll longer than this
FAILURE_LOG_EVERY = 30.0  # a lasting failure is repeated at most this often


class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class FallbackPoller:
    def __init__(
        self,
        source: PollSource,
        interval: float,
        *,
        session: aiohttp.ClientSession,
        supervisor: FeedSupervisor,
        book: PriceBook,
        metrics: Metrics,
        symbols: Callable[[], Collection[str]],
        on_prices: OnPrices,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.interval = interval
        self._session = session
        self._supervisor = supervisor
        self._book = book
        self._symbols = symbols
        self._intake = PriceIntake(book, metrics, on_prices, PriceSource.POLL)
        self._mono = monotonic
        self.polling = False
        self._outage = False  # this poll stands in for a lost socket (not the start-up's)
        self.last_success: float | None = None
        self.last_error = ""
        self._last_failure_log = -FAILURE_LOG_EVERY
        self._host = urlsplit(source.url).hostname or "the poll URL"

    def status(self) -> PollStatus:
        """What the poll says about itself now, as a frozen value (tickguard.status)."""
        return PollStatus(
            polling=self.polling, last_success_at=self.last_success, last_error=self.last_error
        )

    async def run(self) -> None:
        """Poll while the fallback is active: at once when it starts, then every interval.

        The supervisor sets `fallback_changed` whenever the fallback starts or
        ends. The poll clears it before each look at `fallback_active` and, between
        polls, waits on it rather than sleeping: a fallback that ends stops the
        poll at once, and one that starts again while the poll waits out its
        interval (the socket dropped soon after live prices came back) is polled
        at once, not when the interval is over. Only a 429's Retry-After holds a
        poll back across such a change.
        """
        changed = self._supervisor.fallback_changed
        not_before = -math.inf  # monotonic: no request before it (a 429's Retry-After)
        while True:
            changed.clear()
            if not self._supervisor.fallback_active:
                self._stop()
                await changed.wait()
                continue
            if not self.polling:
                self.polling = True
                if self._supervisor.starting:  # no live price yet: connecting, not an outage
                    log.info(
                        "[FEED] connecting; polling %s every %gs until live prices arrive",
                        self._host,
                        self.interval,
                    )
                else:
                    log.info("[FALLBACK] polling %s every %gs", self._host, self.interval)
                self._outage = not self._supervisor.starting
            started = self._mono()
            if started < not_before:
                await self._pause(not_before - started)
                continue
            next_poll = started + self.interval
            try:
                await self._poll_once()
            except RateLimited as exc:
                # Retry-After counts from the answer, not from when we asked.
                delay = max(self.interval, exc.retry_after)
                next_poll = not_before = self._mono() + delay
                self._failed(f"rate limited (HTTP 429), next poll in {delay:g}s")
            except TimeoutError:
                self._failed(f"no answer within {max(1.0, self.interval):g}s")
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                self._failed(str(exc) or exc.__class__.__name__)
            await self._pause(next_poll - self._mono())

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less: until the fallback starts or ends (at once if it did already)."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._supervisor.fallback_changed.wait()

    def _stop(self) -> None:
        if self.polling:
            self.polling = False
            self._book.channel_down(PriceSource.POLL)
            if self._outage:
                log.info("[FALLBACK] live data is back: polling stopped")
            else:
                log.info("[FEED] live prices arriving: polling stopped")

    async def _poll_once(self) -> None:
        symbols = sorted(self._symbols())
        if not symbols:
            return
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval))
        async with self._session.get(
            self.source.url,
            params=self.source.params(symbols),
            headers=dict(self.source.headers),
            timeout=timeout,
        ) as response:
            if response.status == 429:
                raise RateLimited(_retry_after(response.headers.get("Retry-After")))
            response.raise_for_status()
            body = await read_json(response)  # bounded; BadReply is a ValueError
        if not self._supervisor.fallback_active:
            return  # live data came back while this answer was in flight: it is late
        now = self._mono()
        decoded = self.source.decode(body, set(symbols))
        self._book.channel_up(PriceSource.POLL, now)
        self._book.channel_alive(PriceSource.POLL, now)
        if self.last_error:
            log.info("[FALLBACK] poll of %s works again", self._host)
        self.last_success, self.last_error = now, ""
        self._intake.take(decoded, now)

    def _failed(self, why: str) -> None:
        self._book.channel_down(PriceSource.POLL)
        now = self._mono()
        if why != self.last_error or now - self._last_failure_log >= FAILURE_LOG_EVERY:
            log.warning("[FALLBACK] poll of %s failed: %s", self._host, why)
            self._last_failure_log = now
        self.last_error = why


def _retry_after(value: str | None) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return 1.0
    try:
        seconds = float(value)
        if math.isnan(seconds):  # "1e999" is clamped below; NaN would compare as nothing
            return 1.0
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(MAX_RETRY_AFTER, max(0.0, seconds))
