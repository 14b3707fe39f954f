"""Ingest after a restart, with the real broker: the id sequences continue from what is already in Kafka, so
the trades and aggTrades sent while the stage was down are found as gaps and backfilled from REST."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import asyncpg
import pytest
from confluent_kafka import Producer

from cryptotui.config import Settings
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.ingest.resume import scan_last_ids
from tests.functional.stage_helpers import stage_row, start_stage, wait_for
from tests.functional.test_ingest import (
    SYMBOLS,
    assert_complete,
    counters,
    feed_server,
    ingest,
    market_messages,
    settled,
    stage_settings,
    until,
)

pytestmark = pytest.mark.timeout(120)


def produce(settings: Settings, records: list[tuple[str, int, str | None, str]]) -> None:
    """(topic, partition, key, value) in this order, acknowledged."""
    producer = Producer({"bootstrap.servers": bootstrap_servers(settings)})
    for topic, partition, key, value in records:
        producer.produce(topic, value, key, partition=partition)
    assert producer.flush(20) == 0


def trade(symbol: str, i: int) -> str:
    return json.dumps({"e": "trade", "E": 1, "s": symbol, "t": i, "p": "1.0", "q": "1.0", "T": 1, "m": True,
                       "recv_ns": 1})


async def test_the_scan_takes_the_highest_id_per_symbol_from_the_tail_of_every_partition(settings: Settings) -> None:
    trades, aggs = settings.topic_trade, settings.topic_aggtrade
    records: list[tuple[str, int, str | None, str]] = []
    # Partition 0: two symbols share it; BTCUSDT's newest messages are backfilled ones with lower ids.
    records += [(trades, 0, "BTCUSDT", trade("BTCUSDT", i)) for i in range(1, 21)]
    records += [(trades, 0, "ETHUSDT", trade("ETHUSDT", i)) for i in range(50, 61)]
    records += [(trades, 0, "BTCUSDT", trade("BTCUSDT", i)) for i in range(15, 19)]
    records += [(trades, 0, None, '{"n":1}'), (trades, 0, "BTCUSDT", "not json"), (trades, 0, "BTCUSDT", "[1]")]
    # Partition 1: BNBUSDT only far back, behind 60 messages of a symbol not followed: outside a 50 window.
    records += [(trades, 1, "BNBUSDT", trade("BNBUSDT", i)) for i in range(1, 11)]
    records += [(trades, 1, "SOLUSDT", trade("SOLUSDT", i)) for i in range(1000, 1060)]
    records += [(aggs, 2, "BTCUSDT", json.dumps({"e": "aggTrade", "s": "BTCUSDT", "a": i, "f": 1, "l": 2}))
                for i in range(5, 8)]
    await asyncio.to_thread(produce, settings, records)
    result = await asyncio.to_thread(scan_last_ids, bootstrap_servers(settings), settings.market_topics, SYMBOLS,
                                     50, 10.0)
    assert result.error is None
    assert result.last_ids == {("trade", "BTCUSDT"): 20, ("trade", "ETHUSDT"): 60, ("aggTrade", "BTCUSDT"): 7}
    assert result.partitions == result.partitions_read == 3
    assert result.messages == 38 + 50 + 3


async def test_a_sigkilled_stage_is_resumed_and_what_it_missed_is_backfilled(
        settings: Settings, db: asyncpg.Connection, tmp_path: Path) -> None:
    streams = [f"{symbol.lower()}@{kind}" for symbol in SYMBOLS for kind in ("trade", "aggTrade")]
    async with feed_server(rate=600) as server:
        # The stack's data directory (its secrets), for both runs: the restarted stage finds the spill directory
        # of the killed one, as after a real restart.
        config = stage_settings(settings, server, tmp_path, data_dir=settings.data_dir)
        process = start_stage(config, "ingest")
        try:
            async def flowing() -> bool:
                if process.poll() is not None:
                    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                    raise AssertionError(f"the stage exited with {process.returncode}: {output[-3000:]}")
                row = await stage_row(db, "ingest")
                if not row or row["pid"] != process.pid or row["state"] != "running":
                    return False
                c = row["counters"]
                return c["acked"] > 300 and all(c["streams"][name]["messages"] >= 5 for name in streams)

            await wait_for(flowing, timeout=60)
            process.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        await asyncio.sleep(3)  # the market goes on while no ingest runs
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["resume_s"] is not None, 20, "the scan of Kafka done")
            assert counters(stage)["resumed_sequences"] == 6
            await until(lambda: counters(stage)["restart_gaps"] == 6, 20, "a restart gap per trade/aggTrade stream")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)  # consecutive ids per symbol, and not one twice
    assert status["resume_error"] is None and status["duplicates"] == 0
    assert status["gaps"] == status["restart_gaps"] == 6
    assert status["restart_gap_ids"] == status["gap_ids"] == status["backfilled_ids"] > 6 * 3
    assert status["gap_ids_unfilled"] == 0 and status["gap_ids_too_large"] == 0
