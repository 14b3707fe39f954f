"""Producing to Kafka without ever blocking the stream or dropping a message.

`KafkaOutput.send()` hands a message to confluent-kafka's producer (librdkafka: batched, asynchronous,
acks=all, idempotent, so retries neither reorder nor duplicate). While the broker is unreachable messages
wait in the producer's queue, bounded by `ingest_buffer_messages` and never expiring. When that queue is
full, messages go to an append-only spill file instead, and so does everything after them, to keep the
order. When the broker is back and the queue has room again, the spill is sent, oldest first, and live
messages go straight to the producer again once it has caught up. A spill file left by an earlier run
is sent at start. At shutdown whatever the broker did not acknowledge in time is spilled too.

The spill is a directory of segments `ingest-<seq>.spill`, one JSON array `[topic, key, value, ts_ms]`
per line. A segment is deleted only once every message read from it was acknowledged, so a crash while
sending one repeats its messages (at least once; consumers drop duplicates by id) and loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

from confluent_kafka import KafkaError, KafkaException, Producer

__all__ = ["KafkaOutput", "LatencyHistogram", "SpillLocked", "SpillStore", "producer_config"]

log = logging.getLogger("cryptotui.stages.ingest")

SPILL_PREFIX = "ingest-"
SPILL_SUFFIX = ".spill"
LOCK_FILE = "ingest.lock"
#: The spill is sent when the producer queue is at most this full (the broker is taking messages again).
RESUME_FILL = 0.5
#: Lines read from the spill per step of the drain loop (between steps the event loop runs).
DRAIN_CHUNK = 2000
#: Acknowledged messages kept this long (seconds of acknowledgements) to send again if the broker turns out to
#: have lost them: an idempotent producer learns it from a sequence error after the broker restarted (the
#: embedded broker acknowledges writes while it shuts down and does not keep them).
RESEND_WINDOW_S = 5.0
_RETRY_CODES = {
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._FATAL,
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError._DESTROY,
}


# Fatal errors of an idempotent producer that mean the broker does not have messages it acknowledged.
_LOST_ACKED = {KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.UNKNOWN_PRODUCER_ID}


def producer_config(bootstrap: str, queue_messages: int, **extra: Any) -> dict[str, Any]:
    """The producer settings of the ingest stage (the benchmark's ceiling uses the same)."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": "cryptotui-ingest",
        "acks": "all",
        "enable.idempotence": True,  # no duplicates or reordering from retries
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "compression.type": "none",  # the broker is local; lz4 costs CPU for little gain on 200-byte values
        "queue.buffering.max.messages": queue_messages,
        "queue.buffering.max.kbytes": 1024 * 1024,
        "message.timeout.ms": 0,  # never expire: messages wait for the broker (spilled at shutdown)
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 2000,
        "socket.keepalive.enable": True,
        "log_level": 2,  # errors reach error_cb; a down broker would otherwise log a line per retry
    }
    config.update(extra)
    return config


class LatencyHistogram:
    """Log-scale buckets (about 6 % wide) of latencies in milliseconds, from 10 us to hours."""

    SCALE = 16.0  # buckets per e-fold

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_ms = 0.0

    def bucket(self, ms: float) -> int:
        return int(math.log(max(ms, 0.01) * 100.0) * self.SCALE)

    def add(self, ms: float) -> None:
        index = int(math.log((ms if ms > 0.01 else 0.01) * 100.0) * 16.0)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.total += 1
        if ms > self.max_ms:
            self.max_ms = ms

    @classmethod
    def upper_ms(cls, index: int) -> float:
        return math.exp((index + 1) / cls.SCALE) / 100.0

    @classmethod
    def mid_ms(cls, index: int) -> float:
        return math.exp((index + 0.5) / cls.SCALE) / 100.0

    @classmethod
    def quantile_of(cls, counts: dict[int, int], q: float) -> float | None:
        """The q-quantile (0..1) of bucket counts, as the geometric middle of its bucket."""
        total = sum(counts.values())
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index in sorted(counts):
            seen += counts[index]
            if seen >= rank:
                return round(cls.mid_ms(index), 3)
        return round(cls.mid_ms(max(counts)), 3)  # pragma: no cover

    def quantile(self, q: float) -> float | None:
        return self.quantile_of(self.counts, q)

    def snapshot(self) -> dict[str, int]:
        """JSON-friendly copy ({bucket index as text: count}); diff two snapshots for a time window."""
        return {str(index): count for index, count in sorted(self.counts.items())}


class SpillLocked(Exception):
    """Another ingest process uses this spill directory."""


class SpillStore:
    """Append-only spill segments in one directory, read back oldest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 - held for the stage's life
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SpillLocked(f"another ingest process uses the spill directory {directory}") from None
        self._writer: IO[str] | None = None
        self._writer_seq = 0
        self._reader: IO[bytes] | None = None
        self._reader_seq = 0
        self.written = 0  # records appended by this process
        self.read = 0  # records read back by this process
        self.corrupt = 0  # unreadable lines skipped (a crash cut the last line)
        self.segments_done: list[int] = []
        self.pending = sum(self._count_lines(path) for path in self._paths())
        self.recovered = self.pending  # records found at start (left by an earlier run)
        self._next_seq = max((self._seq(path) for path in self._paths()), default=0) + 1

    # --- files ----------------------------------------------------------------------------------------
    def _paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"{SPILL_PREFIX}*{SPILL_SUFFIX}"))

    @staticmethod
    def _seq(path: Path) -> int:
        return int(path.name[len(SPILL_PREFIX):-len(SPILL_SUFFIX)])

    def path(self, seq: int) -> Path:
        return self.directory / f"{SPILL_PREFIX}{seq:012d}{SPILL_SUFFIX}"

    @staticmethod
    def _count_lines(path: Path) -> int:
        count = 0
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                count += chunk.count(b"\n")
        return count

    @property
    def bytes(self) -> int:
        total = 0
        for path in self._paths():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    # --- writing --------------------------------------------------------------------------------------
    def append(self, topic: str, key: str | bytes | None, value: str | bytes, ts_ms: int) -> None:
        if self._writer is None:
            self._writer_seq = self._next_seq
            self._next_seq += 1
            self._writer = self.path(self._writer_seq).open("a", encoding="ascii")
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        # ASCII-only JSON: one line per record whatever the value holds, and exact on reading back.
        self._writer.write(json.dumps([topic, key, value, ts_ms]) + "\n")
        self.written += 1
        self.pending += 1

    def flush(self, sync: bool = False) -> None:
        if self._writer is not None:
            self._writer.flush()
            if sync:
                os.fsync(self._writer.fileno())

    def close_writer(self) -> None:
        """End the current segment; the next append starts a new one."""
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None

    # --- reading --------------------------------------------------------------------------------------
    def read_records(self, limit: int) -> tuple[int, list[tuple[str, str | None, str, int]]] | None:
        """Up to `limit` records of the oldest unread segment: (segment seq, records), or None when all
        is read. The segment being written is flushed first, so its records are readable."""
        self.flush()
        while True:
            if self._reader is None:
                candidates = [self._seq(p) for p in self._paths() if self._seq(p) > self._reader_seq]
                if not candidates:
                    return None
                self._reader_seq = min(candidates)
                self._reader = self.path(self._reader_seq).open("rb")
            records: list[tuple[str, str | None, str, int]] = []
            while len(records) < limit:
                position = self._reader.tell()
                line = self._reader.readline()
                if not line:
                    break
                if not line.endswith(b"\n"):
                    if self._reader_seq == self._writer_seq and self._writer is not None:
                        self._reader.seek(position)  # being written: read it next time
                        break
                    self._skip_corrupt(line)
                    continue
                try:
                    topic, key, value, ts_ms = json.loads(line)
                except (ValueError, TypeError):
                    self._skip_corrupt(line)
                    continue
                records.append((topic, key, value, ts_ms))
            self.read += len(records)
            self.pending = max(0, self.pending - len(records))
            if records:
                return self._reader_seq, records
            if self._reader_seq == self._writer_seq and self._writer is not None:
                return None  # caught up with the writer
            # The segment is read to its end.
            self._reader.close()
            self._reader = None
            self.segments_done.append(self._reader_seq)

    def _skip_corrupt(self, line: bytes) -> None:
        self.corrupt += 1
        self.pending = max(0, self.pending - 1)
        log.error("spill: skipping an unreadable line in %s: %r", self.path(self._reader_seq).name, line[:200])

    def caught_up(self) -> bool:
        """Everything written has been read (the writer's segment included)."""
        return self.pending == 0 and (self._writer is None or self._reader_seq == self._writer_seq)

    def finish_reading_writer_segment(self) -> None:
        """Caught up with the segment being written: end it, so it can be deleted once acknowledged."""
        if self._writer is not None and self._reader_seq == self._writer_seq:
            self.close_writer()
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self.segments_done.append(self._reader_seq)

    def delete(self, seq: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(seq).unlink()

    def close(self) -> None:
        self.close_writer()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
        self._lock.close()


class _Segment:
    __slots__ = ("outstanding", "read_done", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.outstanding = 0
        self.read_done = False


class KafkaOutput:
    """The producer, its bounded queue and the spill. `send()` never blocks and never raises."""

    def __init__(
        self,
        bootstrap: str,
        spill_dir: Path,
        capacity: int,
        on_failed: Callable[[str, str | None, str, str], None] | None = None,
        **config: Any,
    ) -> None:
        self.capacity = capacity
        self.spill = SpillStore(spill_dir)
        self._config = producer_config(bootstrap, capacity, on_delivery=self._on_delivery, error_cb=self._on_error,
                                       **config)
        self._producer = Producer(self._config)
        self._produce = self._producer.produce
        self._fatal: KafkaError | None = None
        self.restarts = 0  # producers replaced after a fatal error
        self.resent = 0  # acknowledged messages sent again because the broker lost them
        self._recent: deque[tuple[float, str, bytes | None, bytes, int]] = deque()
        self.broker_down = False
        self._on_failed = on_failed  # (topic, key, value, error): messages the broker rejected for good
        self.spilling = self.spill.pending > 0  # live messages go to the spill while it has older ones
        self.sent = 0  # handed to the producer (live and from the spill)
        self.acked = 0
        self.spilled = 0  # messages written to the spill (live, failed deliveries and at shutdown)
        self.respilled = 0  # of these, deliveries that failed and were spilled for another try
        self.failed = 0  # rejected by the broker for good (logged, DLQ'd when possible)
        self.last_error: str | None = None
        self.latency = LatencyHistogram()
        self._segments: dict[int, _Segment] = {}
        self._carry: tuple[int, list[tuple[str, str | None, str, int]]] | None = None
        self._since_poll = 0
        self._spill_dirty = False
        if self.spill.recovered:
            log.warning("spill: %d message(s) left by an earlier run in %s will be sent first",
                        self.spill.recovered, spill_dir)

    async def warm_up(self, timeout: float = 5.0) -> bool:
        """Connect to the broker and fetch the topics' metadata before messages arrive (the first second
        would otherwise fill the queue). False when the broker does not answer: messages then wait."""
        try:
            await asyncio.to_thread(self._producer.list_topics, None, timeout)
        except KafkaException as error:
            log.warning("kafka: the broker does not answer yet (%s): messages wait for it", error)
            return False
        return True

    # --- the hot path ---------------------------------------------------------------------------------
    def send(self, topic: str, value: str, key: str | None, ts_ms: int) -> None:
        """Queue one message (value: JSON text, key: symbol) for the broker, or spill it."""
        if self.spilling:
            self.spill.append(topic, key, value, ts_ms)
            self.spilled += 1
            self._spill_dirty = True
            return
        try:
            self._produce(topic, value, key, timestamp=ts_ms)
        except BufferError:
            log.warning("producer queue full (%d messages; is the broker down?): spilling to %s",
                        len(self._producer), self.spill.directory)
            self.spilling = True
            self.spill.append(topic, key, value, ts_ms)
            self.spilled += 1
            self._spill_dirty = True
            return
        except KafkaException as error:  # a fatal producer error, an unknown topic: keep it, never lose it
            self._produce_error(error)
            self.spilling = True
            self.spill.append(topic, key, value, ts_ms)
            self.spilled += 1
            self._spill_dirty = True
            return
        self.sent += 1
        self._since_poll += 1
        if self._since_poll >= 512:
            self.poll()

    def poll(self) -> None:
        """Serve delivery reports; call often (the stage does after every batch of messages). Never raises."""
        self._since_poll = 0
        try:
            self._producer.poll(0)
        except KafkaException as error:
            self._produce_error(error)
        if self._fatal is not None:
            self._replace_producer()
        recent = self._recent
        if len(recent) > self.capacity:
            for _ in range(len(recent) - self.capacity):
                recent.popleft()
        if recent:
            horizon = recent[-1][0] - RESEND_WINDOW_S * 1000.0
            while recent and recent[0][0] < horizon:
                recent.popleft()
        if self._spill_dirty:
            self._spill_dirty = False
            self.spill.flush()

    def _produce_error(self, error: KafkaException) -> None:
        kafka_error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else None
        if kafka_error is not None and (kafka_error.fatal() or kafka_error.code() == KafkaError._FATAL):
            self._fatal = self._fatal or kafka_error
        self._note_error(f"produce: {error}")

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's global errors: a down broker is normal here (messages wait), a fatal one is not."""
        if err.fatal():
            self._fatal = err
            self._note_error(f"fatal: {err.str()}")
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            if not self.broker_down:
                self.broker_down = True
                self.last_error = f"broker unreachable: {err.str()}"
                log.warning("kafka: the broker is unreachable (%s): messages wait in memory (up to %d), "
                            "then in the spill file", err.str(), self.capacity)
        elif err.code() != KafkaError._TRANSPORT:
            self._note_error(err.str())

    def _replace_producer(self) -> None:
        """After a fatal error (e.g. an idempotent producer whose broker lost its sequence state on a
        restart) the producer cannot send any more: spill what it holds, in order, and start a new one."""
        old = self._producer
        with contextlib.suppress(KafkaException):
            old.poll(0)  # error_cb names the underlying error (produce() only says "fatal")
        reason, self._fatal = self._fatal, None
        self.restarts += 1
        log.error("kafka: the producer failed for good (%s): replacing it; its %d unacknowledged message(s) "
                  "are spilled and sent again", reason.str() if reason else "?", len(old))
        self.spilling = True  # whatever arrives now must queue behind the purged messages
        if reason is not None and (reason.code() in _LOST_ACKED or "sequence" in reason.str().lower()):
            # The broker lost messages it had acknowledged: send the last acknowledged ones again.
            log.error("kafka: the broker lost acknowledged messages (%s): sending the last %d acknowledged "
                      "message(s) again", reason.name(), len(self._recent))
            for _, topic, key, value, ts_ms in self._recent:
                self.spill.append(topic, key, value, ts_ms)
            self.spilled += len(self._recent)
            self.resent += len(self._recent)
            self._spill_dirty = True
        self._recent.clear()
        with contextlib.suppress(KafkaException):
            old.purge(in_queue=True, in_flight=True, blocking=False)
        for _ in range(20):
            with contextlib.suppress(KafkaException):
                old.poll(0.01)
            if len(old) == 0:
                break
        if len(old):
            log.error("kafka: %d message(s) could not be taken back from the failed producer", len(old))
        self._producer = Producer(self._config)
        self._produce = self._producer.produce

    # --- delivery reports -----------------------------------------------------------------------------
    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            self.acked += 1
            if self.broker_down:
                self.broker_down = False
                log.warning("kafka: the broker acknowledges messages again (%d buffered, %d in the spill)",
                            len(self._producer), self.spill.pending)
            # The message timestamp is the receive time (ms, truncated); msg.latency() is the precise time
            # since produce(). Receive -> ack lies between the two bounds below; take the tighter estimate.
            now_ms = time.time() * 1000.0
            ts_ms = msg.timestamp()[1]
            self._recent.append((now_ms, msg.topic(), msg.key(), msg.value(), ts_ms))
            since_produce = msg.latency()
            estimate = now_ms - ts_ms - 0.5
            if since_produce is not None and since_produce * 1000.0 > estimate:
                estimate = since_produce * 1000.0
            self.latency.add(estimate)
            return
        self._delivery_failed(err, msg)

    def _delivery_failed(self, err: KafkaError, msg: Any) -> None:
        topic, key, value = msg.topic(), msg.key(), msg.value()
        ts_ms = msg.timestamp()[1]
        if err.code() in _RETRY_CODES or err.retriable():
            self.spill.append(topic, key, value, ts_ms)
            self.spilled += 1
            self.respilled += 1
            self._spill_dirty = True
            return
        self.failed += 1
        self._note_error(f"delivery to {topic}: {err.str()}")
        if self._on_failed is not None:
            with contextlib.suppress(Exception):
                self._on_failed(topic, key.decode() if isinstance(key, bytes) else key,
                                value.decode("utf-8", "replace") if isinstance(value, bytes) else value, err.str())

    def _spill_delivered(self, segment: _Segment, err: KafkaError | None, msg: Any) -> None:
        segment.outstanding -= 1
        if err is None:
            self._on_delivery(None, msg)
        else:
            self._delivery_failed(err, msg)
        if segment.read_done and segment.outstanding == 0:
            self._segment_finished(segment)

    def _segment_finished(self, segment: _Segment) -> None:
        self._segments.pop(segment.seq, None)
        self.spill.delete(segment.seq)
        log.info("spill: segment %d sent and acknowledged", segment.seq)

    def _note_error(self, text: str) -> None:
        if text != self.last_error:
            log.error("kafka: %s", text)
        self.last_error = text

    # --- background work ------------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Messages in the producer: waiting to be sent or for their acknowledgement."""
        return len(self._producer)

    async def run(self) -> None:
        """Serve delivery reports and send the spill back when the broker takes messages again."""
        while True:
            self.poll()
            if self._fatal is not None:
                self._replace_producer()
            busy = self.drain_step() if (self.spilling or self.spill.pending or self._carry) else False
            # Acknowledgements are seen when polled: every 2 ms while messages are in flight.
            await asyncio.sleep(0.001 if busy else 0.002 if len(self._producer) else 0.01)

    def drain_step(self) -> bool:
        """Move a chunk of the spill into the producer when it has room; True if there is more to do."""
        room = self.capacity - len(self._producer)
        if room < self.capacity * (1 - RESUME_FILL):
            return False
        while room > 0:
            chunk = self._carry or self.spill.read_records(min(DRAIN_CHUNK, room))
            self._carry = None
            if chunk is None:
                self._mark_read_segments()
                if self.spill.caught_up():
                    self.spill.finish_reading_writer_segment()
                    self._mark_read_segments()
                    if self.spilling:
                        self.spilling = False
                        log.info("spill: caught up, producing directly again")
                return False
            seq, records = chunk
            segment = self._segments.get(seq)
            if segment is None:
                segment = self._segments[seq] = _Segment(seq)
            report = partial(self._spill_delivered, segment)
            for index, (topic, key, value, ts_ms) in enumerate(records):
                try:
                    self._produce(topic, value, key, timestamp=ts_ms, on_delivery=report)
                except BufferError:
                    self._carry = (seq, records[index:])
                    return False
                except KafkaException as error:
                    self._produce_error(error)
                    self._carry = (seq, records[index:])
                    return False
                segment.outstanding += 1
                self.sent += 1
                room -= 1
            self._mark_read_segments()
        return True

    def _mark_read_segments(self) -> None:
        while self.spill.segments_done:
            seq = self.spill.segments_done.pop()
            segment = self._segments.get(seq)
            if segment is None:
                self.spill.delete(seq)  # empty or only corrupt lines
                continue
            segment.read_done = True
            if segment.outstanding == 0:
                self._segment_finished(segment)

    async def flush(self, timeout: float) -> None:
        """Wait up to `timeout` for every acknowledgement; spill whatever is still unacknowledged then."""
        deadline = time.monotonic() + timeout
        while len(self._producer) > 0 and time.monotonic() < deadline and self._fatal is None:
            self.poll()
            await asyncio.sleep(0.02)
        left = len(self._producer)
        if left:
            log.warning("kafka: %d message(s) not acknowledged after %.1f s: spilling them", left, timeout)
            with contextlib.suppress(KafkaException):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            for _ in range(50):
                with contextlib.suppress(KafkaException):
                    self._producer.poll(0.01)
                if len(self._producer) == 0:
                    break
        if self._carry is not None:
            self._carry = None  # still in its segment, which is kept: sent at the next start
        self.spill.flush(sync=True)
        if self.spill.pending:
            log.warning("spill: %d message(s) wait in %s for the next start", self.spill.pending,
                        self.spill.directory)

    def close(self) -> None:
        self.spill.close()

    def stats(self) -> dict[str, Any]:
        return {
            "buffered": self.buffered,
            "buffer_capacity": self.capacity,
            "spilling": self.spilling,
            "broker_down": self.broker_down,
            "spilled": self.spilled,
            "spill_pending": self.spill.pending + (len(self._carry[1]) if self._carry else 0),
            "spill_recovered": self.spill.recovered,
            "produced": self.sent,
            "acked": self.acked,
            "produce_failed": self.failed,
            "producer_restarts": self.restarts,
            "resent": self.resent,
        }
