"""The ingest stage: Binance combined streams -> checked, stamped messages in Kafka.

Per message: parse once, check (`validate`), drop duplicates and find gaps by id (`gaps`), splice the
receive time into the original JSON text of `data` and hand it to the producer (`producer`), keyed by
symbol, on its stream type's topic. Bad input goes to the DLQ topic with its reason. Connections are kept
by `connection`, gaps backfilled by `backfill`. Before the first live message, the trade and aggTrade id
sequences continue from the newest ids already in Kafka (`resume`), so what a restart missed is a gap too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

from cryptotui.config import Settings
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.base import Stage
from cryptotui.stages.ingest.backfill import Backfiller, BackfillJob
from cryptotui.stages.ingest.connection import AttemptLimiter, StreamGroup, WebSocketClient, split_streams
from cryptotui.stages.ingest.gaps import GapBook, IdSequence, RecentIds
from cryptotui.stages.ingest.producer import KafkaOutput
from cryptotui.stages.ingest.resume import ID_FIELDS, RESUME_SCAN, RESUME_TIMEOUT_S, ResumeScan, scan_last_ids
from cryptotui.stages.ingest.validate import CHECKS, Invalid, scan_value, top_level_spans

__all__ = ["IngestStage", "StreamInfo"]

log = logging.getLogger("cryptotui.stages.ingest")

# The exact prefix Binance sends; anything else takes the general (slower, equally exact) path.
_COMBINED = re.compile(r'\{"stream":"([^"\\]*)","data":').match
#: Largest message produced; larger ones go to the DLQ (Kafka's default message limit is 1 MB).
MAX_VALUE_CHARS = 512 * 1024
#: Largest `raw` text kept in a DLQ message (the reason says when it was cut).
MAX_DLQ_RAW = 256 * 1024
GAP_CHECK_S = 0.25
FLUSH_BUDGET_S = 4.5
_UNSET = object()


class StreamInfo:
    """One subscribed stream: where its messages go and what was seen on it."""

    __slots__ = ("check", "count", "kind", "last_count", "name", "seq", "symbol", "topic")

    def __init__(self, name: str, kind: str, symbol: str, topic: str, seq: IdSequence | RecentIds) -> None:
        self.name = name
        self.kind = kind
        self.symbol = symbol
        self.topic = topic
        self.check: Callable[[dict[str, Any], str], int] = CHECKS[kind]
        self.seq = seq
        self.count = 0
        self.last_count = 0


def _bare_stream(data: dict[str, Any]) -> str | None:
    """The stream name of an event sent without the combined wrapper, when it can be told."""
    symbol = data.get("s")
    if type(symbol) is not str:
        return None
    event = data.get("e")
    if event in ("trade", "aggTrade", "bookTicker"):
        return f"{symbol.lower()}@{event}"
    if event is None and "u" in data and "b" in data and "a" in data:
        return f"{symbol.lower()}@bookTicker"
    return None


class IngestStage(Stage):
    """`cryptotui stage run ingest`."""

    name: ClassVar[str] = "ingest"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gaps = GapBook()
        self.streams: dict[str, StreamInfo] = {}
        self._by_key: dict[tuple[str, str], StreamInfo] = {}
        for symbol in settings.symbols:
            for kind in settings.streams:
                name = f"{symbol.lower()}@{kind}"
                seq: IdSequence | RecentIds = (
                    RecentIds(kind, symbol) if kind == "bookTicker" else IdSequence(kind, symbol, self.gaps)
                )
                info = StreamInfo(name, kind, symbol, settings.market_topics[kind], seq)
                self.streams[name] = info
                self._by_key[(kind, symbol)] = info
        self.groups: list[StreamGroup] = []
        self.out: KafkaOutput | None = None
        self.backfiller: Backfiller | None = None
        self.received = 0
        self.produced = 0
        self.duplicates = 0
        self.dlq = 0
        self.dlq_reasons: Counter[str] = Counter()
        self.server_shutdowns = 0
        self.server_errors = 0
        self.id_resets = 0
        self.internal_errors = 0
        self.last_recv_ns = 0
        self._last_status_at = time.monotonic()
        self._last_received = 0
        self._last_latency: dict[int, int] = {}
        self._dlq_topic = settings.topic_dlq
        self._given_up_logs = 0
        self.resumed_sequences = 0
        self.resume: ResumeScan | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    async def setup(self) -> None:
        settings = self.settings
        self.out = KafkaOutput(bootstrap_servers(settings), settings.paths.spill, settings.ingest_buffer_messages,
                               on_failed=self._produce_failed)
        await self.out.warm_up()
        if settings.backfill:
            self.backfiller = Backfiller(settings.binance_rest_url, self._deliver_backfill, self._give_up,
                                         self._missing)
        limiter = AttemptLimiter()
        names = list(self.streams)
        for index, streams in enumerate(split_streams(names)):
            self.groups.append(StreamGroup(
                index, settings.binance_ws_url, streams, self._on_messages, self._on_invalid,
                watchdog_s=settings.watchdog_s, lifetime_s=settings.connection_lifetime_s, limiter=limiter,
            ))
        log.info("ingest: %d streams over %d connection(s) from %s", len(names), len(self.groups),
                 settings.binance_ws_url)
        self._refresh_counters()

    async def run(self) -> None:
        assert self.out is not None
        # Here rather than in setup(): a SIGTERM cancels it. And before the producer runs, so a spill left by
        # the earlier run is not in Kafka yet: the newest id there is below everything possibly lost.
        await self._resume()
        tasks = [asyncio.create_task(self.out.run(), name="ingest-producer"),
                 asyncio.create_task(self._watch_gaps(), name="ingest-gaps")]
        tasks += [asyncio.create_task(group.run(), name=f"ingest-ws{group.index}") for group in self.groups]
        if self.backfiller is not None:
            tasks.append(asyncio.create_task(self.backfiller.run(), name="ingest-backfill"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a task only ends by failing
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def flush(self) -> None:
        if self.backfiller is not None:
            self.backfiller.abandon("the stage stopped before backfilling it")
        unfilled = [gap for gap in self.gaps.pending + self.gaps.open if gap.remaining > 0]
        if unfilled:
            log.warning("stopping with %d gap(s) not backfilled (%d ids), e.g. %s", len(unfilled),
                        sum(gap.remaining for gap in unfilled), "; ".join(gap.describe() for gap in unfilled[:5]))
        if self.out is not None:
            await self.out.flush(FLUSH_BUDGET_S)
        self._refresh_counters()

    async def close(self) -> None:
        if self.out is not None:
            self.out.close()

    # --- restart --------------------------------------------------------------------------------------
    async def _resume(self) -> None:
        """Continue each trade/aggTrade id sequence after the newest id already in Kafka (an earlier run's)."""
        sequences = {key: info.seq for key, info in self._by_key.items()
                     if key[0] in ID_FIELDS and isinstance(info.seq, IdSequence)}
        if not sequences:
            return
        settings = self.settings
        topics = {kind: settings.market_topics[kind] for kind, _ in sequences}
        stop = threading.Event()
        try:
            scan = await asyncio.wait_for(
                asyncio.to_thread(scan_last_ids, bootstrap_servers(settings), topics, settings.symbols,
                                  RESUME_SCAN, RESUME_TIMEOUT_S, stop),
                RESUME_TIMEOUT_S + 5.0)
        except TimeoutError:
            scan = ResumeScan(error=f"timed out after {RESUME_TIMEOUT_S + 5.0:g} s", seconds=RESUME_TIMEOUT_S + 5.0)
        except Exception as error:  # never keep the stage from starting
            log.exception("resume: reading the last ids from Kafka failed")
            scan = ResumeScan(error=f"{type(error).__name__}: {error}")
        finally:
            stop.set()  # ends the thread if it still runs (a timeout, a cancellation)
        self.resume = scan
        resumed, absent = [], []
        for (kind, symbol), seq in sequences.items():
            last = scan.last_ids.get((kind, symbol))
            if last is None:
                absent.append(f"{symbol} {kind}")
                continue
            seq.resume(last)
            resumed.append(f"{symbol} {kind} after {last}")
        self.resumed_sequences = len(resumed)
        log.info("resume: %d of %d id sequence(s) continue from Kafka (%d message(s) of %d/%d partition(s) read "
                 "in %.1f s)%s%s", len(resumed), len(sequences), scan.messages, scan.partitions_read,
                 scan.partitions, scan.seconds, ": " if resumed else "", ", ".join(resumed))
        if scan.error:
            log.warning("resume: reading Kafka did not finish (%s): going on without it for %d id sequence(s); "
                        "what they missed while the stage was down is not detected, so not backfilled: %s",
                        scan.error, len(absent), ", ".join(absent) or "none")
        elif absent:
            log.info("resume: no id in the last %d message(s) per partition for %s: starting from their first "
                     "live id (new topic or symbol?)", RESUME_SCAN, ", ".join(absent))
        self._refresh_counters()

    # --- messages -------------------------------------------------------------------------------------
    def _on_messages(self, conn: WebSocketClient, texts: list[str], recv_ns: int) -> None:
        """Every message of one socket read (all received at `recv_ns`): the hot path."""
        out = self.out
        assert out is not None
        self.received += len(texts)
        self.last_recv_ns = recv_ns
        suffix = f',"recv_ns":{recv_ns}}}'
        ts_ms = recv_ns // 1_000_000
        match = _COMBINED
        streams = self.streams
        scan = scan_value
        send = out.send
        produced = 0
        for text in texts:
            try:
                m = match(text)
                if m is not None and len(text) < MAX_VALUE_CHARS:
                    info = streams.get(m.group(1))
                    if info is not None:
                        start = m.end()
                        try:
                            data, end = scan(text, start)
                        except (StopIteration, ValueError, RecursionError):
                            data, end = None, 0
                        if end == len(text) - 1 and text[end] == "}" and type(data) is dict:
                            try:
                                i = info.check(data, info.symbol)
                            except Invalid as bad:
                                self._reject(text, bad.reason, recv_ns, info.symbol)
                                continue
                            if info.seq.accept(i) or self._odd_id(info, i):
                                if "recv_ns" in data:
                                    value = json.dumps({**data, "recv_ns": recv_ns}, separators=(",", ":"))
                                else:
                                    value = text[start:end - 1] + suffix
                                send(info.topic, value, info.symbol, ts_ms)
                                info.count += 1
                                produced += 1
                            continue
                self._general(conn, text, recv_ns)
            except Exception as error:  # a bug must not stop the stream: keep the message, log the bug
                self._internal_error(text, recv_ns, error)
        self.produced += produced
        out.poll()

    def _general(self, conn: WebSocketClient, text: str, recv_ns: int) -> None:
        """Everything the fast path does not take: other layouts, bare events, control messages, junk."""
        if len(text) >= MAX_VALUE_CHARS:
            self._reject(text, f"too_large: {len(text)} characters", recv_ns, None)
            return
        try:
            spans = top_level_spans(text)
        except Invalid as bad:
            self._reject(text, bad.reason, recv_ns, None)
            return
        if "stream" in spans and "data" in spans:
            stream = spans["stream"][0]
            data, start, end = spans["data"]
            if type(data) is dict and data.get("e") == "serverShutdown":
                self._server_shutdown(conn, text)
                return
            symbol = data.get("s") if type(data) is dict and type(data.get("s")) is str else None
            info = self.streams.get(stream) if type(stream) is str else None
            if info is None:
                self._reject(text, f"unknown_stream: {stream!r}", recv_ns, symbol)
            elif type(data) is not dict:
                self._reject(text, "not_object: data is not an object", recv_ns, info.symbol)
            else:
                self._accept(info, data, text[start:end], recv_ns, text)
            return
        values = {key: span[0] for key, span in spans.items()}
        if values.get("e") == "serverShutdown":
            self._server_shutdown(conn, text)
        elif "result" in values and "id" in values:
            log.debug("%s: reply %s", conn.name, text[:200])
        elif ("code" in values and "msg" in values) or ("error" in values and "id" in values):
            self.server_errors += 1
            log.warning("%s: the server reports an error: %s", conn.name, text[:500])
        else:
            name = _bare_stream(values)
            info = self.streams.get(name) if name else None
            if name is None:
                self._reject(text, "unexpected_message: neither a stream message nor a reply", recv_ns, None)
            elif info is None:
                self._reject(text, f"unknown_stream: {name!r}", recv_ns, values.get("s"))
            else:
                self._accept(info, values, text.strip(), recv_ns, text)

    def _accept(self, info: StreamInfo, data: dict[str, Any], raw: str, recv_ns: int, text: str) -> bool:
        """Check, de-duplicate and produce one event whose exact JSON text is `raw`."""
        try:
            i = info.check(data, info.symbol)
        except Invalid as bad:
            self._reject(text, bad.reason, recv_ns, info.symbol)
            return False
        if not (info.seq.accept(i) or self._odd_id(info, i)):
            return False
        self._produce(info, data, raw, recv_ns)
        info.count += 1
        self.produced += 1
        return True

    def _produce(self, info: StreamInfo, data: dict[str, Any], raw: str, recv_ns: int) -> None:
        assert self.out is not None
        if "recv_ns" in data:
            value = json.dumps({**data, "recv_ns": recv_ns}, separators=(",", ":"))
        else:
            value = f'{raw[:-1]},"recv_ns":{recv_ns}}}'
        self.out.send(info.topic, value, info.symbol, recv_ns // 1_000_000)

    def _odd_id(self, info: StreamInfo, i: int) -> bool:
        """An id the sequence refused: a duplicate, or the source restarted its ids (True: produce it)."""
        seq = info.seq
        if seq.looks_restarted(i) and not any(group.overlapping for group in self.groups):
            seq.reset(i)
            self.id_resets += 1
            return True
        self.duplicates += 1
        return False

    def _server_shutdown(self, conn: WebSocketClient, text: str) -> None:
        self.server_shutdowns += 1
        log.info("%s: serverShutdown announced: %s", conn.name, text[:200])
        conn.server_shutdown = True
        conn.attention.set()

    def _on_invalid(self, conn: WebSocketClient, raw: bytes, recv_ns: int) -> None:
        self._reject(raw.decode("utf-8", "replace"), "not_utf8", recv_ns, None)

    def _reject(self, text: str, reason: str, recv_ns: int | None, symbol: str | None) -> None:
        """Send a message that cannot be used to the DLQ (docs/contracts.md)."""
        assert self.out is not None
        code = reason.partition(":")[0]
        self.dlq += 1
        self.dlq_reasons[code] += 1
        if len(text) > MAX_DLQ_RAW:
            reason = f"{reason} (raw text cut from {len(text)} characters)"
            text = text[:MAX_DLQ_RAW]
        value = json.dumps({"raw": text, "reason": reason, "source": "ingest", "recv_ns": recv_ns,
                            "topic": None, "partition": None, "offset": None})
        self.out.send(self._dlq_topic, value, symbol, (recv_ns or time.time_ns()) // 1_000_000)

    def _internal_error(self, text: str, recv_ns: int, error: Exception) -> None:
        self.internal_errors += 1
        if self.internal_errors <= 10 or self.internal_errors % 1000 == 0:
            log.exception("ingest: failed on a message (#%d): %r", self.internal_errors, text[:300])
        with contextlib.suppress(Exception):
            self._reject(text, f"internal_error: {type(error).__name__}: {error}", recv_ns, None)

    def _produce_failed(self, topic: str, key: str | None, value: str, error: str) -> None:
        if topic != self._dlq_topic:
            self._reject(value, f"produce_failed: {error}", None, key)

    # --- gaps and backfill ----------------------------------------------------------------------------
    async def _watch_gaps(self) -> None:
        while True:
            await asyncio.sleep(GAP_CHECK_S)
            for gap in self.gaps.due():
                if self.backfiller is not None:
                    self.backfiller.submit(BackfillJob(gap.kind, gap.symbol, gap.first, gap.last,
                                                       after_restart=gap.after_restart))
                else:
                    self._give_up(gap.kind, gap.symbol, gap.first, gap.last, "backfill is off")
            self.gaps.settle()

    def _deliver_backfill(self, kind: str, symbol: str, events: list[tuple[dict[str, Any], str]],
                          recv_ns: int) -> int:
        info = self._by_key[(kind, symbol)]
        seq = info.seq
        assert isinstance(seq, IdSequence)
        accepted = 0
        for data, raw in events:
            try:
                i = info.check(data, symbol)
            except Invalid as bad:
                self._reject(raw, f"{bad.reason} (backfilled)", recv_ns, symbol)
                continue
            if seq.accept_backfill(i):
                self._produce(info, data, raw, recv_ns)
                accepted += 1
        self.produced += accepted
        self.gaps.settle()
        return accepted

    def _give_up(self, kind: str, symbol: str, lo: int, hi: int, reason: str) -> None:
        seq = self._by_key[(kind, symbol)].seq
        if isinstance(seq, IdSequence):
            count = seq.give_up(lo, hi)
            if count:
                self._given_up_logs += 1
                if self._given_up_logs <= 20 or self._given_up_logs % 100 == 0:
                    log.warning("gap %s %s ids %d..%d: %d id(s) not filled: %s (#%d)", symbol, kind, lo, hi, count,
                                reason, self._given_up_logs)
        self.gaps.settle()

    def _missing(self, kind: str, symbol: str, lo: int, hi: int) -> list[tuple[int, int]]:
        seq = self._by_key[(kind, symbol)].seq
        return seq.missing_between(lo, hi) if isinstance(seq, IdSequence) else []

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self._refresh_counters()
        return dict(self.counters)

    def _refresh_counters(self) -> None:
        now = time.monotonic()
        elapsed = max(1e-6, now - self._last_status_at)
        self._last_status_at = now
        streams: dict[str, dict[str, Any]] = {}
        for name, info in self.streams.items():
            streams[name] = {"messages": info.count, "rate": round((info.count - info.last_count) / elapsed, 1)}
            info.last_count = info.count
        rate = (self.received - self._last_received) / elapsed
        self._last_received = self.received
        groups = [group.stats for group in self.groups]
        counters: dict[str, Any] = {
            "received": self.received,
            "messages": self.produced,
            "rate": round(rate, 1),
            "streams": streams,
            "dlq": self.dlq,
            "dlq_reasons": dict(self.dlq_reasons),
            "duplicates": self.duplicates,
            "connections": sum(group.status()["open_connections"] for group in self.groups),
            "reconnects": sum(stats.reconnects for stats in groups),
            "watchdog_reconnects": sum(stats.watchdog for stats in groups),
            "rotations": sum(stats.rotations for stats in groups),
            "server_shutdowns": self.server_shutdowns,
            "connect_failures": sum(stats.failed_attempts for stats in groups),
            "pings": sum(group.status()["pings"] for group in self.groups),
            "pongs": sum(group.status()["pongs"] for group in self.groups),
            "server_errors": self.server_errors,
            "gaps": self.gaps.gaps,
            "gap_ids": self.gaps.gap_ids,
            "backfilled_ids": self.gaps.backfilled_ids,
            "backfill_pending_ids": self.gaps.pending_ids,
            "gap_ids_unfilled": self.gaps.unfilled_ids,
            "gap_ids_late": self.gaps.late_ids,
            "restart_gaps": self.gaps.restart_gaps,
            "restart_gap_ids": self.gaps.restart_gap_ids,
            "resumed_sequences": self.resumed_sequences,
            "resume_error": self.resume.error if self.resume is not None else None,
            "resume_s": self.resume.seconds if self.resume is not None else None,
            "id_resets": self.id_resets,
            "internal_errors": self.internal_errors,
            "last_message_age_s": (round(max(0.0, time.time() - self.last_recv_ns / 1e9), 3)
                                   if self.last_recv_ns else None),
        }
        if self.backfiller is not None:
            counters.update(self.backfiller.status())
        if self.out is not None:
            counters.update(self.out.stats())
            histogram = self.out.latency
            window = {index: count - self._last_latency.get(index, 0) for index, count in histogram.counts.items()
                      if count - self._last_latency.get(index, 0) > 0}
            self._last_latency = dict(histogram.counts)
            counters["ack_p50_ms"] = histogram.quantile_of(window, 0.50)
            counters["ack_p99_ms"] = histogram.quantile_of(window, 0.99)
            counters["ack_max_ms"] = round(histogram.max_ms, 3)
            counters["ack_latency_hist"] = histogram.snapshot()
            counters["last_error"] = self.out.last_error or next(
                (stats.last_error for stats in groups if stats.last_error), None)
        self.counters = counters
