"""The sink stage: the market topics -> TimescaleDB, every message stored exactly once.

How it keeps that promise:
- Consumer group `cryptotui-sink` over the three market topics; messages are mapped
  (`sink_mapping`) into per-table batches of at most `sink_batch_size` messages.
- A write starts when a table's batch is full or its oldest message is `sink_batch_timeout_s` old. It
  takes every buffered batch (the tables that are not due yet ride along for free; with a backlog up to
  `BACKLOG_BATCHES` batches per table) and, in ONE transaction: COPY into a temporary staging table,
  INSERT ... SELECT ... ON CONFLICT DO NOTHING into the table (`sink_mapping.TableMapping.insert_sql`),
  and upsert the next offset of each topic-partition into `sink_offsets`. Rows and offsets commit
  together, so the database is the source of truth: on every assignment the consumer seeks to the
  offsets stored there (earliest when none: nothing is skipped).
  Replays after a crash are absorbed by the primary keys. Kafka offsets are committed afterwards, for
  tools that read the group's offsets; the sink never relies on them.
- Messages that cannot be mapped go to the dead-letter topic (acknowledged before the transaction that
  passes their offsets), with the reason, topic, partition and offset.
- While the database fails, fetching is paused, the same batches are retried with backoff, nothing is
  committed; the outage shows in the counters.
- Writes run in a background task while the next messages are fetched and mapped (the database and
  Python work at the same time); one write at a time, under a lock shared with the rebalance listener,
  which flushes and commits before the partitions are given up.
- Static group membership (`instance_id`): a restarted sink takes its old place in the group at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from cryptotui.config import Settings
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.base import Stage
from cryptotui.stages.sink_consumer import throttle_empty_fetches
from cryptotui.stages.sink_mapping import MAPPINGS, TABLES, MappingError, Row, TableMapping, dead_letter, map_message
from cryptotui.stages.sink_stats import LatencyWindow

GROUP_ID = "cryptotui-sink"
# With a backlog, one transaction writes up to this many batches of each table (fewer, larger commits).
BACKLOG_BATCHES = 8
# Stop fetching while this many batches are buffered (the writer is behind or the database is down).
MAX_BUFFERED_BATCHES = 40
FETCH_MAX_RECORDS = 5000
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
DB_TIMEOUT_S = 30.0
REVOKE_FLUSH_TIMEOUT_S = 15.0
# Stored offsets are committed to the Kafka group at most this often, for tools reading the group. (Each
# commit makes noida-db rewrite its whole state file: ~0.25 s of its CPU with 300k messages retained.)
KAFKA_COMMIT_INTERVAL_S = 5.0
# Messages mapped between two yields to the event loop.
MAP_CHUNK = 500
# How often the main loop looks at a running write (short: the next write starts as soon as it ends).
WRITER_POLL_MS = 10
DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, OverflowError, TypeError)

log = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    value: bytes | None
    reason: str
    topic: str
    partition: int
    offset: int
    sent: bool = False


@dataclass
class Batch:
    """Consecutive messages of one table (its topic's partitions), at most `sink_batch_size`."""

    mapping: TableMapping
    created: float
    rows: list[Row] = field(default_factory=list)
    recv_ns: list[int] = field(default_factory=list)
    # (value, topic, partition, offset) of each row: to dead-letter a row the database rejects.
    sources: list[tuple[bytes | None, str, int, int]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    count: int = 0


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


class _ProbeDone(Exception):
    """Rolls back a probe's savepoint after it succeeded."""


class _Listener(ConsumerRebalanceListener):
    def __init__(self, sink: SinkStage) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.sink.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.sink.on_assigned(set(assigned))


class SinkStage(Stage):
    name = "sink"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.group_id = GROUP_ID
        # Static group membership: a restarted sink takes its old place at once. (Also needed with
        # noida-db, which never expires a dead member: after a SIGKILL, a new dynamic member of the group
        # would wait forever for the rebalance to complete.) Two sinks on one host need distinct ids.
        self.instance_id = settings.sink_instance_id or f"{GROUP_ID}-{socket.gethostname()}"
        self.batch_size = settings.sink_batch_size
        self.batch_timeout_s = settings.sink_batch_timeout_s
        self.topic_mappings: dict[str, TableMapping] = {
            topic: MAPPINGS[stream] for stream, topic in settings.market_topics.items()
        }
        self.tables = list(TABLES)
        self._buffers: dict[str, list[Batch]] = {table: [] for table in self.tables}
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._conn: asyncpg.Connection | None = None
        # Partitions positioned at their stored offsets; records of others are ignored (read again).
        self._ready: set[TopicPartition] = set()
        self._generation = 0  # incremented by every rebalance
        self._to_commit: dict[TopicPartition, int] = {}  # stored in the database, not yet in Kafka
        self._kafka_committed_at = 0.0
        self._unresolved: set[TopicPartition] = set()
        self._resolve_at = 0.0
        self._retry_at = 0.0
        self._outage_since: float | None = None
        self._outage_wall: str | None = None
        self._attempts = 0
        self._paused = False
        self.latency = LatencyWindow()
        self.counters = {
            "messages": dict.fromkeys(self.tables, 0),
            "rows_written": dict.fromkeys(self.tables, 0),
            "duplicates": dict.fromkeys(self.tables, 0),
            "batches": dict.fromkeys(self.tables, 0),
            "transactions": 0,
            "dlq": 0,
            "rejected_by_db": 0,
            "last_commit_at": None,
            "last_batch_latency_ms": None,
            "outage": None,
            "outages": 0,
            "last_outage": None,
            "kafka_commit_errors": 0,
            "buffered": 0,
            "paused": False,
            "assigned": [],
        }

    # --- lifecycle ----------------------------------------------------------------------------
    async def setup(self) -> None:
        servers = bootstrap_servers(self.settings)
        self._producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=servers,
            group_id=self.group_id,
            group_instance_id=self.instance_id,
            client_id="cryptotui-sink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=FETCH_MAX_RECORDS,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self._producer.start()
        await self._consumer.start()
        throttle_empty_fetches(self._consumer)
        self._consumer.subscribe(topics=list(self.topic_mappings), listener=_Listener(self))

    async def run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            now = time.monotonic()
            if self._writer is not None and self._writer.done():
                writer, self._writer = self._writer, None
                if not writer.cancelled() and writer.exception() is not None:
                    raise writer.exception()  # a bug, not an outage (those are handled in the task)
            if self._unresolved and now >= self._resolve_at:
                await self._resolve(set(self._unresolved))
            if self._writer is None and self._to_commit and now - self._kafka_committed_at >= KAFKA_COMMIT_INTERVAL_S:
                await self._commit_kafka()
            if self._writer is None and now >= self._retry_at and self._flush_due(now):
                self._writer = asyncio.create_task(self._write_task(), name="sink-writer")
            if self._writer is not None and self._buffered_batches() >= MAX_BUFFERED_BATCHES:
                # Backpressure: the writer is behind; fetch again once it has taken its batches.
                await asyncio.wait({self._writer}, timeout=1.0)
                continue
            records = await consumer.getmany(timeout_ms=self._poll_timeout_ms(now), max_records=FETCH_MAX_RECORDS)
            generation = self._generation
            for tp, messages in records.items():
                for start in range(0, len(messages), MAP_CHUNK):
                    if self._generation != generation:
                        break  # a rebalance came in between: these records are read again after the seek
                    self._add(tp, messages[start : start + MAP_CHUNK])
                    # Let a running write send its next statement: the database works while we map.
                    await asyncio.sleep(0)
            self.counters["buffered"] = sum(b.count for batches in self._buffers.values() for b in batches)

    async def flush(self) -> None:
        """After a stop signal: wait for the running write, then write and commit what is buffered."""
        if self._outage_since is not None:
            # The database is down: do not spend the stop deadline on it. Nothing was committed, so the
            # buffered messages are read again at the next start.
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            self.log.warning("database unavailable at stop: %d buffered message(s) will be read again",
                             sum(batch.count for batches in self._buffers.values() for batch in batches))
            return
        async with self._lock:
            taken = self._take(limit=None)
            if taken:
                try:
                    await self._write(taken)
                except Exception as error:  # nothing is lost: the offsets were not committed
                    self.log.warning("final flush failed, messages will be read again: %s", _short(error))
            await self._commit_kafka(force=True)

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        # The runner allows 2 s for close(): stop both clients at once (the consumer leaves the group).
        clients = [client for client in (self._consumer, self._producer) if client is not None]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(client.stop() for client in clients), return_exceptions=True), 1.5)
        await self._drop_connection()

    def status(self) -> dict[str, Any]:
        status = dict(self.counters)
        status["latency_ms"] = self.latency.summary()
        if self._outage_since is not None:
            status["outage"] = {
                "since": self._outage_wall,
                "seconds": round(time.monotonic() - self._outage_since, 1),
                "attempts": self._attempts,
                "error": (self.counters.get("outage") or {}).get("error"),
            }
        return status

    # --- buffering ----------------------------------------------------------------------------
    def _add(self, tp: TopicPartition, messages: list[Any]) -> None:
        """Map fetched messages into the table's batches (no await: rebalances cannot interleave)."""
        if tp not in self._ready:
            return  # fetched before the seek to the stored offset: it will be read again from there
        mapping = self.topic_mappings[tp.topic]
        batches = self._buffers[mapping.table]
        size = self.batch_size
        topic, partition = tp.topic, tp.partition
        batch = batches[-1] if batches and batches[-1].count < size else None
        for message in messages:
            if batch is None or batch.count >= size:
                batch = Batch(mapping, time.monotonic())
                batches.append(batch)
            value = message.value
            try:
                row, recv_ns = map_message(mapping, value)
            except MappingError as error:
                batch.dead.append(DeadLetter(value, error.reason, topic, partition, message.offset))
            else:
                batch.rows.append(row)
                batch.recv_ns.append(recv_ns)
                batch.sources.append((value, topic, partition, message.offset))
            batch.offsets[tp] = message.offset + 1
            batch.count += 1
        self.counters["messages"][mapping.table] += len(messages)

    def _buffered_batches(self) -> int:
        return sum(len(batches) for batches in self._buffers.values())

    def _flush_due(self, now: float) -> bool:
        for batches in self._buffers.values():
            if batches and (
                len(batches) > 1
                or batches[0].count >= self.batch_size
                or now - batches[0].created >= self.batch_timeout_s
            ):
                return True
        return False

    def _poll_timeout_ms(self, now: float) -> int:
        if self._writer is not None:
            return WRITER_POLL_MS
        wake = now + 1.0
        if self._outage_since is not None:
            wake = min(wake, self._retry_at)
        elif self._unresolved:
            wake = min(wake, self._resolve_at)
        for batches in self._buffers.values():
            if batches:
                wake = min(wake, batches[0].created + self.batch_timeout_s)
        return max(0, int((wake - now) * 1000) + 1)

    def _take(self, limit: int | None = BACKLOG_BATCHES) -> dict[str, list[Batch]]:
        """Remove the oldest batches (at most `limit` per table) from the buffers, in order."""
        taken: dict[str, list[Batch]] = {}
        for table, batches in self._buffers.items():
            if batches:
                count = len(batches) if limit is None else min(limit, len(batches))
                taken[table] = batches[:count]
                del batches[:count]
        return taken

    def _put_back(self, taken: dict[str, list[Batch]]) -> None:
        for table, batches in taken.items():
            self._buffers[table][:0] = batches

    # --- writing ------------------------------------------------------------------------------
    async def _write_task(self) -> None:
        """One write attempt of the buffered batches; a failure starts or continues an outage."""
        async with self._lock:
            taken = self._take()
            if not taken:
                return
            try:
                await self._write(taken)
            except asyncio.CancelledError:
                self._put_back(taken)
                raise
            except Exception as error:
                self._put_back(taken)
                self._on_write_failed(error)
                return
        if self._outage_since is not None:
            self._on_recovered()
        # Outside the lock: a commit may wait for a rebalance whose listener waits for the lock.
        await self._commit_kafka()

    async def _write(self, taken: dict[str, list[Batch]]) -> None:
        """Dead letters first, then rows + offsets in one transaction (the lock is held)."""
        await self._send_dead_letters(taken)
        try:
            try:
                committed_ns, inserted = await self._transaction(taken)
            except DATA_ERRORS as error:
                # A row the database refuses (mapping should have caught it): dead-letter it, go on.
                await self._reject_rows(taken, error)
                await self._send_dead_letters(taken)
                committed_ns, inserted = await self._transaction(taken)
        except DATA_ERRORS:
            raise
        except BaseException:
            await self._drop_connection()  # its state is unknown (e.g. cancelled mid-transaction)
            raise
        self._count_commit(taken, committed_ns, inserted)
        for batches in taken.values():
            for batch in batches:
                self._to_commit.update(batch.offsets)  # later batches hold later offsets

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            conn = await asyncpg.connect(database_url(self.settings), timeout=5, command_timeout=DB_TIMEOUT_S)
            try:
                for mapping in MAPPINGS.values():
                    await conn.execute(mapping.create_staging_sql)
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def _transaction(self, taken: dict[str, list[Batch]]) -> tuple[int, dict[str, int]]:
        conn = await self._connection()
        inserted: dict[str, int] = {}
        offsets: dict[TopicPartition, int] = {}
        async with conn.transaction():
            for table, batches in taken.items():
                for batch in batches:
                    offsets.update(batch.offsets)  # later batches hold later offsets
                rows = [row for batch in batches for row in batch.rows]
                if not rows:
                    continue
                mapping = batches[0].mapping
                await conn.copy_records_to_table(
                    mapping.staging_table, records=rows, columns=mapping.staging_columns, timeout=DB_TIMEOUT_S
                )
                status = await conn.execute(mapping.insert_sql, timeout=DB_TIMEOUT_S)
                inserted[table] = int(status.rsplit(" ", 1)[-1])
            tps = sorted(offsets, key=lambda tp: (tp.topic, tp.partition))
            await conn.execute(
                "INSERT INTO sink_offsets (group_id, topic, partition, next_offset, updated_at)"
                " SELECT $1, u.topic, u.partition, u.next_offset, now()"
                " FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(topic, partition, next_offset)"
                " ON CONFLICT (group_id, topic, partition) DO UPDATE"
                " SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset),"
                " updated_at = EXCLUDED.updated_at",
                self.group_id,
                [tp.topic for tp in tps],
                [tp.partition for tp in tps],
                [offsets[tp] for tp in tps],
                timeout=DB_TIMEOUT_S,
            )
        return time.time_ns(), inserted

    async def _reject_rows(self, taken: dict[str, list[Batch]], error: BaseException) -> None:
        """Probe each row in a savepoint (all rolled back) and turn the refused ones into dead letters."""
        self.log.warning("the database refused a batch (%s): looking for the rows at fault", _short(error))
        conn = await self._connection()
        found = 0
        tx = conn.transaction()
        await tx.start()
        try:
            for batches in taken.values():
                mapping = batches[0].mapping
                params = ", ".join(f"${i + 1}" for i in range(len(mapping.staging)))
                stage_sql = f'INSERT INTO "{mapping.staging_table}" VALUES ({params})'
                for batch in batches:
                    keep = []
                    for index, row in enumerate(batch.rows):
                        try:
                            async with conn.transaction():
                                await conn.execute(stage_sql, *row, timeout=DB_TIMEOUT_S)
                                await conn.execute(mapping.insert_sql, timeout=DB_TIMEOUT_S)
                                raise _ProbeDone
                        except _ProbeDone:
                            keep.append(index)
                        except DATA_ERRORS as refused:
                            value, topic, partition, offset = batch.sources[index]
                            reason = f"database refused the row: {_short(refused)}"
                            batch.dead.append(DeadLetter(value, reason, topic, partition, offset))
                            found += 1
                    if len(keep) != len(batch.rows):
                        batch.rows = [batch.rows[i] for i in keep]
                        batch.recv_ns = [batch.recv_ns[i] for i in keep]
                        batch.sources = [batch.sources[i] for i in keep]
        finally:
            await tx.rollback()
        self.counters["rejected_by_db"] += found
        if not found:
            raise error  # not a row's fault after all: retry as an outage

    async def _send_dead_letters(self, taken: dict[str, list[Batch]]) -> None:
        pending = [dead for batches in taken.values() for batch in batches for dead in batch.dead if not dead.sent]
        if not pending:
            return
        assert self._producer is not None
        futures = []
        for dead in pending:
            key, value = dead_letter(dead.value, dead.reason, dead.topic, dead.partition, dead.offset)
            futures.append(await self._producer.send(self.settings.topic_dlq, value=value, key=key))
        await asyncio.wait_for(asyncio.gather(*futures), DB_TIMEOUT_S)
        for dead in pending:
            dead.sent = True
        self.counters["dlq"] += len(pending)
        self.log.info("sent %d message(s) to %s; last reason: %s", len(pending), self.settings.topic_dlq,
                      pending[-1].reason)

    def _count_commit(self, taken: dict[str, list[Batch]], committed_ns: int, inserted: dict[str, int]) -> None:
        counters = self.counters
        counters["transactions"] += 1
        counters["last_commit_at"] = _now_iso()
        largest = 0
        for table, batches in taken.items():
            rows = sum(len(batch.rows) for batch in batches)
            counters["batches"][table] += len(batches)
            counters["rows_written"][table] += inserted.get(table, 0)
            counters["duplicates"][table] += rows - inserted.get(table, 0)
            for batch in batches:
                largest = max(largest, self.latency.add(committed_ns, batch.recv_ns))
        counters["last_batch_latency_ms"] = largest

    async def _commit_kafka(self, force: bool = False) -> None:
        """Commit the stored offsets to the group too, at most every KAFKA_COMMIT_INTERVAL_S.

        Best effort: the offsets in the database are the truth; these are for tools that read the
        group's offsets. (Each commit also makes the embedded broker rewrite its state file, hence the
        interval.)
        """
        consumer = self._consumer
        if consumer is None or not self._to_commit:
            return
        now = time.monotonic()
        if not force and now - self._kafka_committed_at < KAFKA_COMMIT_INTERVAL_S:
            return
        assigned = consumer.assignment()
        offsets = {tp: OffsetAndMetadata(offset, "") for tp, offset in self._to_commit.items() if tp in assigned}
        self._to_commit.clear()
        self._kafka_committed_at = now
        if not offsets:
            return
        try:
            await asyncio.wait_for(consumer.commit(offsets), 5)
        except Exception as error:
            self.counters["kafka_commit_errors"] += 1
            self.log.debug("Kafka commit failed (offsets are kept in the database): %s", _short(error))

    # --- outages ------------------------------------------------------------------------------
    def _on_write_failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self._outage_wall = _now_iso()
            self._attempts = 0
            self.counters["outages"] += 1
            self.log.warning("cannot write to the database, pausing consumption: %s", _short(error))
        self._attempts += 1
        delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(self._attempts - 1, 10))
        self._retry_at = now + delay
        self.counters["outage"] = {"since": self._outage_wall, "attempts": self._attempts, "error": _short(error)}
        self.log.info("write attempt %d failed (%s); next in %.1f s", self._attempts, _short(error), delay)
        self._set_paused(True)

    def _on_recovered(self) -> None:
        assert self._outage_since is not None
        seconds = time.monotonic() - self._outage_since
        self.log.warning("database writes work again after %.1f s and %d attempt(s)", seconds, self._attempts)
        self.counters["last_outage"] = {
            "since": self._outage_wall,
            "until": _now_iso(),
            "seconds": round(seconds, 1),
            "attempts": self._attempts,
            "error": (self.counters["outage"] or {}).get("error"),
        }
        self.counters["outage"] = None
        self._outage_since = None
        self._attempts = 0
        self._retry_at = 0.0
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        if paused:
            consumer.pause(*assigned)
        else:
            consumer.resume(*(assigned - self._unresolved))
        self._paused = paused
        self.counters["paused"] = paused

    # --- rebalancing --------------------------------------------------------------------------
    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Flush and commit before the partitions go; if that fails, forget what was buffered."""
        self._generation += 1
        if not revoked:
            return
        async with self._lock:
            taken = self._take(limit=None)
            if taken:
                try:
                    await asyncio.wait_for(self._write(taken), REVOKE_FLUSH_TIMEOUT_S)
                    self.log.info("flushed before giving up %d partition(s)", len(revoked))
                except Exception as error:
                    # Not committed, so whoever gets these partitions reads the messages again.
                    self.log.warning("could not flush before a rebalance (%s): dropping the buffer", _short(error))
                    consumer = self._consumer
                    kept = (consumer.assignment() if consumer else set()) - revoked
                    if kept:  # their positions are past the dropped messages: seek again
                        self._ready -= kept
                        self._unresolved |= kept
                        if consumer is not None:
                            consumer.pause(*kept)
            self._unresolved -= revoked
            self._ready -= revoked
            self.counters["assigned"] = []
        await self._commit_kafka(force=True)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.counters["assigned"] = sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)
        self._generation += 1
        if assigned and self._consumer is not None:
            # Before any await: the fetcher may already run from the broker's committed offsets.
            self._ready -= assigned
            self._consumer.pause(*assigned)
            await self._resolve(assigned)

    async def _stored_offsets(self, tps: set[TopicPartition]) -> dict[TopicPartition, int]:
        conn = await self._connection()
        rows = await conn.fetch(
            "SELECT topic, partition, next_offset FROM sink_offsets WHERE group_id = $1 AND topic = ANY($2::text[])",
            self.group_id,
            sorted({tp.topic for tp in tps}),
            timeout=5,
        )
        stored = {TopicPartition(row["topic"], row["partition"]): row["next_offset"] for row in rows}
        return {tp: offset for tp, offset in stored.items() if tp in tps}

    async def _resolve(self, tps: set[TopicPartition]) -> None:
        """Seek assigned partitions to the offsets stored with the rows (earliest when none)."""
        consumer = self._consumer
        assert consumer is not None
        tps = tps & consumer.assignment()
        if not tps:
            self._unresolved.clear()
            return
        try:
            async with self._lock:
                stored = await self._stored_offsets(tps)
                beginning = await consumer.beginning_offsets(list(tps))
                end = await consumer.end_offsets(list(tps))
                for tp in tps:
                    offset = stored.get(tp)
                    if offset is None:
                        self.log.info("%s:%d has no stored offset: starting at the earliest (%d)",
                                      tp.topic, tp.partition, beginning[tp])
                        offset = beginning[tp]
                    elif offset > end[tp]:
                        # The broker lost messages (e.g. crashed before saving): its offsets restart lower
                        # and will be reused, so the stored offset must come down with them.
                        self.log.warning("%s:%d stored offset %d is past the broker's end %d: resuming at %d",
                                         tp.topic, tp.partition, offset, end[tp], end[tp])
                        offset = end[tp]
                        await self._reset_stored_offset(tp, offset)
                    elif offset < beginning[tp]:
                        self.log.warning("%s:%d messages %d..%d were deleted by retention before being stored",
                                         tp.topic, tp.partition, offset, beginning[tp] - 1)
                        offset = beginning[tp]
                    consumer.seek(tp, offset)
        except Exception as error:
            if not isinstance(error, asyncpg.PostgresError):
                await self._drop_connection()
            self.log.warning("cannot read the stored offsets yet (%s): %d partition(s) wait", _short(error), len(tps))
            self._unresolved |= tps
            consumer.pause(*tps)
            self._resolve_at = time.monotonic() + RETRY_MIN_S * 4
            return
        self._unresolved -= tps
        self._ready |= tps
        if not self._paused:
            consumer.resume(*tps)
        else:
            consumer.pause(*tps)

    async def _reset_stored_offset(self, tp: TopicPartition, offset: int) -> None:
        conn = await self._connection()
        await conn.execute(
            "UPDATE sink_offsets SET next_offset = $4, updated_at = now()"
            " WHERE group_id = $1 AND topic = $2 AND partition = $3",
            self.group_id, tp.topic, tp.partition, offset, timeout=5,
        )
