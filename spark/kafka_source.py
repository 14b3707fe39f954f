"""Kafka as a Spark streaming source, built on Spark 4's Python Data Source API.

Spark's own Kafka connector (spark-sql-kafka-0-10) is a Maven artifact and often not on the classpath;
this source gives the same columns (`key`, `value`, `topic`, `partition`, `offset`, `timestamp`,
`timestampType`) with the synchronous confluent-kafka client, so the job reads `kafka` or
`cryptotui_kafka` the same way.

- Offsets are `{"topic": {"partition": next offset}}` (JSON keys are strings); Spark keeps them in the
  checkpoint's offset log, so a restarted query resumes exactly where the last committed batch ended.
- `Trigger.AvailableNow` is supported (`SupportsTriggerAvailableNow`): the latest offsets at start are the
  target, later data waits for the next run.
- `maxOffsetsPerTrigger` (alias `maxRowsPerTrigger`) caps the rows of a micro-batch, shared between the
  partitions in proportion to their backlog: capping evenly would let a partition with a short backlog
  run ahead in event time, and the watermark would then drop the other partitions' rows as late.
- Tasks yield Arrow RecordBatches (several times faster than tuples).

This module must not import cryptotui: it is shipped to executors, which only need pyspark, pyarrow and
confluent-kafka.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)

log = logging.getLogger(__name__)

FORMAT = "cryptotui_kafka"
# The columns of Spark's built-in `kafka` source (without the optional `headers`).
SCHEMA = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp, timestampType int"

# {"topic": {"partition": offset}}: the offset of the next record to read, per topic-partition.
Offsets = dict[str, dict[str, int]]

ROWS_PER_ARROW_BATCH = 20_000
DEFAULT_ROWS_PER_TASK = 250_000
METADATA_TIMEOUT_S = 10.0
# A task fails (and Spark retries it) when no record arrives for this long while some are missing.
READ_STALL_TIMEOUT_S = 60.0


# --- offset arithmetic (pure, unit-tested without Spark) -------------------------------------------
def normalize(offsets: Mapping[str, Mapping[Any, Any]]) -> Offsets:
    """Offsets with string partition keys and int values, topics and partitions sorted."""
    return {
        topic: {str(p): int(o) for p, o in sorted(parts.items(), key=lambda item: int(item[0]))}
        for topic, parts in sorted(offsets.items())
    }


def backlog(start: Offsets, latest: Offsets) -> dict[tuple[str, str], int]:
    """Records between start and latest per (topic, partition); a partition new since start begins at 0."""
    return {
        (topic, part): max(0, end - start.get(topic, {}).get(part, 0))
        for topic, parts in latest.items()
        for part, end in parts.items()
    }


def offsets_behind(end: Offsets, latest: Offsets) -> int:
    """How many records lie between `end` and `latest`, over all partitions."""
    return sum(backlog(end, latest).values())


def cap_offsets(start: Offsets, latest: Offsets, max_rows: int) -> Offsets:
    """End offsets reading at most `max_rows` records, shared in proportion to each partition's backlog.

    Largest-remainder apportionment: every partition gets floor(max_rows * backlog / total), and the rows
    left over go to the largest fractional parts (ties in topic/partition order), so the sum is exactly
    `max_rows` and partitions advance through event time at the same pace. Partitions present in `start`
    but not in `latest` keep their offsets.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    pending = backlog(start, latest)
    total = sum(pending.values())
    end: Offsets = {topic: dict(parts) for topic, parts in start.items()}
    if total <= max_rows:
        for (topic, part), rows in pending.items():
            end.setdefault(topic, {})[part] = start.get(topic, {}).get(part, 0) + rows
        return normalize(end)
    shares: dict[tuple[str, str], int] = {}
    remainders: list[tuple[int, tuple[str, str]]] = []
    for key, rows in sorted(pending.items(), key=lambda item: (item[0][0], int(item[0][1]))):
        share, remainder = divmod(max_rows * rows, total)
        shares[key] = share
        remainders.append((remainder, key))
    left = max_rows - sum(shares.values())
    # Stable sort: equal remainders keep topic/partition order.
    for _, key in sorted(remainders, key=lambda item: -item[0])[:left]:
        shares[key] += 1
    for (topic, part), share in shares.items():
        end.setdefault(topic, {})[part] = start.get(topic, {}).get(part, 0) + share
    return normalize(end)


def clamp(latest: Offsets, target: Offsets) -> Offsets:
    """`latest` limited to `target` (Trigger.AvailableNow); partitions unknown to the target are left out."""
    return normalize(
        {
            topic: {part: min(offset, target[topic][part]) for part, offset in parts.items() if part in target[topic]}
            for topic, parts in latest.items()
            if topic in target
        }
    )


@dataclass(frozen=True)
class KafkaRange:
    """One Spark task: records [start, end) of one topic-partition."""

    topic: str
    partition: int
    start: int
    end: int


def plan_ranges(start: Offsets, end: Offsets, rows_per_task: int) -> list[KafkaRange]:
    """The non-empty ranges between start and end, split so no task reads more than rows_per_task."""
    ranges = []
    for topic, parts in sorted(end.items()):
        for part, stop in sorted(parts.items(), key=lambda item: int(item[0])):
            begin = start.get(topic, {}).get(part, 0)
            while begin < stop:
                upto = min(stop, begin + rows_per_task)
                ranges.append(KafkaRange(topic, int(part), begin, upto))
                begin = upto
    return ranges


def parse_starting_offsets(text: str) -> str | Offsets:
    """`earliest`, `latest` or a JSON object {"topic": {"partition": offset}} (-2 earliest, -1 latest)."""
    value = text.strip()
    if value in ("earliest", "latest"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        raise ValueError(f"startingOffsets must be earliest, latest or a JSON object, got {text!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError("startingOffsets JSON must be an object {topic: {partition: offset}}")
    return normalize(parsed)


# --- the data source ------------------------------------------------------------------------------
class KafkaInputPartition(InputPartition):
    def __init__(self, value: KafkaRange) -> None:
        super().__init__(value)


def consumer_config(options: Mapping[str, str]) -> dict[str, Any]:
    """The confluent-kafka configuration: `kafka.*` options without their prefix, plus fixed settings."""
    config: dict[str, Any] = {
        key[len("kafka.") :]: value for key, value in options.items() if key.lower().startswith("kafka.")
    }
    if "bootstrap.servers" not in config:
        raise ValueError("option kafka.bootstrap.servers is required")
    # noida-db (the embedded broker) ignores the fetch size limits and answers a fetch with the whole rest
    # of the partition: accept responses of any size instead of failing on them forever.
    config.setdefault("receive.message.max.bytes", 2_147_483_647)
    config.update(
        {
            # Offsets live in Spark's checkpoint: the group is only a name the client requires.
            "group.id": config.get("group.id", "cryptotui-spark-reader"),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    return config


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Plans micro-batches on the driver and reads them on the executors."""

    def __init__(self, options: Mapping[str, str]) -> None:
        self.options = {str(k): str(v) for k, v in options.items()}
        lowered = {k.lower(): v for k, v in self.options.items()}
        topics = lowered.get("subscribe", "")
        self.topics = sorted({topic.strip() for topic in topics.split(",") if topic.strip()})
        if not self.topics:
            raise ValueError("option subscribe (comma-separated topics) is required")
        self.config = consumer_config(self.options)
        self.starting = parse_starting_offsets(lowered.get("startingoffsets", "earliest"))
        limit = lowered.get("maxoffsetspertrigger") or lowered.get("maxrowspertrigger")
        self.max_rows = int(limit) if limit else None
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError("maxOffsetsPerTrigger must be at least 1")
        self.rows_per_task = int(lowered.get("rowspertask", DEFAULT_ROWS_PER_TASK))
        self.target: Offsets | None = None
        self.latest: Offsets | None = None
        self._consumer: Any = None

    # The planner keeps one metadata consumer; executors get the reader without it.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_consumer"] = None
        return state

    def _metadata_consumer(self) -> Any:
        if self._consumer is None:
            from confluent_kafka import Consumer

            self._consumer = Consumer(self.config)
        return self._consumer

    def _watermarks(self) -> dict[str, dict[str, tuple[int, int]]]:
        """(low, high) per partition of every subscribed topic that exists."""
        from confluent_kafka import KafkaException, TopicPartition

        consumer = self._metadata_consumer()
        result: dict[str, dict[str, tuple[int, int]]] = {}
        for topic in self.topics:
            metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S).topics.get(topic)
            if metadata is None or metadata.error is not None or not metadata.partitions:
                log.warning("topic %s does not exist (yet): nothing to read from it", topic)
                continue
            parts = {}
            for part in sorted(metadata.partitions):
                try:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, part), timeout=METADATA_TIMEOUT_S, cached=False
                    )
                except KafkaException as error:
                    raise RuntimeError(f"cannot read offsets of {topic}[{part}]: {error}") from error
                parts[str(part)] = (low, high)
            result[topic] = parts
        return result

    def _available(self) -> Offsets:
        return normalize({t: {p: high for p, (_, high) in parts.items()} for t, parts in self._watermarks().items()})

    def initialOffset(self) -> dict:
        watermarks = self._watermarks()
        if isinstance(self.starting, dict):
            given = self.starting
            offsets = {}
            for topic, parts in watermarks.items():
                offsets[topic] = {}
                for part, (low, high) in parts.items():
                    wanted = given.get(topic, {}).get(part, -2)
                    offsets[topic][part] = low if wanted == -2 else high if wanted == -1 else wanted
            return normalize(offsets)
        pick = 0 if self.starting == "earliest" else 1
        return normalize({t: {p: marks[pick] for p, marks in parts.items()} for t, parts in watermarks.items()})

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.max_rows) if self.max_rows else ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        self.target = self._available()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        start_offsets = normalize(start)
        latest = self._available()
        self.latest = latest
        if self.target is not None:
            latest = clamp(latest, self.target)
        # Never go backwards (a partition re-created with fewer records): keep the start offsets.
        for topic, parts in start_offsets.items():
            for part, offset in parts.items():
                if latest.get(topic, {}).get(part, offset) < offset:
                    log.warning("%s[%s] end offset went back below %d: records lost?", topic, part, offset)
                    latest.setdefault(topic, {})[part] = offset
        if isinstance(limit, ReadMaxRows):
            return cap_offsets(start_offsets, latest, limit.max_rows)
        end = {topic: dict(parts) for topic, parts in start_offsets.items()}
        for topic, parts in latest.items():
            end.setdefault(topic, {}).update(parts)
        return normalize(end)

    def reportLatestOffset(self) -> dict | None:
        return self.latest

    def partitions(self, start: dict, end: dict) -> Sequence[InputPartition]:
        ranges = plan_ranges(normalize(start), normalize(end), self.rows_per_task)
        return [KafkaInputPartition(value) for value in ranges]

    def read(self, partition: InputPartition) -> Iterator[Any]:
        value: KafkaRange = partition.value
        yield from read_range(self.config, value)

    def commit(self, end: dict) -> None:
        """Offsets are committed by Spark's checkpoint; nothing to do in Kafka."""

    def stop(self) -> None:
        if self._consumer is not None:
            close_quietly(self._consumer)
            self._consumer = None


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.binary()),
            ("value", pa.binary()),
            ("topic", pa.string()),
            ("partition", pa.int32()),
            ("offset", pa.int64()),
            ("timestamp", pa.timestamp("us", tz="UTC")),
            ("timestampType", pa.int32()),
        ]
    )


def read_range(
    config: Mapping[str, Any], value: KafkaRange, rows_per_batch: int = ROWS_PER_ARROW_BATCH
) -> Iterator[Any]:
    """The records [start, end) of one topic-partition as Arrow RecordBatches in the source's schema."""
    import pyarrow as pa
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    schema = _arrow_schema()
    consumer = Consumer(dict(config))
    try:
        consumer.assign([TopicPartition(value.topic, value.partition, value.start)])
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        offsets: list[int] = []
        stamps: list[int] = []
        kinds: list[int] = []
        position = value.start
        last_progress = time.monotonic()

        def flush() -> Any:
            count = len(offsets)
            batch = pa.RecordBatch.from_arrays(
                [
                    pa.array(keys, pa.binary()),
                    pa.array(values, pa.binary()),
                    pa.array([value.topic] * count, pa.string()),
                    pa.array([value.partition] * count, pa.int32()),
                    pa.array(offsets, pa.int64()),
                    pa.array([ms * 1000 for ms in stamps], pa.timestamp("us", tz="UTC")),
                    pa.array(kinds, pa.int32()),
                ],
                schema=schema,
            )
            keys.clear()
            values.clear()
            offsets.clear()
            stamps.clear()
            kinds.clear()
            return batch

        while position < value.end:
            # Ask for exactly what is missing: consume() returns as soon as that many arrived.
            wanted = min(rows_per_batch, value.end - position)
            messages = consumer.consume(wanted, 1.0)
            reached_end = False
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # Fewer records than offsets (compaction, transaction markers, truncation).
                        reached_end = True
                        break
                    if error.fatal():
                        raise KafkaException(error)
                    # Transient (a broker reconnecting, the group coordinator we do not use): the client
                    # retries; the stall timeout below fails the task if records stop coming.
                    log.debug("%s[%d]: %s", value.topic, value.partition, error)
                    continue
                offset = message.offset()
                if offset >= value.end:
                    reached_end = True
                    break
                kind, stamp = message.timestamp()
                keys.append(message.key())
                values.append(message.value())
                offsets.append(offset)
                stamps.append(stamp if stamp >= 0 else 0)
                kinds.append(max(kind - 1, 0))  # librdkafka 1=create, 2=log-append; Kafka 0 and 1
                position = offset + 1
                last_progress = time.monotonic()
            if len(offsets) >= rows_per_batch:
                yield flush()
            if reached_end:
                break
            if not messages and time.monotonic() - last_progress > READ_STALL_TIMEOUT_S:
                raise TimeoutError(
                    f"no record from {value.topic}[{value.partition}] for {READ_STALL_TIMEOUT_S:.0f} s "
                    f"at offset {position} (reading up to {value.end})"
                )
        if offsets:
            yield flush()
    finally:
        close_quietly(consumer)


def close_quietly(consumer: Any) -> None:
    """Close a consumer; some brokers answer the group-coordinator lookup of close() with an error
    (noida-db: "FindCoordinator response error"), which must not fail a task that read its records."""
    from confluent_kafka import KafkaException

    try:
        consumer.close()
    except (KafkaException, RuntimeError) as error:
        log.debug("closing the consumer: %s", error)


class KafkaDataSource(DataSource):
    """`spark.readStream.format("cryptotui_kafka")` with the Kafka connector's option names."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: Any) -> DataSourceStreamReader:
        return KafkaStreamReader(self.options)
