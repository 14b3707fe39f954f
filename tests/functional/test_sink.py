"""The sink against a real broker and database: exact values, duplicates, dead letters, crashes, outages."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as CTopicPartition

from cryptotui.bench.sink import MessageFactory, producer, sink_counters, start_sink, stop_process, stored_offsets
from cryptotui.config import Settings
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.services.stack import Stack
from cryptotui.stages.sink import GROUP_ID, SinkStage

TABLE_KEYS = {"trade": ("trades", "trade_id", "t"), "aggTrade": ("agg_trades", "agg_trade_id", "a"),
              "bookTicker": ("book_ticker", "update_id", "u")}


# --- helpers (also used by test_lag.py) -------------------------------------------------------------
def produce_values(settings: Settings, messages: Iterable[tuple[str, str | None, bytes | None]]) -> int:
    """Produce (stream, key, value) to the market topics; returns how many."""
    out = producer(settings, **{"linger.ms": 5})
    count = 0
    for stream, key, value in messages:
        out.produce(settings.market_topics[stream], key=key.encode() if key else None, value=value)  # type: ignore[index]
        count += 1
        if count % 5000 == 0:
            out.poll(0)
    assert out.flush(30) == 0
    return count


def realistic(count: int, seed: int = 3) -> list[tuple[str, str, bytes]]:
    factory = MessageFactory(seed)
    messages = []
    for _ in range(count):
        stream, symbol, message = factory.next(time.time_ns())
        messages.append((stream, symbol, json.dumps(message).encode()))
    return messages


async def end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(settings))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, partition) for topic in settings.market_topics.values()
               for partition in range(settings.kafka_partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items() if offset}


async def wait_stored(settings: Settings, timeout: float, process: subprocess.Popen[bytes] | None = None,
                      log_path: Path | None = None, group: str = GROUP_ID) -> None:
    """Until the sink's stored offsets reach every market partition's end."""
    ends = await end_offsets(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(database_url(settings), timeout=5)
            try:
                stored = await stored_offsets(conn, group)
            finally:
                await conn.close()
            if all(stored.get(tp, 0) >= end for tp, end in ends.items()):
                return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError(f"sink exited with {process.returncode}:\n{log_text(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"sink did not store every offset within {timeout} s:\n{log_text(log_path)}")
        await asyncio.sleep(0.2)


def log_text(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:])


async def stored_keys(conn: asyncpg.Connection) -> dict[str, list[tuple[str, int]]]:
    result = {}
    for stream, (table, column, _) in TABLE_KEYS.items():
        rows = await conn.fetch(f"SELECT symbol, {column} AS id FROM {table}")
        result[stream] = [(row["symbol"], row["id"]) for row in rows]
    return result


def produced_keys(messages: Iterable[tuple[str, str, bytes]]) -> dict[str, set[tuple[str, int]]]:
    keys: dict[str, set[tuple[str, int]]] = {stream: set() for stream in TABLE_KEYS}
    for stream, _, value in messages:
        data = json.loads(value)
        keys[stream].add((data["s"], data[TABLE_KEYS[stream][2]]))
    return keys


class SteadyProducer(threading.Thread):
    """Produces realistic messages at `rate` per second until stopped; remembers what it sent."""

    def __init__(self, settings: Settings, rate: int, seed: int = 11) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.settings = settings
        self.rate = rate
        self.factory = MessageFactory(seed)
        self.sent: list[tuple[str, str, bytes]] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            out = producer(self.settings, **{"linger.ms": 5})
            started = time.monotonic()
            while not self.stopping.is_set():
                due = int((time.monotonic() - started) * self.rate) - len(self.sent)
                for _ in range(max(0, due)):
                    stream, symbol, message = self.factory.next(time.time_ns())
                    value = json.dumps(message).encode()
                    out.produce(self.settings.market_topics[stream], key=symbol.encode(), value=value)  # type: ignore[index]
                    self.sent.append((stream, symbol, value))
                out.poll(0)
                time.sleep(0.01)
            assert out.flush(30) == 0
        except BaseException as error:  # reported by stop()
            self.error = error

    def stop(self) -> list[tuple[str, str, bytes]]:
        self.stopping.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        return self.sent


def assert_exactly(stored: dict[str, list[tuple[str, int]]], produced: dict[str, set[tuple[str, int]]]) -> None:
    for stream, keys in produced.items():
        assert len(stored[stream]) == len(set(stored[stream])), f"{stream}: a message stored twice"
        missing = keys - set(stored[stream])
        extra = set(stored[stream]) - keys
        assert not missing and not extra, f"{stream}: {len(missing)} missing, {len(extra)} unexpected"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "sink.log"


# --- tests ------------------------------------------------------------------------------------------
async def test_sink_stores_exact_values_and_the_receive_time_of_the_message(
    settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    recv_ns = 1_609_459_200_123_456_789  # 2021-01-01: the sink's clock would say otherwise
    big = "123456789012345678901234567890.123456789012345678901234567890"
    trade = {"e": "trade", "E": 1732406400124, "s": "BTCUSDT", "t": 9_000_000_000_000_000_001,
             "p": "98012.34000000", "q": "0.00000001", "T": 1732406400123, "m": True, "M": True,
             "recv_ns": recv_ns}
    agg = {"e": "aggTrade", "E": 4102444800999, "s": "ETHUSDT", "a": 1, "p": big, "q": "0", "f": 10, "l": 12,
           "T": 1, "m": False, "M": True, "recv_ns": recv_ns + 1}
    book = {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000",
            "A": "40.66000000", "recv_ns": recv_ns + 999}
    produce_values(settings, [("trade", "BTCUSDT", json.dumps(trade).encode()),
                              ("aggTrade", "ETHUSDT", json.dumps(agg).encode()),
                              ("bookTicker", "BNBUSDT", json.dumps(book).encode())])
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
    finally:
        code = stop_process(process)
    assert code == 0, log_text(log_path)

    row = await db.fetchrow("SELECT *, price::text AS p, qty::text AS q FROM trades")
    assert (row["p"], row["q"]) == ("98012.34000000", "0.00000001")
    assert row["price"] == Decimal("98012.34000000")
    assert row["trade_id"] == 9_000_000_000_000_000_001 and row["symbol"] == "BTCUSDT" and row["is_buyer_maker"]
    assert row["trade_time"] == datetime(2024, 11, 24, 0, 0, 0, 123000, tzinfo=UTC)
    assert row["event_time"] == datetime(2024, 11, 24, 0, 0, 0, 124000, tzinfo=UTC)
    assert row["recv_time"] == datetime(2021, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)

    row = await db.fetchrow("SELECT *, price::text AS p, qty::text AS q FROM agg_trades")
    assert (row["p"], row["q"]) == (big, "0")
    assert row["trade_time"] == datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    assert row["event_time"] == datetime(2100, 1, 1, 0, 0, 0, 999000, tzinfo=UTC)
    assert (row["first_trade_id"], row["last_trade_id"], row["is_buyer_maker"]) == (10, 12, False)
    assert row["recv_time"] == datetime(2021, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)

    row = await db.fetchrow("SELECT bid::text, bid_qty::text, ask::text, ask_qty::text, recv_time, update_id"
                            " FROM book_ticker")
    assert tuple(row)[:4] == ("25.35190000", "31.21000000", "25.36520000", "40.66000000")
    assert row["recv_time"] == datetime(2021, 1, 1, 0, 0, 0, 123457, tzinfo=UTC)  # ns truncated to µs
    assert row["update_id"] == 400900217
    # The text of what is stored reads back exactly, also through the time zone of the session.
    assert await db.fetchval("SELECT to_char(trade_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS')"
                             " FROM trades") == "2024-11-24 00:00:00.123"


async def test_the_same_messages_produced_twice_are_stored_once(
    settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    messages = realistic(3000)
    produce_values(settings, messages)
    produce_values(settings, messages)
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 120, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    assert_exactly(await stored_keys(db), produced_keys(messages))
    counters = await sink_counters(db)
    assert sum(counters["duplicates"].values()) == 3000
    assert sum(counters["rows_written"].values()) == 3000


async def test_poison_messages_go_to_the_dead_letter_topic_with_their_reason(
    settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    good = realistic(300, seed=4)
    base = json.loads(next(value for stream, _, value in good if stream == "trade"))
    bad: list[tuple[str, str | None, bytes | None, str]] = [
        ("trade", "BTCUSDT", b"{not json", "value is not JSON"),
        ("trade", None, None, "empty message value"),
        ("trade", "BTCUSDT", json.dumps({**base, "p": 98012.34}).encode(), "field 'p' (price): expected a decimal"),
        ("trade", "BTCUSDT", json.dumps({**base, "t": 2**64}).encode(), "out of range for bigint"),
        ("trade", "BTCUSDT", json.dumps({**base, "T": 10**17}).encode(), "out of range for a timestamp"),
        ("aggTrade", "BTCUSDT", json.dumps({**base, "t": 5}).encode(), "expected 'aggTrade'"),
        ("bookTicker", "ETHUSDT",
         json.dumps({"u": 1, "s": "ETHUSDT", "b": "1.0", "B": "1.0", "a": "1.1", "recv_ns": 5}).encode(),
         "missing field 'A'"),
        ("bookTicker", "ETHUSDT", b"[1, 2, 3]", "not a JSON object"),
    ]
    # Poison in the middle of good messages, on every topic.
    mixed: list[tuple[str, str | None, bytes | None]] = list(good[:150])
    mixed += [(stream, key, value) for stream, key, value, _ in bad]
    mixed += good[150:]
    produce_values(settings, mixed)
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    assert_exactly(await stored_keys(db), produced_keys(good))
    assert (await sink_counters(db))["dlq"] == len(bad)

    consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings), "group.id": "test-dlq-reader",
                         "enable.auto.commit": False})
    try:
        consumer.assign([CTopicPartition(settings.topic_dlq, p, 0) for p in range(settings.kafka_partitions)])
        letters = []
        deadline = time.monotonic() + 20
        while len(letters) < len(bad) and time.monotonic() < deadline:
            for message in consumer.consume(100, 1.0):
                if message.error() is None:
                    letters.append(json.loads(message.value()))
    finally:
        consumer.close()
    assert len(letters) == len(bad)
    for letter in letters:
        assert letter["source"] == "sink"
        assert letter["topic"] in settings.market_topics.values()
        assert isinstance(letter["partition"], int) and isinstance(letter["offset"], int)
    by_reason = {letter["reason"]: letter for letter in letters}
    for stream, _, value, expected in bad:
        matches = [letter for reason, letter in by_reason.items() if expected in reason]
        assert matches, f"no dead letter with {expected!r}: {sorted(by_reason)}"
        assert matches[0]["raw"] == ("" if value is None else value.decode())
        assert matches[0]["topic"] == settings.market_topics[stream]  # type: ignore[index]
    # Each letter points at the original message.
    consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings), "group.id": "test-dlq-check",
                         "enable.auto.commit": False})
    try:
        letter = by_reason[next(reason for reason in by_reason if "bigint" in reason)]
        consumer.assign([CTopicPartition(letter["topic"], letter["partition"], letter["offset"])])
        original = next(message for message in consumer.consume(1, 10.0) if message.error() is None)
        assert original.value().decode() == letter["raw"]
        assert letter["recv_ns"] == base["recv_ns"]
    finally:
        consumer.close()


async def test_sink_killed_repeatedly_mid_batch_stores_every_message_exactly_once(
    settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    rng = random.Random(8)
    steady = SteadyProducer(settings, rate=4000)
    steady.start()
    kills = 0
    try:
        for _ in range(5):
            process = start_sink(settings, log_path)
            await asyncio.sleep(rng.uniform(1.5, 3.5))
            assert process.poll() is None, log_text(log_path)
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
    finally:
        sent = steady.stop()
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 180, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    assert kills == 5 and len(sent) > 20_000
    assert_exactly(await stored_keys(db), produced_keys(sent))
    transactions = await db.fetchval("SELECT count(*) FROM sink_offsets")
    assert transactions > 0


async def test_database_down_for_15_s_loses_nothing_and_shows_the_outage(
    stack: Stack, settings: Settings, log_path: Path
) -> None:
    steady = SteadyProducer(settings, rate=2000, seed=12)
    process = start_sink(settings, log_path)
    steady.start()
    stopped_at = None
    try:
        await asyncio.sleep(4)
        await stack.postgres.stop()
        stopped_at = time.monotonic()
        await asyncio.sleep(15)
    finally:
        await stack.postgres.start()
    try:
        await asyncio.sleep(3)
        sent = steady.stop()
        await wait_stored(settings, 120, process, log_path)
        # The status row is written by the heartbeat: wait for one that shows the recovered outage.
        conn = await asyncpg.connect(database_url(settings))
        try:
            deadline = time.monotonic() + 10
            counters: dict[str, Any] = {}
            while time.monotonic() < deadline and not counters.get("last_outage"):
                counters = await sink_counters(conn, process.pid)
                await asyncio.sleep(0.3)
            assert process.poll() is None, log_text(log_path)
        finally:
            await conn.close()
    finally:
        code = stop_process(process)
    assert code == 0, log_text(log_path)
    assert stopped_at is not None
    outage = counters["last_outage"]
    assert counters["outages"] >= 1 and counters["outage"] is None
    assert outage["attempts"] >= 3 and outage["seconds"] >= 10, outage
    assert outage["since"] and outage["until"] and outage["error"]
    assert "pausing consumption" in log_path.read_text()
    conn = await asyncpg.connect(database_url(settings))
    try:
        assert_exactly(await stored_keys(conn), produced_keys(sent))
    finally:
        await conn.close()


async def test_a_rebalance_flushes_and_commits_before_giving_partitions_up(
    settings: Settings, db: asyncpg.Connection
) -> None:
    steady = SteadyProducer(settings, rate=1500, seed=13)
    steady.start()
    first, second = SinkStage(settings), SinkStage(settings)
    # Two members, each with its own static id, in a group of their own: noida-db never expires members,
    # and the stopped ones would otherwise wait in the group every later test's sink joins.
    group = f"test-rebalance-{settings.topic_trade.split('.')[0]}"
    first.group_id = second.group_id = group
    first.instance_id, second.instance_id = f"{group}-a", f"{group}-b"
    tasks: list[asyncio.Task[None]] = []
    try:
        await first.setup()
        tasks.append(asyncio.create_task(first.run()))
        await asyncio.sleep(4)
        assert len(first.counters["assigned"]) == 9
        await second.setup()  # joins the group: the partitions are shared out again
        tasks.append(asyncio.create_task(second.run()))
        deadline = time.monotonic() + 30
        while not (first.counters["assigned"] and second.counters["assigned"]):
            assert time.monotonic() < deadline, "the second sink got no partitions"
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)
        sent = steady.stop()
        await wait_stored(settings, 60, group=group)
        assert len(first.counters["assigned"]) + len(second.counters["assigned"]) == 9
    finally:
        if steady.is_alive():
            steady.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task
        for stage in (first, second):
            await stage.flush()
            await stage.close()
    assert_exactly(await stored_keys(db), produced_keys(sent))
    # Nothing was read twice: the first sink wrote and stored its offsets before letting go.
    duplicates = sum(first.counters["duplicates"].values()) + sum(second.counters["duplicates"].values())
    assert duplicates == 0
    assert first.counters["transactions"] > 0 and second.counters["transactions"] > 0


async def test_broker_restart_keeps_the_offsets_and_loses_nothing(
    stack: Stack, settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    messages, more = realistic(2000, seed=14), realistic(4000, seed=14)[2000:]  # ids go on where they stopped
    produce_values(settings, messages)
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
        stored = await stored_offsets(db)
        deadline = time.monotonic() + 15  # the copy in the Kafka group is committed every few seconds
        while (group_offsets := await kafka_committed(settings)) != stored:
            assert time.monotonic() < deadline, (group_offsets, stored)
            await asyncio.sleep(0.5)
        await stack.kafka.stop()
        try:
            await asyncio.sleep(3)
        finally:
            await stack.kafka.start()
        # Committed offsets survive the broker restart (the sink does not rely on them, tools do).
        assert await kafka_committed(settings) == group_offsets
        produce_values(settings, more)
        await wait_stored(settings, 90, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    assert_exactly(await stored_keys(db), produced_keys(messages + more))
    counters = await sink_counters(db)
    assert sum(counters["duplicates"].values()) == 0


async def kafka_committed(settings: Settings) -> dict[tuple[str, int], int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(settings))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(GROUP_ID)
    finally:
        await admin.close()
    topics = set(settings.market_topics.values())
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if tp.topic in topics}


async def test_sink_stopped_during_a_database_outage_exits_in_time_and_loses_nothing(
    stack: Stack, settings: Settings, log_path: Path
) -> None:
    messages = realistic(4000, seed=16)
    first, second = messages[:2000], messages[2000:]
    produce_values(settings, first)
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
        await stack.postgres.stop()
        try:
            produce_values(settings, second)
            deadline = time.monotonic() + 30  # the sink fetches them, fails to write, pauses
            while "pausing consumption" not in log_path.read_text():
                assert time.monotonic() < deadline, log_text(log_path)
                await asyncio.sleep(0.2)
            started = time.monotonic()
            code = stop_process(process)
            took = time.monotonic() - started
        finally:
            await stack.postgres.start()
    finally:
        stop_process(process)
    assert code == 0 and took < 10, (code, took, log_text(log_path))
    assert "will be read again" in log_path.read_text(), log_text(log_path)
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    conn = await asyncpg.connect(database_url(settings))
    try:
        assert_exactly(await stored_keys(conn), produced_keys(messages))
    finally:
        await conn.close()


async def test_a_row_the_database_refuses_is_dead_lettered_and_the_rest_is_stored(
    settings: Settings, db: asyncpg.Connection, log_path: Path
) -> None:
    # Mapping accepts the message; a constraint of the database does not (as a stricter schema might).
    await db.execute("ALTER TABLE trades ADD CONSTRAINT test_price_cap CHECK (price < 1000000)")
    good = [message for message in realistic(400, seed=17) if message[0] == "trade"]
    refused = json.loads(good[0][2]) | {"t": 1, "p": "2000000.00000000"}
    produce_values(settings, [*good[:50], ("trade", "BTCUSDT", json.dumps(refused).encode()), *good[50:]])
    process = start_sink(settings, log_path)
    try:
        await wait_stored(settings, 60, process, log_path)
    finally:
        assert stop_process(process) == 0, log_text(log_path)
    assert_exactly(await stored_keys(db), produced_keys(good))
    counters = await sink_counters(db)
    assert counters["rejected_by_db"] == 1 and counters["dlq"] == 1
    assert "looking for the rows at fault" in log_path.read_text()
