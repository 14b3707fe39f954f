"""REST backfill against a local HTTP server: event shape, paging, Retry-After on 429/418, retries, give-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from cryptotui.stages.ingest.backfill import Backfiller, BackfillJob, rest_agg_trade_event, rest_trade_event
from cryptotui.stages.ingest.gaps import GapBook, IdSequence

pytestmark = pytest.mark.timeout(60)


def trade_row(i: int) -> dict[str, Any]:
    return {"id": i, "price": "90000.10000000", "qty": "0.00100000", "quoteQty": "90.00010000",
            "time": 1700000000000 + i, "isBuyerMaker": i % 2 == 0, "isBestMatch": True}


class Rest:
    """/api/v3/historicalTrades with ids 1..10_000; answers planned failures first."""

    def __init__(self, failures: list[tuple[int, dict[str, str]]] | None = None, missing: set[int] | None = None):
        self.failures = list(failures or [])
        self.missing = missing or set()
        self.requests: list[tuple[float, dict[str, str]]] = []

    async def trades(self, request: web.Request) -> web.Response:
        self.requests.append((time.monotonic(), dict(request.query)))
        if self.failures:
            status, headers = self.failures.pop(0)
            return web.json_response({"code": -1003, "msg": "Too many requests"}, status=status, headers=headers)
        start, limit = int(request.query["fromId"]), int(request.query["limit"])
        rows = [trade_row(i) for i in range(start, min(10_001, start + limit)) if i not in self.missing]
        return web.json_response(rows)


async def serve(rest: Rest) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/api/v3/historicalTrades", rest.trades)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def backfill(rest: Rest, gaps: list[tuple[int, int]], last: int = 9000) -> tuple[IdSequence, list[dict]]:
    book = GapBook(grace_s=0)
    seq = IdSequence("trade", "BTCUSDT", book)
    skipped = {i for lo, hi in gaps for i in range(lo, hi + 1)}
    for i in range(1, last + 1):
        if i not in skipped:
            seq.accept(i)
    delivered: list[dict[str, Any]] = []

    def deliver(kind: str, symbol: str, events: list[tuple[dict[str, Any], str]], recv_ns: int) -> int:
        accepted = [event for event, _ in events if seq.accept_backfill(event["t"])]
        delivered.extend(accepted)
        return len(accepted)

    def give_up(kind: str, symbol: str, lo: int, hi: int, reason: str) -> None:
        seq.give_up(lo, hi)

    async for url in serve(rest):
        filler = Backfiller(url, deliver, give_up, lambda k, s, lo, hi: seq.missing_between(lo, hi))
        task = asyncio.create_task(filler.run())
        for gap in book.due(now=time.monotonic() + 1):
            filler.submit(BackfillJob(gap.kind, gap.symbol, gap.first, gap.last))
        deadline = time.monotonic() + 30
        while seq.missing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seq, delivered


def test_rest_rows_become_websocket_events() -> None:
    assert rest_trade_event(trade_row(7), "BTCUSDT") == {
        "e": "trade", "E": 1700000000007, "s": "BTCUSDT", "t": 7, "p": "90000.10000000", "q": "0.00100000",
        "T": 1700000000007, "m": False, "M": True}
    row = {"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781, "T": 1498793709153,
           "m": True, "M": True}
    event = rest_agg_trade_event(row, "ETHUSDT")
    assert list(event) == ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]
    assert event["E"] == event["T"] == 1498793709153 and event["p"] == "0.01633102"


async def test_neighbouring_gaps_are_fetched_in_one_request() -> None:
    rest = Rest()
    seq, delivered = await backfill(rest, [(100, 104), (200, 250), (900, 905)])
    assert sorted(e["t"] for e in delivered) == [*range(100, 105), *range(200, 251), *range(900, 906)]
    assert len(rest.requests) == 1 and rest.requests[0][1]["fromId"] == "100"
    assert seq.book.backfilled_ids == 62 and not seq.missing


async def test_a_large_gap_is_fetched_page_by_page() -> None:
    rest = Rest()
    _, delivered = await backfill(rest, [(10, 2509)])
    assert len(delivered) == 2500 and [int(q["limit"]) for _, q in rest.requests] == [1000, 1000, 500]


async def test_429_pauses_for_retry_after_and_5xx_are_retried() -> None:
    rest = Rest(failures=[(429, {"Retry-After": "1"}), (503, {})])
    seq, delivered = await backfill(rest, [(50, 59)])
    assert len(delivered) == 10 and not seq.missing
    (t429, _), (t503, _), (t_ok, _) = rest.requests
    assert t503 - t429 >= 0.95  # waited for Retry-After
    assert t_ok - t503 >= 0.9  # backoff after a server error


async def test_418_ban_is_respected_too() -> None:
    rest = Rest(failures=[(418, {"Retry-After": "2"})])
    _, delivered = await backfill(rest, [(50, 52)])
    assert len(delivered) == 3
    assert rest.requests[1][0] - rest.requests[0][0] >= 1.95


async def test_ids_the_server_does_not_have_are_given_up_and_counted() -> None:
    rest = Rest(missing={52, 53})
    seq, delivered = await backfill(rest, [(50, 55)])
    assert sorted(e["t"] for e in delivered) == [50, 51, 54, 55]
    assert seq.book.unfilled_ids == 2 and seq.book.backfilled_ids == 4 and not seq.missing


async def test_permanent_errors_give_up_the_gap() -> None:
    rest = Rest(failures=[(400, {})])
    seq, delivered = await backfill(rest, [(50, 55)])
    assert delivered == [] and seq.book.unfilled_ids == 6 and len(rest.requests) == 1
