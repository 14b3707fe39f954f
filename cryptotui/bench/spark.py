"""`cryptotui bench spark`: the Spark job's throughput on a backlog, its start-up, and window latency.

On a throwaway stack:
1. the trade topic is pre-filled with a backlog (default 1,000,000 trades of three symbols, key = symbol,
   Binance message format, event times spread over the hour before);
2. the real job (`python -m spark.job`, the command the spark stage runs, default settings: local[2],
   1 GB driver, 200,000 rows per trigger, 2 s trigger) drains it. From its status lines: session start,
   driver start -> first batch done, and the warm throughput = rows / processing time of the batches after
   the first (the first one pays the JIT warm-up), next to the wall-clock rate;
3. then trades arrive live at a steady rate (default 2,000 msg/s for 150 s) with trade time = now (up to
   1 s of disorder). For every 1-minute window that ends while they arrive, the latency is the time from
   the window's end to the moment its row in trade_metrics has every trade of the window, for all
   symbols (the table is polled every 100 ms). Target: within watermark + 5 s.
Every process started is stopped by its PID at the end, and the stack is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import asyncpg
import click
import psutil
from confluent_kafka import Producer

from cryptotui.bench.common import emit
from cryptotui.config import Settings, child_env
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.services.stack import temporary_stack

SYMBOLS = {"BTCUSDT": 62_000.0, "ETHUSDT": 3_400.0, "BNBUSDT": 410.0}
STATUS_PREFIX = "@@cryptotui-spark "
WINDOW_MS = 60_000
TARGET_EVENTS_PER_S = 50_000
TEMPLATE = (
    '{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%.2f","q":"%.8f","T":%d,"m":%s,"M":true,"recv_ns":%d}'
)


def _producer(settings: Settings) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap_servers(settings),
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )


def prefill(settings: Settings, events: int) -> float:
    """Produce `events` trades spread over the hour before now; returns the seconds it took."""
    started = time.perf_counter()
    rng = random.Random(1)
    producer = _producer(settings)
    symbols = list(SYMBOLS)
    first_ms = int(time.time() * 1000) - 3_600_000
    step_ms = 3_000_000 / max(events, 1)  # 50 minutes of trades
    prices = dict(SYMBOLS)
    for number in range(events):
        symbol = symbols[number % 3]
        prices[symbol] += rng.uniform(-1, 1) * prices[symbol] * 1e-5
        trade_ms = first_ms + int(number * step_ms)
        value = TEMPLATE % (trade_ms + 2, symbol, number, prices[symbol], rng.uniform(1e-5, 0.5), trade_ms,
                            "true" if number & 1 else "false", trade_ms * 1_000_000)
        while True:
            try:
                producer.produce(settings.topic_trade, key=symbol.encode(), value=value.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if number % 20_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise click.ClickException("the broker did not take the backlog")
    return time.perf_counter() - started


class LiveProducer(threading.Thread):
    """Trades at a steady rate with trade time = now (minus up to 1 s), counted per (symbol, window)."""

    def __init__(self, settings: Settings, rate: int, seconds: float) -> None:
        super().__init__(name="live-producer", daemon=True)
        self.settings = settings
        self.rate = rate
        self.seconds = seconds
        self.counts: dict[tuple[str, int], int] = defaultdict(int)
        self.produced = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by the bench
            self.error = error

    def _run(self) -> None:
        rng = random.Random(2)
        producer = _producer(self.settings)
        symbols = list(SYMBOLS)
        prices = dict(SYMBOLS)
        trade_id = 10_000_000
        self.started_at = time.time()
        end = self.started_at + self.seconds
        tick = 0.01
        due = 0.0
        next_tick = time.monotonic()
        while time.time() < end:
            due += self.rate * tick
            while due >= 1:
                due -= 1
                symbol = symbols[trade_id % 3]
                prices[symbol] += rng.uniform(-1, 1) * prices[symbol] * 1e-5
                now_ms = int(time.time() * 1000)
                trade_ms = now_ms - rng.randint(0, 1000)
                value = TEMPLATE % (now_ms, symbol, trade_id, prices[symbol], rng.uniform(1e-5, 0.5), trade_ms,
                                    "true" if trade_id & 1 else "false", time.time_ns())
                producer.produce(self.settings.topic_trade, key=symbol.encode(), value=value.encode())
                with self.lock:
                    self.counts[(symbol, trade_ms - trade_ms % WINDOW_MS)] += 1
                self.produced += 1
                trade_id += 1
            producer.poll(0)
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.monotonic()))
        producer.flush(30)
        self.finished_at = time.time()


class JobProcess:
    """The Spark job as a child process; its status lines are collected with their arrival times."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: asyncio.subprocess.Process | None = None
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.started = 0.0
        self.peak_rss = 0
        self._sampled = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._tree: dict[int, psutil.Process] = {}

    async def start(self) -> None:
        env = child_env(self.settings)
        env["PYTHONUNBUFFERED"] = "1"
        self.started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spark.job", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith(STATUS_PREFIX):
                with contextlib.suppress(ValueError):
                    self.events.append((time.monotonic(), json.loads(line[len(STATUS_PREFIX) :])))

    def sample(self) -> None:
        """Peak memory (PSS: shared pages of forked workers counted once) of the driver, its JVM and its
        Python workers, at most every 2 s."""
        if self.process is None or self.process.returncode is not None:
            return
        now = time.monotonic()
        if now - self._sampled < 2:
            return
        self._sampled = now
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            for child in root.children(recursive=True):
                self._tree.setdefault(child.pid, child)
            total = 0
            for proc in [root, *self._tree.values()]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_full_info().pss
            self.peak_rss = max(self.peak_rss, total)

    def progress(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e.get("event") == "progress" and e.get("query") == "trade_metrics"]

    def check_alive(self) -> None:
        assert self.process is not None
        failed = [e for _, e in self.events if e.get("event") == "failed"]
        if failed or self.process.returncode is not None:
            raise click.ClickException(f"the Spark job stopped: {failed[-1]['error'] if failed else 'exit'}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL whatever of its process tree is left."""
        if self.process is None:
            return
        self.sample()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        for proc in self._tree.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def _wait(predicate: Any, timeout: float, job: JobProcess, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        job.check_alive()
        job.sample()
        await asyncio.sleep(0.2)
    raise click.ClickException(f"timed out waiting for {what}")


async def _window_latencies(
    settings: Settings, live: LiveProducer, job: JobProcess, timeout_after_s: float
) -> dict[int, float]:
    """window start (ms) -> seconds from its end until all its trades are in trade_metrics."""
    conn = await asyncpg.connect(database_url(settings))
    latencies: dict[int, float] = {}
    try:
        while live.is_alive() or time.time() < live.finished_at + timeout_after_s:
            job.check_alive()
            job.sample()
            now = time.time()
            with live.lock:
                counts = dict(live.counts)
            ended = sorted(
                {start for _, start in counts if (start + WINDOW_MS) / 1000 <= now and start not in latencies}
            )
            # Only windows that ended while trades still arrived (their counts are complete).
            ended = [start for start in ended if (start + WINDOW_MS) / 1000 + 1.5 <= (live.finished_at or now)]
            if ended:
                rows = await conn.fetch(
                    "SELECT symbol, window_start, trade_count FROM trade_metrics WHERE window_start = ANY($1)",
                    [datetime.fromtimestamp(start / 1000, UTC) for start in ended],
                )
                stored = {(r["symbol"], int(r["window_start"].timestamp() * 1000)): r["trade_count"] for r in rows}
                for start in ended:
                    wanted = {key: count for key, count in counts.items() if key[1] == start}
                    if all(stored.get(key) == count for key, count in wanted.items()):
                        latencies[start] = round(now - (start + WINDOW_MS) / 1000, 3)
            if not live.is_alive() and live.finished_at and all(
                start in latencies for _, start in counts if (start + WINDOW_MS) / 1000 + 1.5 <= live.finished_at
            ):
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    return latencies


async def run_benchmark(events: int, rate: int, live_s: float) -> dict[str, Any]:
    async with temporary_stack() as stack:
        settings = stack.settings
        produce_s = await asyncio.to_thread(prefill, settings, events)
        job = JobProcess(settings)
        try:
            await job.start()

            def backlog_done() -> bool:
                return sum(e["num_input_rows"] for _, e in job.progress()) >= events

            await _wait(backlog_done, 600, job, "the backlog to be processed")
            progress = [(t, e) for t, e in job.progress() if e["num_input_rows"] > 0]
            first_time, first = progress[0]
            warm = progress[1:]
            warm_rows = sum(e["num_input_rows"] for _, e in warm)
            warm_ms = sum(e["batch_duration_ms"] for _, e in warm)
            session = next((e["seconds"] for _, e in job.events if e.get("event") == "session"), None)
            backlog_wall = progress[-1][0] - first_time

            live = LiveProducer(settings, rate, live_s)
            live.start()
            latencies = await _window_latencies(settings, live, job, settings.spark_watermark_s + 30)
            live.join(5)
            if live.error is not None:
                raise click.ClickException(f"the live producer failed: {live.error}")
        finally:
            await job.stop()
    worst = max(latencies.values()) if latencies else None
    limit = settings.spark_watermark_s + 5
    events_per_s = round(warm_rows / (warm_ms / 1000), 1) if warm_ms else None
    return {
        "events": events,
        "produce_s": round(produce_s, 2),
        "session_s": session,
        "first_batch_s": round(first_time - job.started, 2),
        "first_batch_rows": first["num_input_rows"],
        "first_batch_ms": first["batch_duration_ms"],
        "batches": len(progress),
        "max_rows_per_trigger": settings.spark_max_rows_per_trigger,
        "events_per_s": events_per_s,
        "events_per_s_wall": round(warm_rows / backlog_wall, 1) if warm and backlog_wall > 0 else None,
        "backlog_s": round(progress[-1][0] - job.started, 2),
        "live_rate_msg_s": round(live.produced / max(live.finished_at - live.started_at, 1e-9), 1),
        "live_s": live_s,
        "windows_measured": len(latencies),
        "window_latency_s": worst,
        "window_latency_median_s": statistics.median(latencies.values()) if latencies else None,
        "window_latency_all_s": [latencies[start] for start in sorted(latencies)],
        "watermark_s": settings.spark_watermark_s,
        "trigger_s": settings.spark_trigger_s,
        "peak_pss_mb": round(job.peak_rss / 2**20),
        "master": settings.spark_master,
        "targets": {
            "events_per_s": TARGET_EVENTS_PER_S,
            "window_latency_s": limit,
        },
        "pass": {
            "events_per_s": events_per_s is not None and events_per_s >= TARGET_EVENTS_PER_S,
            "window_latency_s": worst is not None and worst <= limit,
        },
    }


def _print_table(result: dict[str, Any]) -> None:
    def mark(key: str) -> str:
        return "ok" if result["pass"][key] else "MISSED"

    rows = [
        ("backlog", f"{result['events']:,} trades (produced in {result['produce_s']} s)"),
        ("Spark session start", f"{result['session_s']} s"),
        ("driver start -> first batch", f"{result['first_batch_s']} s "
         f"({result['first_batch_rows']:,} rows in {result['first_batch_ms']} ms)"),
        ("warm throughput", f"{result['events_per_s']:,} events/s over {result['batches'] - 1} batches "
         f"(target >= {result['targets']['events_per_s']:,}: {mark('events_per_s')})"),
        ("wall-clock rate", f"{result['events_per_s_wall']:,} events/s; backlog done {result['backlog_s']} s "
         "after the driver started"),
        ("live rate", f"{result['live_rate_msg_s']:,} msg/s for {result['live_s']} s"),
        ("window end -> final row", f"worst {result['window_latency_s']} s, median "
         f"{result['window_latency_median_s']} s over {result['windows_measured']} windows "
         f"(target <= {result['targets']['window_latency_s']} s: {mark('window_latency_s')})"),
        ("peak memory", f"{result['peak_pss_mb']} MB PSS (driver, JVM, Python workers)"),
        ("settings", f"{result['master']}, trigger {result['trigger_s']} s, watermark {result['watermark_s']} s, "
         f"{result['max_rows_per_trigger']:,} rows per trigger"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")


@click.command("spark")
@click.option("--events", default=1_000_000, show_default=True, help="Trades in the pre-filled backlog.")
@click.option("--rate", default=2_000, show_default=True, help="Live trades per second for the latency part.")
@click.option("--live-seconds", "live_s", default=150.0, show_default=True,
              help="How long live trades arrive (windows ending meanwhile are measured).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(events: int, rate: int, live_s: float, as_json: bool) -> None:
    """Spark job: warm events/s on a backlog, start-up to first batch, window end -> final row latency."""
    result = asyncio.run(run_benchmark(events, rate, live_s))
    emit(result, as_json, _print_table)
