"""Where an earlier ingest run stopped: the newest trade and aggTrade id per symbol already in Kafka.

A restarted stage (SIGKILL, crash, supervisor restart) would otherwise start its id sequences from
nothing, and the trades Binance sent while it was down would never be seen as a gap. Before the first
live message the stage reads the tail of every partition of the trade and aggTrade topics (messages are
keyed by symbol; several symbols may share a partition), at most `RESUME_SCAN` messages per partition,
and takes per symbol the highest id found (`t`, `a`): the first live id after it then reveals the gap,
which the usual backfill fills from REST.

The newest id *in Kafka* is the right starting point even after a SIGKILL: whatever the killed process
had not got acknowledged is above it, so it becomes part of the gap instead of being lost.

The work is bounded: `RESUME_SCAN` messages per partition and `RESUME_TIMEOUT_S` seconds in all (a
blocking client in a thread, every call with the time left). A partition not read to its end in time is
not used; a symbol not found in the window is not resumed (logged, counted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

__all__ = ["ID_FIELDS", "RESUME_SCAN", "RESUME_TIMEOUT_S", "ResumeScan", "scan_last_ids"]

log = logging.getLogger("cryptotui.stages.ingest")

#: Messages read at most from the end of each partition (a Settings field would be
#: `ingest_resume_scan`; config.py belongs to another part of the project).
RESUME_SCAN = 20_000
#: Longest the scan may hold up the start; after that the stage goes on without what was not read.
RESUME_TIMEOUT_S = 15.0
#: The consecutive id of each resumable stream type (bookTicker ids are not consecutive: nothing to resume).
ID_FIELDS = {"trade": "t", "aggTrade": "a"}
_BATCH = 5000


@dataclass
class ResumeScan:
    """What the scan found: {(kind, symbol): newest id}, and how the scan went."""

    last_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    partitions: int = 0  # partitions with messages in the window
    partitions_read: int = 0  # of these, read to their end
    messages: int = 0  # messages read
    seconds: float = 0.0
    error: str | None = None  # why the scan did not finish (its complete partitions are still used)


def _topic_partitions(consumer: Consumer, topic: str, timeout: float) -> list[int]:
    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        reason = metadata.error.str() if metadata is not None and metadata.error is not None else "unknown"
        log.info("resume: topic %s not readable (%s): nothing to resume from it", topic, reason)
        return []
    return sorted(metadata.partitions)


def scan_last_ids(
    bootstrap: str,
    topics: Mapping[str, str],
    symbols: Iterable[str],
    scan: int = RESUME_SCAN,
    timeout: float = RESUME_TIMEOUT_S,
    stop: threading.Event | None = None,
) -> ResumeScan:
    """The newest id per (kind, symbol) in the last `scan` messages of each partition of `topics`
    ({kind: topic}, kinds of `ID_FIELDS` only). Blocking; never longer than about `timeout` seconds;
    never raises for Kafka trouble (`error` says what went wrong). `stop` ends it early."""
    started = time.monotonic()
    deadline = started + timeout
    result = ResumeScan()
    wanted = set(symbols)
    kinds = {topic: kind for kind, topic in topics.items() if kind in ID_FIELDS}

    def left() -> float:
        if stop is not None and stop.is_set():
            raise _Stopped("stopped")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Stopped(f"timed out after {timeout:g} s")
        return remaining

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"cryptotui-ingest-resume-{uuid.uuid4().hex[:8]}",  # assign() only: never joins or commits
        "client.id": "cryptotui-ingest-resume",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",  # a start offset deleted meanwhile by retention
        "socket.timeout.ms": max(1000, int(timeout * 1000)),
        "log_level": 2,
    })
    found: dict[tuple[str, int], dict[str, int]] = {}  # (topic, partition) -> {symbol: newest id}
    pending: dict[tuple[str, int], int] = {}  # (topic, partition) -> end offset, until read to it
    try:
        assignment = []
        for topic in kinds:
            for partition in _topic_partitions(consumer, topic, left()):
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=left())
                if high <= low:
                    continue
                start = max(low, high - scan)
                assignment.append(TopicPartition(topic, partition, start))
                pending[(topic, partition)] = high
                found[(topic, partition)] = {}
        result.partitions = len(pending)
        if assignment:
            consumer.assign(assignment)
        while pending:
            for message in consumer.consume(_BATCH, min(left(), 0.5)):
                topic, partition = message.topic(), message.partition()
                place = (topic, partition)
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.pop(place, None)
                    elif error.code() != KafkaError._TRANSPORT:
                        log.warning("resume: reading %s [%d]: %s", topic, partition, error.str())
                    continue
                if place not in pending:
                    continue
                result.messages += 1
                _take(message.key(), message.value(), ID_FIELDS[kinds[topic]], wanted, found[place])
                if message.offset() + 1 >= pending[place]:
                    pending.pop(place)
    except _Stopped as stopped:
        result.error = str(stopped)
    except KafkaException as error:
        result.error = f"kafka: {error}"
    finally:
        with contextlib.suppress(KafkaException, RuntimeError):
            consumer.close()
    # Only partitions read to their end count: a partly read one could name an id that is not the newest.
    for place, newest in found.items():
        if place in pending:
            continue
        result.partitions_read += 1
        kind = kinds[place[0]]
        for symbol, last in newest.items():
            if last > result.last_ids.get((kind, symbol), -1):
                result.last_ids[(kind, symbol)] = last
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _take(key: bytes | None, value: bytes | None, id_field: str, wanted: set[str], newest: dict[str, int]) -> None:
    """Note the id of one message (key = symbol, value = the event as JSON); anything else is skipped."""
    if key is None or value is None:
        return
    try:
        symbol = key.decode()
        data = json.loads(value)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return
    if symbol not in wanted or type(data) is not dict:
        return
    i = data.get(id_field)
    if type(i) is int and i > newest.get(symbol, -1):
        newest[symbol] = i


class _Stopped(Exception):
    pass
