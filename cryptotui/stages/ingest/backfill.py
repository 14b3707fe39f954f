"""Backfilling trade and aggTrade id gaps from Binance's REST API, politely.

`/api/v3/historicalTrades?symbol=&fromId=&limit=` and `/api/v3/aggTrades?symbol=&fromId=&limit=` return
rows by id; `rest_trade_event` / `rest_agg_trade_event` turn them back into the WebSocket event shape
(same field names and decimal strings, `E` = `T` since REST rows have no event time) and the stage
produces them like live messages. One request covers up to 1000 ids, so neighbouring gaps of a symbol
are fetched together.

Politeness: one request at a time; request weight (historicalTrades 25, aggTrades 4) kept under half of
Binance's 6000 per minute; the server's `X-MBX-USED-WEIGHT-1M` is respected; HTTP 429/418 pause every
request for `Retry-After` seconds; other failures are retried with backoff, then given up (counted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from cryptotui.stages.ingest.connection import Backoff

__all__ = ["BackfillJob", "Backfiller", "rest_agg_trade_event", "rest_trade_event"]

log = logging.getLogger("cryptotui.stages.ingest")

PAGE = 1000  # Binance's largest `limit`
WEIGHTS = {"trade": 25, "aggTrade": 4}
ENDPOINTS = {"trade": "/api/v3/historicalTrades", "aggTrade": "/api/v3/aggTrades"}
#: Weight this stage spends per minute at most (Binance allows 6000 per IP).
WEIGHT_PER_MINUTE = 3000
#: Pause when the server reports this much weight used in the current minute.
SERVER_WEIGHT_HIGH = 4800
#: Attempts of one page before its ids are given up.
MAX_ATTEMPTS = 5
#: Largest gap backfilled (ids); a larger jump is a restarted source or an outage too long to repair (a day
#: of downtime can be millions of ids: about 1000 requests per million ids, 25 weight each for trades).
MAX_GAP_IDS = 1_000_000
REQUEST_TIMEOUT_S = 15.0


def rest_trade_event(row: dict[str, Any], symbol: str) -> dict[str, Any]:
    """A historicalTrades row as the trade event the WebSocket would have sent."""
    event: dict[str, Any] = {
        "e": "trade",
        "E": row["time"],
        "s": symbol,
        "t": row["id"],
        "p": row["price"],
        "q": row["qty"],
        "T": row["time"],
        "m": row["isBuyerMaker"],
    }
    if "isBestMatch" in row:
        event["M"] = row["isBestMatch"]
    return event


def rest_agg_trade_event(row: dict[str, Any], symbol: str) -> dict[str, Any]:
    """An aggTrades row as the aggTrade event the WebSocket would have sent."""
    event: dict[str, Any] = {"e": "aggTrade", "E": row["T"], "s": symbol}
    for name in ("a", "p", "q", "f", "l", "T", "m", "M"):
        if name in row:
            event[name] = row[name]
    return event


CONVERT: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "trade": rest_trade_event,
    "aggTrade": rest_agg_trade_event,
}
ROW_ID = {"trade": "id", "aggTrade": "a"}


@dataclass
class BackfillJob:
    """Ids lo..hi of one symbol's trade or aggTrade stream to fetch."""

    kind: str
    symbol: str
    lo: int
    hi: int
    after_restart: bool = False  # missed while the stage was down (found on the first id after a restart)

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1


class _WeightBudget:
    """A token bucket of request weight: WEIGHT_PER_MINUTE, refilled continuously."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute / 6.0  # bursts of 10 s worth
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self, weight: float) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= weight:
                self.tokens -= weight
                return
            await asyncio.sleep((weight - self.tokens) / self.rate)


# (kind, symbol, events, recv_ns) -> number accepted; ids still missing in lo..hi are then given up.
Deliver = Callable[[str, str, list[tuple[dict[str, Any], str]], int], int]
GiveUp = Callable[[str, str, int, int, str], None]
MissingRanges = Callable[[str, str, int, int], list[tuple[int, int]]]


class Backfiller:
    """Fetches queued gaps one page at a time and hands the events to `deliver`."""

    def __init__(self, rest_url: str, deliver: Deliver, give_up: GiveUp, missing: MissingRanges,
                 weight_per_minute: float = WEIGHT_PER_MINUTE) -> None:
        self.rest_url = rest_url.rstrip("/")
        self._deliver = deliver
        self._give_up = give_up
        self._missing = missing
        self._queue: deque[BackfillJob] = deque()
        self._wakeup = asyncio.Event()
        self._budget = _WeightBudget(weight_per_minute)
        self._paused_until = 0.0
        self.requests = 0
        self.rows = 0
        self.errors = 0
        self.rate_limited = 0
        self.too_large_ids = 0  # ids of gaps over MAX_GAP_IDS, not backfilled
        self.last_error: str | None = None

    def submit(self, job: BackfillJob) -> None:
        if job.size > MAX_GAP_IDS:
            self.too_large_ids += job.size
            when = " after restart" if job.after_restart else ""
            self._give_up(job.kind, job.symbol, job.lo, job.hi,
                          f"gap of {job.size} ids{when} larger than {MAX_GAP_IDS}: not backfilled")
            return
        self._queue.append(job)
        self._wakeup.set()

    @property
    def queued_ids(self) -> int:
        return sum(job.size for job in self._queue)

    def abandon(self, reason: str) -> None:
        """Give up everything queued (shutdown)."""
        while self._queue:
            job = self._queue.popleft()
            self._give_up(job.kind, job.symbol, job.lo, job.hi, reason)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "cryptotui-ingest"}) as session:
            while True:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                job = self._queue.popleft()
                await self._run_job(session, job)

    async def _run_job(self, session: aiohttp.ClientSession, job: BackfillJob) -> None:
        backoff = Backoff(base=1.0, cap=30.0)
        attempts = 0
        kind, symbol = job.kind, job.symbol
        while True:
            ranges = self._missing(kind, symbol, job.lo, job.hi)
            if not ranges:
                return  # all filled (or given up)
            start = ranges[0][0]
            # One page also serves the queued gaps of the same stream that fall within its 1000 ids.
            window_hi = min(start + PAGE - 1, max([job.hi, *(other.hi for other in self._queue if other.kind == kind
                                                             and other.symbol == symbol
                                                             and other.lo < start + PAGE)]))
            limit = window_hi - start + 1
            try:
                rows = await self._fetch(session, kind, symbol, start, limit)
            except _RetryLater as pause:
                await asyncio.sleep(pause.seconds)
                continue
            except _Failed as failure:
                attempts += 1
                if attempts >= MAX_ATTEMPTS or failure.permanent:
                    self._give_up(kind, symbol, start, job.hi, f"backfill failed: {failure}")
                    return
                await asyncio.sleep(backoff.next_delay())
                continue
            attempts = 0
            backoff.reset()
            recv_ns = time.time_ns()
            id_field = ROW_ID[kind]
            convert = CONVERT[kind]
            events: list[tuple[dict[str, Any], str]] = []
            highest = start - 1
            lowest: int | None = None
            for row in rows:
                row_id = row.get(id_field) if isinstance(row, dict) else None
                if type(row_id) is not int or row_id < start:
                    continue
                highest = max(highest, row_id)
                if lowest is None or row_id < lowest:
                    lowest = row_id
                if row_id > window_hi:
                    continue
                try:
                    event = convert(row, symbol)
                except KeyError:
                    event = {**row, "s": symbol}  # validation names what is missing
                events.append((event, json.dumps(event, separators=(",", ":"))))
            self.rows += len(events)
            if events:
                self._deliver(kind, symbol, events, recv_ns)
            if lowest is not None and lowest > window_hi:
                # The server's ids start above the page (e.g. a restarted source's history): what lies below
                # them it does not have; give it up at once instead of asking page by page.
                for lo, hi in self._missing(kind, symbol, start, min(lowest - 1, max(job.hi, window_hi))):
                    self._give_up(kind, symbol, lo, hi, "backfill: the REST API does not have these ids")
                continue
            if len(rows) < limit or highest < start:
                # The server has nothing more from `start` on: what is still missing, it does not have.
                for lo, hi in self._missing(kind, symbol, start, max(job.hi, window_hi)):
                    self._give_up(kind, symbol, lo, hi, "backfill: the REST API does not have these ids")
                return
            for lo, hi in self._missing(kind, symbol, start, min(highest, window_hi)):
                self._give_up(kind, symbol, lo, hi, "backfill: ids absent from the REST answer")

    async def _fetch(self, session: aiohttp.ClientSession, kind: str, symbol: str, from_id: int,
                     limit: int) -> list[Any]:
        now = time.monotonic()
        if now < self._paused_until:
            raise _RetryLater(self._paused_until - now)
        await self._budget.take(WEIGHTS[kind])
        url = f"{self.rest_url}{ENDPOINTS[kind]}"
        params = {"symbol": symbol, "fromId": str(from_id), "limit": str(limit)}
        self.requests += 1
        try:
            async with session.get(url, params=params) as response:
                body = await response.text()
                used = response.headers.get("X-MBX-USED-WEIGHT-1M") or response.headers.get("x-mbx-used-weight-1m")
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self._error(f"{type(error).__name__}: {error}")
            raise _Failed(str(error) or type(error).__name__) from None
        if status in (429, 418):
            self.rate_limited += 1
            seconds = _seconds(retry_after, default=60.0 if status == 429 else 120.0)
            self._paused_until = time.monotonic() + seconds
            log.warning("backfill: HTTP %d from %s: pausing REST requests for %.0f s", status, url, seconds)
            raise _RetryLater(seconds)
        if status >= 500:
            self._error(f"HTTP {status}: {body[:200]}")
            raise _Failed(f"HTTP {status}")
        if status != 200:
            self._error(f"HTTP {status}: {body[:200]}")
            raise _Failed(f"HTTP {status}: {body[:200]}", permanent=True)
        if used is not None and used.isdigit() and int(used) >= SERVER_WEIGHT_HIGH:
            seconds = 60.0 - time.time() % 60.0 + 1.0
            log.info("backfill: %s weight used this minute: pausing %.0f s", used, seconds)
            self._paused_until = time.monotonic() + seconds
        try:
            rows = json.loads(body)
        except ValueError:
            self._error(f"not JSON: {body[:200]}")
            raise _Failed("the answer is not JSON") from None
        if not isinstance(rows, list):
            self._error(f"unexpected answer: {body[:200]}")
            raise _Failed("the answer is not a list", permanent=True)
        return rows

    def _error(self, text: str) -> None:
        self.errors += 1
        if text != self.last_error:
            log.warning("backfill: %s", text)
        self.last_error = text

    def status(self) -> dict[str, Any]:
        return {
            "backfill_requests": self.requests,
            "backfill_rows": self.rows,
            "backfill_errors": self.errors,
            "backfill_rate_limited": self.rate_limited,
            "backfill_queued_ids": self.queued_ids,
            "gap_ids_too_large": self.too_large_ids,
        }


class _RetryLater(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class _Failed(Exception):
    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _seconds(value: str | None, default: float) -> float:
    try:
        return max(1.0, float(value)) if value else default
    except ValueError:
        return default
