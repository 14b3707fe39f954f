"""Resuming the id sequences after a restart, without a broker: seeding, the first live id, limits, timeouts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cryptotui.config import load_settings
from cryptotui.stages.ingest import stage as stage_module
from cryptotui.stages.ingest.backfill import MAX_GAP_IDS, Backfiller, BackfillJob
from cryptotui.stages.ingest.gaps import GapBook, IdSequence
from cryptotui.stages.ingest.resume import ResumeScan, scan_last_ids
from cryptotui.stages.ingest.stage import IngestStage
from tests.unit.test_ingest_messages import FakeConn, FakeOut, combined

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]


def trade(symbol: str, i: int) -> str:
    return combined(f"{symbol.lower()}@trade",
                    f'{{"e":"trade","E":1700000000001,"s":"{symbol}","t":{i},"p":"1.00000000","q":"2.00000000",'
                    f'"T":1700000000000,"m":true,"M":true}}')


@pytest.fixture
def stage(tmp_path: Path) -> IngestStage:
    settings = load_settings(data_dir=tmp_path, symbols=SYMBOLS, topic_trade="tr", topic_aggtrade="ag",
                             topic_bookticker="bk", topic_dlq="dlq")
    stage = IngestStage(settings)
    stage.out = FakeOut()  # type: ignore[assignment]
    return stage


def fake_scan(monkeypatch: pytest.MonkeyPatch, result: ResumeScan) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def scan(bootstrap: str, topics: dict[str, str], symbols: list[str], scan: int, timeout: float,
             stop: Any) -> ResumeScan:
        calls.append({"topics": topics, "symbols": list(symbols), "scan": scan, "timeout": timeout})
        return result

    monkeypatch.setattr(stage_module, "scan_last_ids", scan)
    return calls


async def test_the_stage_seeds_its_sequences_from_the_scan_and_finds_the_restart_gap(
        stage: IngestStage, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_scan(monkeypatch, ResumeScan(last_ids={("trade", "BTCUSDT"): 5000, ("aggTrade", "ETHUSDT"): 70,
                                                        ("trade", "ETHUSDT"): 900}, messages=3, partitions=6,
                                              partitions_read=6))
    await stage._resume()
    [call] = calls
    assert call["topics"] == {"trade": "tr", "aggTrade": "ag"}  # bookTicker: nothing to resume
    assert call["symbols"] == SYMBOLS and call["timeout"] > 0 and call["scan"] > 0
    status = stage.status()
    assert status["resumed_sequences"] == 3 and status["resume_error"] is None
    conn = FakeConn()
    stage._on_messages(conn, [trade("BTCUSDT", 5000), trade("BTCUSDT", 4990)], 1)  # type: ignore[arg-type]
    assert stage.out.sent == [] and stage.duplicates == 2  # type: ignore[union-attr]
    stage._on_messages(conn, [trade("BTCUSDT", 5021), trade("ETHUSDT", 901), trade("BNBUSDT", 7)], 1)  # type: ignore[arg-type]
    assert [json.loads(value)["t"] for _, value, _, _ in stage.out.sent] == [5021, 901, 7]  # type: ignore[union-attr]
    [gap] = stage.gaps.pending  # ETHUSDT went on at 901, BNBUSDT was not resumed
    assert (gap.symbol, gap.kind, gap.first, gap.last, gap.after_restart) == ("BTCUSDT", "trade", 5001, 5020, True)
    stage.gaps.due(now=gap.detected + 10)
    status = stage.status()
    assert (status["gaps"], status["gap_ids"], status["restart_gaps"], status["restart_gap_ids"]) == (1, 20, 1, 20)


async def test_a_failed_scan_leaves_the_sequences_unseeded_and_says_so(
        stage: IngestStage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake_scan(monkeypatch, ResumeScan(error="timed out after 15 s", seconds=15.0))
    await stage._resume()
    status = stage.status()
    assert status["resumed_sequences"] == 0 and status["resume_error"] == "timed out after 15 s"
    assert "not backfilled" in caplog.text
    stage._on_messages(FakeConn(), [trade("BTCUSDT", 5000)], 1)  # type: ignore[arg-type]
    assert len(stage.out.sent) == 1 and stage.gaps.pending == []  # type: ignore[union-attr]


async def test_a_scan_that_raises_does_not_stop_the_stage(stage: IngestStage, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> ResumeScan:
        raise ValueError("boom")

    monkeypatch.setattr(stage_module, "scan_last_ids", broken)
    await stage._resume()
    assert stage.status()["resume_error"] == "ValueError: boom"


def test_the_scan_gives_up_on_an_unreachable_broker_within_its_timeout() -> None:
    started = time.monotonic()
    result = scan_last_ids("127.0.0.1:1", {"trade": "tr", "aggTrade": "ag"}, SYMBOLS, timeout=1.0)
    assert time.monotonic() - started < 5
    assert result.error and result.last_ids == {} and result.partitions_read == 0


def test_a_restart_gap_over_the_limit_is_given_up_with_a_clear_reason() -> None:
    given_up: list[tuple[str, str, int, int, str]] = []
    filler = Backfiller("http://127.0.0.1:1", lambda *a: 0, lambda *a: given_up.append(a), lambda *a: [])
    filler.submit(BackfillJob("trade", "BTCUSDT", 1001, 1000 + MAX_GAP_IDS + 5, after_restart=True))
    [(kind, symbol, lo, hi, reason)] = given_up
    assert (kind, symbol, lo, hi) == ("trade", "BTCUSDT", 1001, 1000 + MAX_GAP_IDS + 5)
    assert reason == f"gap of {MAX_GAP_IDS + 5} ids after restart larger than {MAX_GAP_IDS}: not backfilled"
    assert filler.status()["gap_ids_too_large"] == MAX_GAP_IDS + 5 and filler.queued_ids == 0


async def serve_trades(first: int, last: int, requests: list[dict[str, str]]) -> AsyncIterator[str]:
    async def trades(request: web.Request) -> web.Response:
        requests.append(dict(request.query))
        start, limit = max(first, int(request.query["fromId"])), int(request.query["limit"])
        return web.json_response([{"id": i, "price": "1.0", "qty": "2.0", "time": 1700000000000 + i,
                                   "isBuyerMaker": True, "isBestMatch": True}
                                  for i in range(start, min(last + 1, start + limit))])

    app = web.Application()
    app.router.add_get("/api/v3/historicalTrades", trades)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_ids_below_what_the_server_has_are_given_up_at_once_not_page_by_page() -> None:
    """A restarted source's history starts far above the gap's first ids (here 50_000 of them)."""
    book = GapBook(grace_s=0)
    seq = IdSequence("trade", "BTCUSDT", book)
    seq.resume(1000)
    seq.accept(51_101)  # gap 1001..51_100; the server has 51_000.. only
    requests: list[dict[str, str]] = []
    delivered: list[int] = []

    def deliver(kind: str, symbol: str, events: list[tuple[dict[str, Any], str]], recv_ns: int) -> int:
        accepted = [event["t"] for event, _ in events if seq.accept_backfill(event["t"])]
        delivered.extend(accepted)
        return len(accepted)

    async for url in serve_trades(51_000, 60_000, requests):
        filler = Backfiller(url, deliver, lambda k, s, lo, hi, reason: seq.give_up(lo, hi),
                            lambda k, s, lo, hi: seq.missing_between(lo, hi))
        task = asyncio.create_task(filler.run())
        for gap in book.due(now=time.monotonic() + 1):
            filler.submit(BackfillJob(gap.kind, gap.symbol, gap.first, gap.last, after_restart=gap.after_restart))
        deadline = time.monotonic() + 20
        while seq.missing and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not seq.missing
    assert delivered == list(range(51_000, 51_101))
    assert book.unfilled_ids == 50_000 - 1 and book.backfilled_ids == 101
    assert len(requests) == 2  # one to learn where the server's ids start, one for them
