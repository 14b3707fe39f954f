"""The supervisor running the real pipeline without Spark: feed server -> ingest -> Kafka -> sink -> tables.

Each stage is SIGKILLed in turn while messages flow: it comes back, its restart is counted, and the tables
still hold every message exactly once. A recording in the timestamped format (`<ns> {"stream":..}`) is
replayed through the same pipeline (`source = replay:PATH`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import psutil
import pytest

from cryptotui.config import Settings
from cryptotui.feed.recording import RecordingWriter
from cryptotui.services.stack import Stack
from cryptotui.supervisor import BackoffPolicy, ProcessExited, Supervisor

FAST_BACKOFF = BackoffPolicy(initial_s=0.5, factor=2, max_s=4, reset_after_s=60)
RAW_TABLES = ("trades", "agg_trades", "book_ticker")
RATE = "300"  # simulated messages per second: enough for every symbol and stream, light on 2 cores


async def until(predicate: Callable[[], object], timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout} s")


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {table: await db.fetchval(f"SELECT count(*) FROM {table}") for table in RAW_TABLES}


async def rows_grow(db: asyncpg.Connection, before: dict[str, int]) -> bool:
    now = await counts(db)
    return all(now[table] > before[table] for table in RAW_TABLES)


async def duplicates(db: asyncpg.Connection) -> dict[str, int]:
    """Rows stored more than once by their Binance id (the primary keys also contain the time column)."""
    return {
        "trades": await db.fetchval("SELECT count(*) - count(DISTINCT (symbol, trade_id)) FROM trades"),
        "agg_trades": await db.fetchval("SELECT count(*) - count(DISTINCT (symbol, agg_trade_id)) FROM agg_trades"),
        "book_ticker": await db.fetchval("SELECT count(*) - count(DISTINCT (symbol, update_id)) FROM book_ticker"),
    }


async def id_gaps(db: asyncpg.Connection) -> dict[str, int]:
    """Trade and aggTrade ids missing between each symbol's first and last stored id (they are consecutive)."""
    return {
        "trades": await db.fetchval(
            "SELECT coalesce(sum(max_id - min_id + 1 - n), 0) FROM (SELECT max(trade_id) AS max_id,"
            " min(trade_id) AS min_id, count(DISTINCT trade_id) AS n FROM trades GROUP BY symbol) s"),
        "agg_trades": await db.fetchval(
            "SELECT coalesce(sum(max_id - min_id + 1 - n), 0) FROM (SELECT max(agg_trade_id) AS max_id,"
            " min(agg_trade_id) AS min_id, count(DISTINCT agg_trade_id) AS n FROM agg_trades GROUP BY symbol) s"),
    }


def pipeline(stack: Stack, settings: Settings, **options: object) -> Supervisor:
    return Supervisor(settings, stages=["sink", "ingest"], stack=stack, manage_stack=False, backoff=FAST_BACKOFF,
                      poll_interval_s=0.5, **options)  # type: ignore[arg-type]


# Killing ingest loses what the feed sends while it is down, unless the restarted ingest resumes its id
# sequences from Kafka and backfills the gap from REST: this test checks it does.
@pytest.mark.parametrize("kill_order", [
    pytest.param(("sink", "ingest"), id="each-in-turn"),
    pytest.param(("sink",), id="sink"),
    pytest.param(("ingest",), id="ingest"),
])
async def test_each_stage_sigkilled_in_turn_comes_back_and_every_message_is_stored_once(
        stack: Stack, settings: Settings, db: asyncpg.Connection, kill_order: tuple[str, ...]) -> None:
    settings = settings.model_copy(update={"source": "sim"})
    supervisor = pipeline(stack, settings, feed_args=["--rate", RATE])
    events = supervisor.subscribe()
    started: list[psutil.Process] = []
    try:
        await supervisor.start_all()
        assert set(supervisor.pids()) == {"feed", "sink", "ingest"}
        started += [psutil.Process(pid) for pid in supervisor.pids().values()]
        await until(lambda: rows_grow(db, dict.fromkeys(RAW_TABLES, 0)), what="rows in all three tables")
        for name in kill_order:
            await until(lambda name=name: supervisor.status().stage(name).state == "running", what=f"{name} up")
            pid = supervisor.pids()[name]
            os.kill(pid, signal.SIGKILL)
            await until(lambda name=name, pid=pid: supervisor.pids().get(name) not in (None, pid),
                        what=f"{name} restarted")
            started.append(psutil.Process(supervisor.pids()[name]))
            await until(lambda name=name: supervisor.status().stage(name).state == "running",
                        what=f"{name} running again")
            before = await counts(db)
            await until(lambda before=before: rows_grow(db, before), what=f"rows flowing after {name} came back")
            assert supervisor.status().stage(name).restarts == 1
            assert supervisor.status().stage(name).last_error == "killed by SIGKILL"
        await asyncio.sleep(3)
        await supervisor.stop_all()
        stored = await db.fetchval("SELECT count(*) FROM sink_offsets")
        assert stored, "the sink kept its offsets with the rows"
        backlog = await supervisor.sink_backlog()
        assert backlog == 0, f"{backlog} messages left in Kafka after the drain"
    finally:
        await supervisor.close()
    assert not [proc.pid for proc in started if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    assert await duplicates(db) == {"trades": 0, "agg_trades": 0, "book_ticker": 0}
    gaps = await id_gaps(db)
    assert gaps == {"trades": 0, "agg_trades": 0}, f"ids missing: {gaps}"
    symbols = {row["symbol"] for row in await db.fetch("SELECT DISTINCT symbol FROM trades")}
    assert symbols == set(settings.symbols)
    crashes = [event for event in drain(events) if isinstance(event, ProcessExited) and not event.expected]
    assert sorted(event.name for event in crashes) == sorted(kill_order)


async def test_feed_server_killed_comes_back_on_the_same_port(stack: Stack, settings: Settings,
                                                              db: asyncpg.Connection) -> None:
    settings = settings.model_copy(update={"source": "sim"})
    async with pipeline(stack, settings, feed_args=["--rate", RATE]) as supervisor:
        await supervisor.start_all()
        port = supervisor.feed_port
        assert port and supervisor.status().feed is not None
        feed = next(service for service in supervisor.status().services if service.name == "feed")
        assert feed.state == "running" and feed.address == f"ws://127.0.0.1:{port}"
        await until(lambda: rows_grow(db, dict.fromkeys(RAW_TABLES, 0)), what="rows")
        pid = supervisor.pids()["feed"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda: supervisor.pids().get("feed") not in (None, pid), what="feed restarted")
        await until(lambda: supervisor.status().feed.state == "running", what="feed listening")  # type: ignore[union-attr]
        assert supervisor.feed_port == port
        assert supervisor.status().feed.restarts == 1  # type: ignore[union-attr]
        before = await counts(db)
        await until(lambda: rows_grow(db, before), what="ingest reconnected and rows flow again")


async def test_replay_of_a_timestamped_recording_is_stored_exactly(stack: Stack, settings: Settings,
                                                                   db: asyncpg.Connection, tmp_path: Path) -> None:
    """A hand-made recording in the `<ns> {"stream":..,"data":..}` format, replayed at max speed."""
    recording = tmp_path / "market.jsonl"
    start_ms = int(time.time() * 1000) - 60_000
    trades = []
    with RecordingWriter(recording) as writer:
        for index in range(300):
            symbol = settings.symbols[index % 3]
            ms = start_ms + index * 10
            price = f"{100 + index % 7}.{index % 100:02d}000000"
            trade = {"e": "trade", "E": ms, "s": symbol, "t": 1000 + index // 3, "p": price, "q": "0.50000000",
                     "T": ms, "m": index % 2 == 0, "M": True}
            agg = {"e": "aggTrade", "E": ms, "s": symbol, "a": 500 + index // 3, "p": price, "q": "0.50000000",
                   "f": 1000 + index // 3, "l": 1000 + index // 3, "T": ms, "m": index % 2 == 0, "M": True}
            book = {"u": 9000 + index, "s": symbol, "b": price, "B": "1.00000000", "a": f"{101 + index % 7}.00000000",
                    "A": "2.00000000"}
            for stream, data in ((f"{symbol.lower()}@trade", trade), (f"{symbol.lower()}@aggTrade", agg),
                                 (f"{symbol.lower()}@bookTicker", book)):
                writer.write({"stream": stream, "data": data}, received_ns=ms * 1_000_000)
            trades.append(trade)
    assert recording.read_text().split(" ", 1)[0].isdigit(), "timestamped format"
    replay = settings.model_copy(update={"source": f"replay:{recording}", "speed": "max"})
    async with pipeline(stack, replay) as supervisor:
        await supervisor.start_all()
        await until(lambda: counts_equal(db, 300), timeout=120, what="all 900 messages stored")
    stored = await db.fetch("SELECT symbol, trade_id, price, qty, is_buyer_maker FROM trades ORDER BY trade_id, symbol")
    expected = sorted(((t["s"], t["t"], Decimal(t["p"]), Decimal(t["q"]), t["m"]) for t in trades),
                      key=lambda row: (row[1], row[0]))
    assert [tuple(row) for row in stored] == expected
    assert {(row["symbol"], row["trade_id"]): str(row["price"]) for row in stored} == {
        (t["s"], t["t"]): t["p"] for t in trades}, "decimal strings are kept exactly"
    assert await duplicates(db) == {"trades": 0, "agg_trades": 0, "book_ticker": 0}


async def counts_equal(db: asyncpg.Connection, each: int) -> bool:
    return await counts(db) == dict.fromkeys(RAW_TABLES, each)


def drain(queue: asyncio.Queue) -> list:  # type: ignore[type-arg]
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
