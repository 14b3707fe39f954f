"""`cryptotui bench sink`: how fast the sink drains a backlog, against a plain COPY, and its latency.

On a throwaway stack:
1. the market topics are pre-filled with realistic Binance messages (confluent-kafka);
2. a real `cryptotui stage run sink` process drains them: rows/s from its first commit to the last
   offset stored (the stored offsets are polled: cheap, and they commit with the rows);
3. the same rows, read back from the tables, are COPYed into empty tables of the same shape (hypertables
   with the same indexes): the ceiling of a plain COPY, and the sink's share of it;
4. a fresh sink process gets a steady stream (default 2,000 msg/s for 20 s, plus 1 s before and
   batch timeout + 2 s after, not counted), each message stamped with `recv_ns` just before it is
   produced. Latency = receive time -> row committed, measured from the outside: the bench polls the
   stored offsets every 50 ms and a message counts as committed at the first poll that shows its offset
   stored (an upper bound, by at most the poll interval plus one query). The sink's own per-row figures
   (commit time - recv_ns, in its counters, over its last 60 s) are reported next to it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import click
import psutil
from confluent_kafka import Producer

from cryptotui.bench.common import emit, log_tail, percentile, stop_process
from cryptotui.config import Settings, child_env
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.sink import GROUP_ID

STREAM_MIX = {"trade": 0.3, "aggTrade": 0.2, "bookTicker": 0.5}
# symbol -> (start price, price tick, typical quantity)
SYMBOLS = {"BTCUSDT": (67000.0, 0.01, 0.05), "ETHUSDT": (3500.0, 0.01, 1.0), "BNBUSDT": (600.0, 0.01, 5.0)}
POLL_S = 0.05
WARMUP_S = 1.0
TARGET_ROWS_PER_S = 50_000
TARGET_P99_MS = 1000


# --- realistic messages ---------------------------------------------------------------------------
class MessageFactory:
    """Binance-shaped messages: random-walk prices with 8-decimal strings, consecutive ids per symbol."""

    def __init__(self, seed: int = 1, symbols: dict[str, tuple[float, float, float]] | None = None) -> None:
        self.random = random.Random(seed)
        self.symbols = symbols or SYMBOLS
        self.price = {symbol: spec[0] for symbol, spec in self.symbols.items()}
        self.trade_id = dict.fromkeys(self.symbols, 1_000_000)
        self.agg_id = dict.fromkeys(self.symbols, 500_000)
        self.update_id = dict.fromkeys(self.symbols, 40_000_000)
        self.names = list(self.symbols)
        self.streams = list(STREAM_MIX)
        self.weights = list(STREAM_MIX.values())

    def _step(self, symbol: str) -> float:
        tick = self.symbols[symbol][1]
        price = self.price[symbol] * (1 + self.random.gauss(0, 0.0002))
        price = max(tick, round(round(price / tick) * tick, 8))
        self.price[symbol] = price
        return price

    def _qty(self, symbol: str) -> str:
        return f"{self.random.expovariate(1 / self.symbols[symbol][2]):.5f}000"

    def make(self, stream: str, symbol: str, recv_ns: int) -> dict[str, Any]:
        now_ms = recv_ns // 1_000_000
        price = self._step(symbol)
        if stream == "trade":
            self.trade_id[symbol] += 1
            return {"e": "trade", "E": now_ms, "s": symbol, "t": self.trade_id[symbol], "p": f"{price:.8f}",
                    "q": self._qty(symbol), "T": now_ms - 1, "m": self.random.random() < 0.5, "M": True,
                    "recv_ns": recv_ns}
        if stream == "aggTrade":
            self.agg_id[symbol] += 1
            first = self.trade_id[symbol] + 1
            self.trade_id[symbol] += self.random.randint(1, 3)
            return {"e": "aggTrade", "E": now_ms, "s": symbol, "a": self.agg_id[symbol], "p": f"{price:.8f}",
                    "q": self._qty(symbol), "f": first, "l": self.trade_id[symbol], "T": now_ms - 1,
                    "m": self.random.random() < 0.5, "M": True, "recv_ns": recv_ns}
        self.update_id[symbol] += 1
        spread = self.symbols[symbol][1] * self.random.randint(1, 3)
        return {"u": self.update_id[symbol], "s": symbol, "b": f"{price:.8f}", "B": self._qty(symbol),
                "a": f"{price + spread:.8f}", "A": self._qty(symbol), "recv_ns": recv_ns}

    def next(self, recv_ns: int) -> tuple[str, str, dict[str, Any]]:
        """(stream, symbol, message) drawn from the stream mix."""
        stream = self.random.choices(self.streams, self.weights)[0]
        symbol = self.random.choice(self.names)
        return stream, symbol, self.make(stream, symbol, recv_ns)


def generate(count: int, seed: int = 1, spacing_ns: int = 200_000) -> Iterator[tuple[str, str, bytes]]:
    """`count` messages as (stream, symbol, value), received `spacing_ns` apart, ending about now."""
    factory = MessageFactory(seed)
    start = time.time_ns() - count * spacing_ns
    for index in range(count):
        stream, symbol, message = factory.next(start + index * spacing_ns)
        yield stream, symbol, json.dumps(message, separators=(",", ":")).encode()


def producer(settings: Settings, **extra: Any) -> Producer:
    config = {
        "bootstrap.servers": bootstrap_servers(settings),
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
    }
    config.update(extra)
    return Producer(config)


def produce(settings: Settings, messages: Iterator[tuple[str, str, bytes]] | list[tuple[str, str, bytes]]) -> int:
    """Produce (stream, symbol, value) messages, keyed by symbol, to their market topics; waits for all."""
    topics = settings.market_topics
    out = producer(settings)
    count = 0
    failed: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failed.append(str(error))

    for stream, symbol, value in messages:
        while True:
            try:
                out.produce(topics[stream], key=symbol.encode(), value=value, on_delivery=delivered)  # type: ignore[index]
                break
            except BufferError:
                out.poll(0.05)
        count += 1
        if count % 10_000 == 0:
            out.poll(0)
    remaining = out.flush(60)
    if remaining or failed:
        raise RuntimeError(f"{remaining} message(s) not delivered, {len(failed)} failed: {failed[:3]}")
    return count


# --- the sink process -------------------------------------------------------------------------------
def start_sink(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "cryptotui", "stage", "run", "sink"],
            env=child_env(settings), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )




async def stored_offsets(conn: asyncpg.Connection, group: str = GROUP_ID) -> dict[tuple[str, int], int]:
    rows = await conn.fetch("SELECT topic, partition, next_offset FROM sink_offsets WHERE group_id = $1", group)
    return {(row["topic"], row["partition"]): row["next_offset"] for row in rows}


async def sink_counters(conn: asyncpg.Connection, pid: int | None = None) -> dict[str, Any]:
    """The sink's counters from stage_status (of process `pid` only, when given)."""
    row = await conn.fetchrow("SELECT pid, state, counters FROM stage_status WHERE stage = 'sink'")
    if row is None or (pid is not None and (row["pid"] != pid or row["state"] != "running")):
        return {}
    return json.loads(row["counters"])


async def _wait_stored(conn: asyncpg.Connection, total: int, process: subprocess.Popen[bytes], log_path: Path,
                       timeout: float) -> tuple[float | None, float]:
    """Poll until `total` offsets are stored: (time of the first commit, time of the last), monotonic."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        stored = sum((await stored_offsets(conn)).values())
        now = time.monotonic()
        if stored and first is None:
            first = now
        if stored >= total:
            return first, now
        if process.poll() is not None:
            raise RuntimeError(f"the sink exited with {process.returncode}:\n{log_tail(log_path)}")
        if now > deadline:
            raise RuntimeError(f"the sink stored {stored} of {total} offsets in {timeout} s:\n{log_tail(log_path)}")
        await asyncio.sleep(0.1)


# --- phases -----------------------------------------------------------------------------------------
def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """CPU time of a process (and its children: PostgreSQL's backends)."""
    if pid is None:
        return 0.0
    try:
        process = psutil.Process(pid)
        processes = [process, *(process.children(recursive=True) if children else [])]
    except psutil.Error:
        return 0.0
    total = 0.0
    for each in processes:
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            total += times.user + times.system
    return total


async def measure_drain(settings: Settings, conn: asyncpg.Connection, total: int, log_path: Path,
                        postgres_pid: int | None, broker_pid: int | None) -> dict[str, Any]:
    started = time.monotonic()
    process = start_sink(settings, log_path)
    postgres_before, broker_before = cpu_seconds(postgres_pid, True), cpu_seconds(broker_pid)
    try:
        first, last = await _wait_stored(conn, total, process, log_path, timeout=600)
        cpu_s = cpu_seconds(process.pid)
        postgres_s = cpu_seconds(postgres_pid, True) - postgres_before
        broker_s = cpu_seconds(broker_pid) - broker_before
    finally:
        stop_process(process)
    counters = await sink_counters(conn)
    rows = 0
    for table in ("trades", "agg_trades", "book_ticker"):
        rows += await conn.fetchval(f'SELECT count(*) FROM "{table}"')
    assert first is not None
    drain_s = last - first
    return {
        "rows": rows,
        "rows_per_s": round(rows / drain_s) if drain_s > 0 else None,
        "rows_per_s_incl_startup": round(rows / (last - started)),
        "drain_s": round(drain_s, 2),
        "startup_s": round(first - started, 2),
        "cpu_s": {"sink": round(cpu_s, 2), "postgres": round(postgres_s, 2), "broker": round(broker_s, 2)},
        "transactions": counters.get("transactions"),
        "duplicates": sum((counters.get("duplicates") or {}).values()),
    }


async def measure_copy(conn: asyncpg.Connection) -> dict[str, Any]:
    """COPY the stored rows into empty tables of the same shape: the ceiling of a plain COPY."""
    timescale = await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
    total_rows = 0
    elapsed = 0.0
    for table, time_column in (("trades", "trade_time"), ("agg_trades", "trade_time"), ("book_ticker", "recv_time")):
        target = f"bench_copy_{table}"
        await conn.execute(f'DROP TABLE IF EXISTS "{target}"')
        await conn.execute(f'CREATE TABLE "{target}" (LIKE "{table}" INCLUDING ALL)')
        if timescale:
            await conn.execute(
                "SELECT create_hypertable($1::regclass, $2::name, chunk_time_interval => INTERVAL '1 day')",
                target, time_column,
            )
        records = await conn.fetch(f'SELECT * FROM "{table}"')
        columns = list(records[0].keys()) if records else []
        rows = [tuple(record) for record in records]
        del records
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(target, records=rows, columns=columns)
        elapsed += time.perf_counter() - started
        total_rows += len(rows)
        await conn.execute(f'DROP TABLE "{target}"')
    return {"copy_rows": total_rows, "copy_s": round(elapsed, 2),
            "copy_rows_per_s": round(total_rows / elapsed) if elapsed else None}



async def measure_latency(settings: Settings, conn: asyncpg.Connection, rate: int, seconds: float,
                          log_path: Path) -> dict[str, Any]:
    """A steady stream into a fresh sink; latency receive -> committed, observed from the outside."""
    before = await stored_offsets(conn)
    process = start_sink(settings, log_path)
    sent: list[tuple[str, int, int, int]] = []  # (topic, partition, offset, recv_ns)
    observations: dict[tuple[str, int], list[tuple[int, int]]] = {}  # tp -> [(next_offset, seen_ns)]
    done = threading.Event()
    errors: list[str] = []
    window: dict[str, int] = {}
    # The stream runs on after the measured window, so its last messages do not wait for the batch
    # timeout as they would when a stream stops (steady state only; the tail is a separate matter).
    cooldown_s = settings.sink_batch_timeout_s + 2.0
    reported: dict[str, Any] = {}

    def paced_producer() -> None:
        out = producer(settings, **{"linger.ms": 5})
        factory = MessageFactory(seed=7)
        topics = settings.market_topics

        def delivered(error: Any, message: Any) -> None:
            if error is not None:
                errors.append(str(error))
            else:
                sent.append((message.topic(), message.partition(), message.offset(),
                             json.loads(message.value())["recv_ns"]))

        tick = 0.01
        per_tick = rate * tick
        started = time.monotonic()
        window["start_ns"] = time.time_ns() + int(WARMUP_S * 1e9)
        window["end_ns"] = window["start_ns"] + int(seconds * 1e9)
        owed = 0.0
        while time.monotonic() - started < WARMUP_S + seconds + cooldown_s:
            owed += per_tick
            while owed >= 1:
                stream, symbol, message = factory.next(time.time_ns())
                out.produce(topics[stream], key=symbol.encode(),  # type: ignore[index]
                            value=json.dumps(message, separators=(",", ":")).encode(), on_delivery=delivered)
                owed -= 1
            out.poll(0)
            next_tick = started + tick * (round((time.monotonic() - started) / tick) + 1)
            time.sleep(max(0.0, next_tick - time.monotonic()))
        out.flush(30)
        done.set()

    try:
        # Wait until the fresh sink has its partitions (stage_status shows them) before the stream starts.
        deadline = time.monotonic() + 60
        while not (await sink_counters(conn, process.pid)).get("assigned"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sink did not start:\n{log_tail(log_path)}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        thread = threading.Thread(target=paced_producer, name="paced-producer", daemon=True)
        thread.start()
        last_seen: dict[tuple[str, int], int] = dict(before)
        while True:
            offsets = await stored_offsets(conn)
            seen_ns = time.time_ns()
            for tp, offset in offsets.items():
                if offset > last_seen.get(tp, 0):
                    observations.setdefault(tp, []).append((offset, seen_ns))
                    last_seen[tp] = offset
            if not reported and window and time.time_ns() > window["end_ns"] + int(1.5e9):
                # The sink's own view of the same steady state: its 60 s window, read before the tail.
                reported = (await sink_counters(conn, process.pid)).get("latency_ms") or {}
            if done.is_set():
                expected: dict[tuple[str, int], int] = {}
                for topic, partition, offset, _ in sent:
                    expected[(topic, partition)] = max(expected.get((topic, partition), 0), offset + 1)
                if all(last_seen.get(tp, 0) >= end for tp, end in expected.items()):
                    break
            if process.poll() is not None:
                raise RuntimeError(f"the sink exited:\n{log_tail(log_path)}")
            await asyncio.sleep(POLL_S)
        thread.join()
    finally:
        stop_process(process)
    if errors:
        raise RuntimeError(f"{len(errors)} message(s) not delivered: {errors[:3]}")
    keys = {tp: [next_offset for next_offset, _ in seen] for tp, seen in observations.items()}
    latencies_ms = []
    for topic, partition, offset, recv_ns in sent:
        if not window["start_ns"] <= recv_ns < window["end_ns"]:
            continue
        # The first poll whose stored offset (next to read) is past this message's offset.
        index = bisect.bisect_right(keys[(topic, partition)], offset)
        latencies_ms.append((observations[(topic, partition)][index][1] - recv_ns) / 1e6)
    return {
        "latency_messages": len(latencies_ms),
        "latency_rate": rate,
        "latency_seconds": seconds,
        "p50_ms": round(percentile(latencies_ms, 0.50) or 0.0, 1),
        "p99_ms": round(percentile(latencies_ms, 0.99) or 0.0, 1),
        "max_ms": round(max(latencies_ms), 1),
        "sink_reported_p50_ms": reported.get("p50_ms"),
        "sink_reported_p99_ms": reported.get("p99_ms"),
        "sink_reported_max_ms": reported.get("max_ms"),
    }


async def run_benchmark(messages: int, rate: int, seconds: float) -> dict[str, Any]:
    from cryptotui.services.stack import temporary_stack

    async with temporary_stack() as stack:
        settings = stack.settings
        log_path = settings.paths.logs / "bench-sink.log"
        started = time.perf_counter()
        produced = await asyncio.to_thread(produce, settings, generate(messages))
        produce_s = time.perf_counter() - started
        conn = await asyncpg.connect(database_url(settings))
        try:
            result: dict[str, Any] = {"messages": produced, "mode": "subprocess: cryptotui stage run sink",
                                      "batch_size": settings.sink_batch_size,
                                      "batch_timeout_s": settings.sink_batch_timeout_s,
                                      "produce_msgs_per_s": round(produced / produce_s)}
            drain = await measure_drain(settings, conn, produced, log_path, stack.postgres.pid(), stack.kafka.pid())
            if drain["rows"] != produced:
                raise RuntimeError(f"{drain['rows']} rows stored for {produced} messages")
            result.update(drain)
            result.update(await measure_copy(conn))
            result["ratio"] = (round(result["rows_per_s"] / result["copy_rows_per_s"], 3)
                               if result["rows_per_s"] and result["copy_rows_per_s"] else None)
            result.update(await measure_latency(settings, conn, rate, seconds, log_path))
        finally:
            await conn.close()
    result["targets_met"] = {
        "rows_per_s": bool(result["rows_per_s"] and result["rows_per_s"] >= TARGET_ROWS_PER_S),
        "p99_ms": result["p99_ms"] < TARGET_P99_MS,
    }
    result["cpus"] = os.cpu_count()
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("measure", "value", "target", title="cryptotui bench sink")
    met = result["targets_met"]
    table.add_row("messages pre-filled", f"{result['messages']:,}", "")
    table.add_row("sink drain (rows/s)", f"{result['rows_per_s']:,}", f">= {TARGET_ROWS_PER_S:,} "
                  + ("ok" if met["rows_per_s"] else "MISSED"))
    table.add_row("  incl. process start", f"{result['rows_per_s_incl_startup']:,}", "")
    table.add_row("plain COPY, same rows (rows/s)", f"{result['copy_rows_per_s']:,}", "ceiling")
    table.add_row("sink / COPY", f"{result['ratio']:.0%}", "")
    table.add_row(f"latency p50 at {result['latency_rate']:,} msg/s", f"{result['p50_ms']} ms", "")
    table.add_row(f"latency p99 at {result['latency_rate']:,} msg/s", f"{result['p99_ms']} ms",
                  f"< {TARGET_P99_MS} ms " + ("ok" if met["p99_ms"] else "MISSED"))
    table.add_row("  as the sink reports it (p50/p99)",
                  f"{result['sink_reported_p50_ms']} / {result['sink_reported_p99_ms']} ms", "")
    table.add_row("mode", result["mode"], "")
    Console().print(table)


@click.command("sink")
@click.option("--messages", default=500_000, show_default=True, help="Messages pre-filled for the drain.")
@click.option("--rate", default=2_000, show_default=True, help="Messages per second for the latency phase.")
@click.option("--seconds", default=20.0, show_default=True, help="Length of the latency phase.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(messages: int, rate: int, seconds: float, as_json: bool) -> None:
    """Sink drain rows/s vs a plain COPY, and receive -> committed latency at a steady rate."""
    result = asyncio.run(run_benchmark(messages, rate, seconds))
    emit(result, as_json, _print_table)
