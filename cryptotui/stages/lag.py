"""The lag stage: every `lag_interval_s`, one `kafka_lag` row per consumer group, topic and partition.

Rows are history (appended), so lag can be watched over time. Each row holds the partition's end offset
(high watermark), the group's committed offset, the lag in messages (end - committed) and the lag in
seconds: the age of the oldest message not yet consumed, from the receive time (`recv_ns`) of the
message at the committed offset (the broker's record timestamp when a message has none).

Where the committed offsets come from:
- `cryptotui-sink`: the `sink_offsets` table. The sink stores its offsets in the same transaction as
  the rows (the database is its source of truth; what it commits to Kafka is a throttled copy).
- `spark`: the newest `spark_progress` row mentioning each topic (`end_offsets`, migration 0006):
  Spark keeps its offsets in its checkpoint, not in a consumer group. Skipped (logged once) when the
  column does not exist.
- every other consumer group the broker lists: its committed offsets (admin API), for this
  deployment's topics (the market topics and the dead-letter topic).
A partition without a committed offset has everything retained as lag (end - log start).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cryptotui.config import Settings
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.base import Stage
from cryptotui.stages.sink import GROUP_ID as SINK_GROUP
from cryptotui.stages.sink_consumer import throttle_empty_fetches

SPARK_GROUP = "spark"
PROBE_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)

INSERT_LAG = """
INSERT INTO kafka_lag (time, group_id, topic, partition, end_offset, committed_offset, lag, lag_seconds)
SELECT $1, u.group_id, u.topic, u.partition, u.end_offset, u.committed_offset, u.lag, u.lag_seconds
FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::float8[])
    AS u(group_id, topic, partition, end_offset, committed_offset, lag, lag_seconds)
"""

SPARK_OFFSETS = """
SELECT DISTINCT ON (e.topic) e.topic, e.parts
FROM spark_progress AS p, jsonb_each(p.end_offsets) AS e(topic, parts)
WHERE p.end_offsets IS NOT NULL AND jsonb_typeof(p.end_offsets) = 'object' AND e.topic = ANY($1::text[])
ORDER BY e.topic, p.time DESC
"""


@dataclass(frozen=True)
class LagRow:
    group_id: str
    topic: str
    partition: int
    end_offset: int
    committed_offset: int | None
    lag: int
    lag_seconds: float | None


def received_ns(value: bytes | None, timestamp_ms: int | None) -> int | None:
    """When a message was received: its `recv_ns`, else the broker's record timestamp."""
    try:
        data = json.loads(value) if value is not None else None
    except ValueError:
        data = None
    if isinstance(data, dict) and type(data.get("recv_ns")) is int:
        return data["recv_ns"]
    if timestamp_ms is not None and timestamp_ms >= 0:
        return timestamp_ms * 1_000_000
    return None


def lag_rows(
    group: str,
    committed: dict[TopicPartition, int | None],
    beginning: dict[TopicPartition, int],
    end: dict[TopicPartition, int],
    oldest_ns: dict[tuple[TopicPartition, int], int | None],
    now_ns: int,
) -> list[LagRow]:
    """The rows of one group: lag from the committed offset (or the log start when none)."""
    rows = []
    for tp in sorted(committed, key=lambda tp: (tp.topic, tp.partition)):
        if tp not in end:
            continue
        offset = committed[tp]
        start = max(offset if offset is not None else beginning.get(tp, 0), beginning.get(tp, 0))
        lag = max(0, end[tp] - start)
        if lag == 0:
            seconds: float | None = 0.0
        else:
            received = oldest_ns.get((tp, start))
            seconds = None if received is None else max(0.0, (now_ns - received) / 1e9)
        rows.append(LagRow(group, tp.topic, tp.partition, end[tp], offset, lag, seconds))
    return rows


class LagStage(Stage):
    name = "lag"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.topics = list(settings.all_topics)
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._conn: asyncpg.Connection | None = None
        self._spark_column: bool | None = None
        self._warned: set[str] = set()
        self.counters = {
            "samples": 0,
            "rows_written": 0,
            "failed_samples": 0,
            "last_sample_at": None,
            "last_error": None,
            "groups": [],
            "lag": {},
            "lag_seconds": {},
        }

    # --- lifecycle ----------------------------------------------------------------------------
    async def setup(self) -> None:
        servers = bootstrap_servers(self.settings)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=servers,
            group_id=None,
            client_id="cryptotui-lag",
            enable_auto_commit=False,
            max_partition_fetch_bytes=64 * 1024,
            request_timeout_ms=int(REQUEST_TIMEOUT_S * 1000),
        )
        self._admin = AIOKafkaAdminClient(
            bootstrap_servers=servers, client_id="cryptotui-lag", request_timeout_ms=int(REQUEST_TIMEOUT_S * 1000)
        )
        await self._consumer.start()
        throttle_empty_fetches(self._consumer)
        await self._admin.start()

    async def run(self) -> None:
        interval = self.settings.lag_interval_s
        while True:
            started = time.monotonic()
            try:
                rows = await self.sample()
                await self.write(rows)
            except Exception as error:
                self.counters["failed_samples"] += 1
                self.counters["last_error"] = f"{type(error).__name__}: {error}"
                self._warn_once(type(error).__name__, "lag sample failed: %s", self.counters["last_error"])
                await self._drop_connection()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def close(self) -> None:
        for client in (self._consumer, self._admin):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        client.stop() if isinstance(client, AIOKafkaConsumer) else client.close(), 5
                    )
        await self._drop_connection()

    # --- one sample ---------------------------------------------------------------------------
    async def sample(self) -> list[LagRow]:
        """Read every group's committed offsets and the topics' offsets; probe the oldest messages."""
        consumer, admin = self._consumer, self._admin
        assert consumer is not None and admin is not None
        partitions = await self._partitions()
        conn = await self._connection()
        groups: dict[str, dict[TopicPartition, int | None]] = {}
        groups[SINK_GROUP] = await self._sink_offsets(conn, partitions)
        spark = await self._spark_offsets(conn, partitions)
        if spark is not None:
            groups[SPARK_GROUP] = spark
        for group in await self._kafka_groups(admin):
            offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(group), REQUEST_TIMEOUT_S)
            mine = {tp: meta.offset for tp, meta in offsets.items() if tp in partitions and meta.offset >= 0}
            if mine:
                groups[group] = {tp: mine.get(tp) for tp in partitions if tp.topic in {t.topic for t in mine}}
        beginning = await asyncio.wait_for(consumer.beginning_offsets(partitions), REQUEST_TIMEOUT_S)
        end = await asyncio.wait_for(consumer.end_offsets(partitions), REQUEST_TIMEOUT_S)
        # The oldest unconsumed message of each (partition, offset) with a lag, fetched once for all groups.
        wanted: set[tuple[TopicPartition, int]] = set()
        for committed in groups.values():
            for tp, offset in committed.items():
                start = max(offset if offset is not None else beginning[tp], beginning[tp])
                if start < end[tp]:
                    wanted.add((tp, start))
        oldest = await self._probe(wanted)
        now_ns = time.time_ns()
        rows = []
        for group, committed in groups.items():
            rows.extend(lag_rows(group, committed, beginning, end, oldest, now_ns))
        return rows

    async def _partitions(self) -> list[TopicPartition]:
        consumer = self._consumer
        assert consumer is not None
        existing = await asyncio.wait_for(consumer.topics(), REQUEST_TIMEOUT_S)  # refreshes the metadata
        partitions = []
        for topic in self.topics:
            if topic in existing:
                ids = consumer.partitions_for_topic(topic) or set()
                partitions.extend(TopicPartition(topic, partition) for partition in sorted(ids))
        return partitions

    async def _kafka_groups(self, admin: AIOKafkaAdminClient) -> list[str]:
        listed = await asyncio.wait_for(admin.list_consumer_groups(), REQUEST_TIMEOUT_S)
        names = sorted({entry[0] for entry in listed})
        # The sink's truth is in the database; Spark has no Kafka group (its name is reserved here).
        return [name for name in names if name not in (SINK_GROUP, SPARK_GROUP)]

    async def _sink_offsets(
        self, conn: asyncpg.Connection, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        rows = await conn.fetch(
            "SELECT topic, partition, next_offset FROM sink_offsets WHERE group_id = $1 AND topic = ANY($2::text[])",
            SINK_GROUP,
            list(self.settings.market_topics.values()),
        )
        stored = {TopicPartition(row["topic"], row["partition"]): row["next_offset"] for row in rows}
        market = set(self.settings.market_topics.values())
        return {tp: stored.get(tp) for tp in partitions if tp.topic in market}

    async def _spark_offsets(
        self, conn: asyncpg.Connection, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int | None] | None:
        if self._spark_column is None:
            self._spark_column = bool(
                await conn.fetchval(
                    "SELECT count(*) FROM information_schema.columns"
                    " WHERE table_name = 'spark_progress' AND column_name = 'end_offsets'"
                )
            )
        if not self._spark_column:
            self._warn_once("spark-column", "spark_progress has no end_offsets column: Spark lag is not reported")
            return None
        rows = await conn.fetch(SPARK_OFFSETS, list(self.settings.market_topics.values()))
        if not rows:
            return None  # Spark has not run yet
        by_topic: dict[str, dict[str, Any]] = {}
        for row in rows:
            parts = json.loads(row["parts"]) if isinstance(row["parts"], str) else row["parts"]
            if isinstance(parts, dict):
                by_topic[row["topic"]] = parts
        offsets: dict[TopicPartition, int | None] = {}
        for tp in partitions:
            if tp.topic in by_topic:
                value = by_topic[tp.topic].get(str(tp.partition))
                offsets[tp] = int(value) if isinstance(value, int | str) and str(value).isdigit() else None
        return offsets or None

    async def _probe(self, wanted: set[tuple[TopicPartition, int]]) -> dict[tuple[TopicPartition, int], int | None]:
        """Fetch the message at each (partition, offset): its receive time in ns."""
        consumer = self._consumer
        assert consumer is not None
        found: dict[tuple[TopicPartition, int], int | None] = {}
        # One position per partition at a time: probe in rounds (groups rarely share a partition offset).
        pending = sorted(wanted, key=lambda item: (item[0].topic, item[0].partition, item[1]))
        while pending:
            round_: dict[TopicPartition, int] = {}
            rest = []
            for tp, offset in pending:
                if tp in round_:
                    rest.append((tp, offset))
                else:
                    round_[tp] = offset
            pending = rest
            consumer.assign(list(round_))
            for tp, offset in round_.items():
                consumer.seek(tp, offset)
            deadline = time.monotonic() + PROBE_TIMEOUT_S
            waiting = dict(round_)
            while waiting and time.monotonic() < deadline:
                batch = await consumer.getmany(*waiting, timeout_ms=200, max_records=len(waiting) * 50)
                for tp, records in batch.items():
                    offset = waiting.get(tp)
                    if offset is None or not records:
                        continue
                    record = records[0]
                    if record.offset >= offset:
                        found[(tp, offset)] = received_ns(record.value, record.timestamp)
                        del waiting[tp]
                        consumer.pause(tp)
            for tp, offset in waiting.items():
                found[(tp, offset)] = None
        consumer.assign([])  # no background fetching between samples
        return found

    # --- writing ------------------------------------------------------------------------------
    async def write(self, rows: list[LagRow]) -> None:
        now = datetime.now(UTC)
        if rows:
            conn = await self._connection()
            await conn.execute(
                INSERT_LAG,
                now,
                [row.group_id for row in rows],
                [row.topic for row in rows],
                [row.partition for row in rows],
                [row.end_offset for row in rows],
                [row.committed_offset for row in rows],
                [row.lag for row in rows],
                [row.lag_seconds for row in rows],
            )
        counters = self.counters
        counters["samples"] += 1
        counters["rows_written"] += len(rows)
        counters["last_sample_at"] = now.isoformat(timespec="milliseconds")
        groups = sorted({row.group_id for row in rows})
        counters["groups"] = groups
        counters["lag"] = {group: sum(row.lag for row in rows if row.group_id == group) for group in groups}
        counters["lag_seconds"] = {
            group: max((row.lag_seconds or 0.0 for row in rows if row.group_id == group), default=0.0)
            for group in groups
        }

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(database_url(self.settings), timeout=5, command_timeout=10)
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._warned:
            self.log.debug(message, *args)
        else:
            self._warned.add(key)
            self.log.warning(message, *args)
