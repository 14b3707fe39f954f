"""The ingest stage against the local Binance-compatible feed server and the real Kafka broker.

Each test runs the stage in-process (or as a real `cryptotui stage run ingest` process), lets the feed
misbehave (drops, rotations, stalls, skipped ids, malformed messages, a stopped broker), then reads the
topics back and checks, by id, that nothing was lost or duplicated and that values are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from cryptotui.config import Settings
from cryptotui.feed.faults import Faults
from cryptotui.feed.recording import RecordingSource, RecordingWriter
from cryptotui.feed.server import FeedServer, FeedServerConfig
from cryptotui.feed.simulate import SimulatedMarket
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.services.stack import Stack
from cryptotui.stages.ingest import IngestStage
from cryptotui.stages.ingest.producer import KafkaOutput, SpillStore
from tests.functional.stage_helpers import stage_row, start_stage, stop_stage, wait_for

pytestmark = pytest.mark.timeout(120)

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
KINDS = ("trade", "aggTrade", "bookTicker")
ID_FIELD = {"trade": "t", "aggTrade": "a", "bookTicker": "u"}


# --- helpers --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def feed_server(rate: float = 1000, faults: Faults | None = None, source: Any = None,
                      symbols: list[str] = SYMBOLS, **config: Any) -> AsyncIterator[FeedServer]:
    source = source or SimulatedMarket(symbols, rate=rate, seed=7, bursts=False)
    server = FeedServer(FeedServerConfig(**config), source=source, faults=faults)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def stage_settings(settings: Settings, server: FeedServer, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"binance_ws_url": server.url, "binance_rest_url": server.rest_url,
                              "data_dir": tmp_path, "symbols": SYMBOLS}
    values.update(overrides)
    return settings.model_copy(update=values)


@contextlib.asynccontextmanager
async def ingest(settings: Settings) -> AsyncIterator[IngestStage]:
    """The stage running in this event loop; flushed and closed at the end, like the StageRunner does."""
    stage = IngestStage(settings)
    await stage.setup()
    task = asyncio.create_task(stage.run())
    try:
        yield stage
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stage.flush()
        await stage.close()


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout} s")


def counters(stage: IngestStage) -> dict[str, Any]:
    return stage.status()


async def settled(stage: IngestStage, server: FeedServer, timeout: float = 30) -> None:
    """Stop the feed's data (stall), then wait until every gap is backfilled and every message acknowledged."""
    server.stall(3600)

    def done() -> bool:
        c = counters(stage)
        return (not stage.gaps.pending and c["backfill_pending_ids"] == 0 and c["backfill_queued_ids"] == 0
                and c["buffered"] == 0 and c["spill_pending"] == 0 and not c["spilling"])

    await asyncio.sleep(0.5)
    await until(done, timeout, "backfill and delivery settled")


def _read_topic(settings: Settings, topic: str) -> list[tuple[str | None, str]]:
    consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings), "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        need = {p: end for p, end in ends.items() if end > 0}
        rows: list[tuple[str | None, str]] = []
        deadline = time.monotonic() + 30
        while need and time.monotonic() < deadline:
            for message in consumer.consume(2000, 0.5):
                if message.error():
                    continue
                key = message.key()
                rows.append((key.decode() if key is not None else None, message.value().decode()))
                if message.offset() + 1 >= need.get(message.partition(), 0):
                    need.pop(message.partition(), None)
        assert not need, f"could not read {topic} to its end"
        return rows
    finally:
        consumer.close()


async def read_topic(settings: Settings, topic: str) -> list[tuple[str | None, str]]:
    return await asyncio.to_thread(_read_topic, settings, topic)


async def market_messages(settings: Settings) -> dict[str, list[tuple[str | None, dict[str, Any], str]]]:
    """{stream kind: [(key, value, raw value text)]} from the market topics."""
    out: dict[str, list[tuple[str | None, dict[str, Any], str]]] = {}
    for kind, topic in settings.market_topics.items():
        out[kind] = [(key, json.loads(text), text) for key, text in await read_topic(settings, topic)]
    return out


def assert_complete(messages: dict[str, list[tuple[str | None, dict[str, Any], str]]],
                    allow_duplicates: bool = False) -> dict[str, int]:
    """Trade and aggTrade ids consecutive per symbol, no duplicate id in any stream; returns counts."""
    counts = {"unique": 0}
    for kind, rows in messages.items():
        ids: dict[str, list[int]] = defaultdict(list)
        for key, value, _ in rows:
            assert key == value["s"], "the key is the symbol"
            ids[value["s"]].append(value[ID_FIELD[kind]])
        for symbol, seen in ids.items():
            counts["unique"] += len(set(seen))
            duplicates = [i for i, n in Counter(seen).items() if n > 1]
            assert allow_duplicates or not duplicates, f"{symbol} {kind}: duplicate ids {duplicates[:10]}"
            if kind != "bookTicker":
                missing = sorted(set(range(min(seen), max(seen) + 1)) - set(seen))
                assert not missing, f"{symbol} {kind}: {len(missing)} ids lost, e.g. {missing[:10]}"
        counts[kind] = len(rows)
    return counts


# --- the tests ------------------------------------------------------------------------------------------


async def test_all_nine_streams_arrive_in_their_topics_with_keys_and_exact_values(
        settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1500) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await until(lambda: all(s["messages"] >= 20 for s in counters(stage)["streams"].values()), 20,
                        "every stream delivered")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
        # Cross-check values with the server's REST history (an independent copy of what it sent).
        async with aiohttp.ClientSession() as http:
            trades = {}
            for symbol in SYMBOLS:
                first = min(v["t"] for _, v, _ in messages["trade"] if v["s"] == symbol)
                async with http.get(f"{server.rest_url}/api/v3/historicalTrades",
                                    params={"symbol": symbol, "fromId": str(first), "limit": "1000"}) as response:
                    trades.update({(symbol, row["id"]): row for row in await response.json()})
    assert_complete(messages)
    for kind in KINDS:
        rows = messages[kind]
        assert {value["s"] for _, value, _ in rows} == set(SYMBOLS)
        for _, value, raw in rows:
            assert raw.endswith(f',"recv_ns":{value["recv_ns"]}}}')
            assert abs(value["recv_ns"] / 1e9 - time.time()) < 120
            if kind != "bookTicker":
                assert value["e"] == kind
    for _, value, raw in messages["trade"]:
        row = trades.get((value["s"], value["t"]))
        if row is not None:
            assert (value["p"], value["q"], value["T"], value["m"]) == (row["price"], row["qty"], row["time"],
                                                                      row["isBuyerMaker"])
            # Field order and spelling of the WebSocket event, untouched.
            assert raw.startswith(f'{{"e":"trade","E":{value["E"]},"s":"{value["s"]}","t":{value["t"]},'
                                  f'"p":"{row["price"]}","q":"{row["qty"]}"')
    for _, value, _ in messages["bookTicker"]:
        assert float(value["b"]) < float(value["a"])
    assert status["dlq"] == 0 and status["duplicates"] == 0
    assert status["messages"] == sum(len(rows) for rows in messages.values())


async def test_replayed_recording_arrives_byte_exact(settings: Settings, tmp_path: Path) -> None:
    """A recording in the `<ns> <json>` format replayed through the feed server: each Kafka value is the
    recorded `data` text with only the receive time added."""
    market = SimulatedMarket(SYMBOLS, rate=1000, seed=3, bursts=False)
    events: list[Any] = []

    async def collect(batch: list[Any]) -> None:
        events.extend(batch)
        if len(events) >= 900:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(market.run(collect), 30)
    path = tmp_path / "recording.jsonl"
    with RecordingWriter(path) as writer:
        for n, event in enumerate(events):
            writer.write(event.combined, received_ns=1_700_000_000_000_000_000 + n * 1_000_000)
    expected = {event.payload for event in events}
    source = RecordingSource(path, speed=20.0)
    async with feed_server(source=source) as server:
        config = stage_settings(settings, server, tmp_path / "data")
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["messages"] >= len(events), 30, "the whole recording")
            await until(lambda: counters(stage)["buffered"] == 0, 10, "acknowledged")
    messages = await market_messages(config)
    produced = [raw for rows in messages.values() for _, _, raw in rows]
    assert len(produced) == len(events)
    stripped = {raw[:raw.rindex(',"recv_ns":')] + "}" for raw in produced}
    assert stripped == expected


async def test_reconnects_after_the_server_drops_the_connection_and_backfills_the_gap(
        settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["messages"] > 500, 20, "messages flowing")
            assert await server.drop_connections(abrupt=True) == 1
            before = counters(stage)["messages"]
            await until(lambda: counters(stage)["reconnects"] >= 1 and counters(stage)["connections"] == 1, 15,
                        "reconnected")
            await until(lambda: counters(stage)["messages"] > before + 500, 15, "messages flowing again")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)
    assert status["reconnects"] == 1
    # The ~1 s without a connection is a gap per trade stream, backfilled from REST.
    assert status["gaps"] >= 1 and status["backfilled_ids"] == status["gap_ids"] > 0
    assert status["gap_ids_unfilled"] == 0


async def test_rotation_before_the_lifetime_loses_nothing_and_duplicates_nothing(
        settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000) as server:
        config = stage_settings(settings, server, tmp_path, connection_lifetime_s=1.5)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["rotations"] >= 3, 30, "three rotations")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)
    assert server.stats.connections_opened >= 4
    assert status["reconnects"] == 0
    # Overlapping connections deliver the same messages twice: dropped by id, and no gap to backfill.
    assert status["duplicates"] > 0
    assert status["gaps"] == 0 and status["backfilled_ids"] == 0


async def test_server_shutdown_event_is_a_rotation(settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["messages"] > 300, 20, "messages flowing")
            await server.send_server_shutdown(grace_s=1.5)
            await until(lambda: counters(stage)["rotations"] >= 1, 10, "replaced")
            await until(lambda: counters(stage)["connections"] == 1, 10, "one connection")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)
    assert status["server_shutdowns"] == 1 and status["reconnects"] == 0
    assert status["gaps"] == 0 and status["dlq"] == 0


async def test_watchdog_reconnects_a_stalled_connection(settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000) as server:
        config = stage_settings(settings, server, tmp_path, watchdog_s=1.0)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["messages"] > 300, 20, "messages flowing")
            server.stall(2.5)
            await until(lambda: counters(stage)["watchdog_reconnects"] >= 1, 5, "watchdog fired")
            assert counters(stage)["last_message_age_s"] >= 1.0
            await until(lambda: counters(stage)["last_message_age_s"] < 0.5, 15, "messages again")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)  # what the stall kept off the WebSocket came back by REST
    assert status["backfilled_ids"] > 0 and status["gap_ids_unfilled"] == 0


async def test_skipped_ids_are_detected_and_backfilled(settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000, faults=Faults(skip_ids_every=50)) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["gaps"] >= 10, 20, "gaps found")
            await settled(stage, server)
            status = counters(stage)
        messages = await market_messages(config)
    assert_complete(messages)
    assert status["gaps"] >= 10
    assert status["backfilled_ids"] == status["gap_ids"]
    assert status["backfill_requests"] >= 1 and status["gap_ids_unfilled"] == 0


async def test_gaps_are_counted_but_not_filled_with_backfill_off(settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000, faults=Faults(skip_ids_every=50)) as server:
        config = stage_settings(settings, server, tmp_path, backfill=False)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["gaps"] >= 5, 20, "gaps found")
            status = counters(stage)
    assert status["backfilled_ids"] == 0 and "backfill_requests" not in status
    assert status["gap_ids_unfilled"] == status["gap_ids"] >= 5


async def test_malformed_messages_go_to_the_dlq_with_reasons_while_good_ones_flow(
        settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=1000, faults=Faults(malformed_per_1000=40)) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["dlq"] >= 60, 20, "malformed messages")
            await settled(stage, server)
            status = counters(stage)
        dlq = await read_topic(config, config.topic_dlq)
        messages = await market_messages(config)
    assert len(dlq) == status["dlq"]
    reasons = Counter()
    for key, text in dlq:
        value = json.loads(text)
        assert set(value) == {"raw", "reason", "source", "recv_ns", "topic", "partition", "offset"}
        assert value["source"] == "ingest" and isinstance(value["recv_ns"], int) and value["raw"]
        assert key is None or key in SYMBOLS
        reasons[value["reason"].partition(":")[0]] += 1
    assert {"not_json", "missing_field", "wrong_type", "not_positive", "unknown_stream", "crossed_book"} <= set(reasons)
    assert dict(reasons) == status["dlq_reasons"]
    # Every good message still flowed; the trades that were malformed came back by backfill.
    assert_complete(messages)
    assert sum(len(rows) for rows in messages.values()) > 10 * status["dlq"]


async def test_broker_stopped_for_10_s_loses_nothing(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=600) as server:
        config = stage_settings(settings, server, tmp_path, ingest_buffer_messages=1000)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["acked"] > 300, 20, "messages acknowledged")
            try:
                await stack.kafka.stop()
                await asyncio.sleep(10)
                during = counters(stage)
            finally:
                await stack.kafka.start()
            await until(lambda: not counters(stage)["spilling"], 60, "spill sent")
            await settled(stage, server, timeout=60)
            status = counters(stage)
        assert not list((tmp_path / "spill").glob("ingest-*.spill")), "the sent spill segments are deleted"
        messages = await market_messages(config)
    assert during["spilling"] and during["spilled"] > 0 and during["buffered"] >= 900
    # Nothing lost, counted by ids. A broker restart may make the client send a batch again whose
    # acknowledgement it never got (at least once): such duplicates are tolerated here, and counted.
    counts = assert_complete(messages, allow_duplicates=True)
    assert counts["unique"] == status["messages"] - status["duplicates"]
    assert status["produce_failed"] == 0


async def test_a_producer_that_failed_for_good_is_replaced_and_recent_messages_sent_again(
        settings: Settings, tmp_path: Path) -> None:
    """A broker that lost acknowledged messages (an idempotent producer's sequence error after its restart):
    the producer is replaced, the last acknowledged messages are sent again, nothing is lost."""
    out = KafkaOutput(bootstrap_servers(settings), tmp_path / "spill", 1000)
    runner = asyncio.create_task(out.run())
    try:
        for n in range(200):
            out.send(settings.topic_trade, f'{{"n":{n}}}', "BTCUSDT", int(time.time() * 1000))
        await until(lambda: out.acked == 200, 20, "acknowledged")
        out._on_error(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "sequence desynchronization", fatal=True))
        for n in range(200, 300):
            out.send(settings.topic_trade, f'{{"n":{n}}}', "BTCUSDT", int(time.time() * 1000))
        await until(lambda: out.restarts == 1 and not out.spilling and out.buffered == 0, 20, "replaced and sent")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await out.flush(2)
        out.close()
    assert 200 <= out.resent <= 300  # the 100 sent after the error may have been acknowledged before it was seen
    numbers = [json.loads(text)["n"] for _, text in await read_topic(settings, settings.topic_trade)]
    assert sorted(set(numbers)) == list(range(300)) and len(numbers) == 300 + out.resent


async def test_a_spill_left_by_a_previous_run_is_sent_at_start(settings: Settings, tmp_path: Path) -> None:
    spill = SpillStore(tmp_path / "spill")
    for n in range(50):
        spill.append(settings.topic_trade, "BTCUSDT", f'{{"n":{n}}}', int(time.time() * 1000))
    spill.close()
    async with feed_server(rate=200) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            assert counters(stage)["spill_recovered"] == 50
            await until(lambda: not list((tmp_path / "spill").glob("ingest-*.spill")), 20, "spill sent and deleted")
            await until(lambda: counters(stage)["messages"] > 100 and not counters(stage)["spilling"], 20, "live")
    rows = await read_topic(config, config.topic_trade)
    recovered = [json.loads(text)["n"] for _, text in rows if text.startswith('{"n":')]
    assert sorted(recovered) == list(range(50))


async def test_pings_are_answered_and_the_rate_limit_kept(settings: Settings, tmp_path: Path) -> None:
    async with feed_server(rate=300, ping_interval_s=0.3, pong_timeout_s=1.0) as server:
        config = stage_settings(settings, server, tmp_path)
        async with ingest(config) as stage:
            await asyncio.sleep(4)
            status = counters(stage)
    assert status["pings"] >= 8 and status["pongs"] == status["pings"]
    assert status["reconnects"] == 0
    assert "pong_timeout" not in server.stats.drops and "rate_limit" not in server.stats.drops


async def test_more_than_1024_streams_use_several_connections(settings: Settings, tmp_path: Path) -> None:
    symbols = [f"S{n:03d}USDT" for n in range(350)]  # 1050 streams
    async with feed_server(rate=2000, symbols=symbols) as server:
        config = stage_settings(settings, server, tmp_path, symbols=symbols)
        async with ingest(config) as stage:
            await until(lambda: counters(stage)["connections"] == 2, 20, "two connections")
            await until(lambda: counters(stage)["messages"] > 2000, 20, "messages")
            status = counters(stage)
            groups = [len(group.streams) for group in stage.groups]
    assert groups == [525, 525]
    first, second = (set(group) for group in (stage.groups[0].streams, stage.groups[1].streams))
    active = {name for name, s in status["streams"].items() if s["messages"]}
    assert active & first and active & second
    assert status["dlq"] == 0 and "rate_limit" not in server.stats.drops


async def test_stage_process_writes_heartbeats_and_exits_0_on_sigterm(
        settings: Settings, db: asyncpg.Connection) -> None:
    async with feed_server(rate=500) as server:
        process = start_stage(settings, "ingest", {"CRYPTOTUI_BINANCE_WS_URL": server.url,
                                                   "CRYPTOTUI_BINANCE_REST_URL": server.rest_url})
        try:
            beats: set[Any] = set()

            async def flowing() -> bool:
                row = await stage_row(db, "ingest")
                if row and row["state"] == "running" and row["pid"] == process.pid:
                    beats.add(row["heartbeat_at"])
                    return len(beats) >= 3 and row["counters"]["acked"] > 200
                return False

            await wait_for(flowing, timeout=60)
            code, took, output = await stop_stage(process)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 0, output
    assert took < 10
    row = await stage_row(db, "ingest")
    assert row is not None and row["state"] == "stopped"
    final = row["counters"]
    for name in ("rate", "streams", "dlq", "reconnects", "gaps", "backfilled_ids", "buffered", "spilled",
                 "last_message_age_s", "ack_p99_ms"):
        assert name in final
    assert len(final["streams"]) == 9 and final["buffered"] == 0
    rows = await read_topic(settings, settings.topic_trade)
    assert len(rows) == final["streams"]["btcusdt@trade"]["messages"] + final["streams"]["ethusdt@trade"][
        "messages"] + final["streams"]["bnbusdt@trade"]["messages"]
