"""`cryptotui bench ingest`: how many messages per second the ingest stage gets into Kafka, and how fast.

On a throwaway stack (`temporary_stack()`), with every process started by PID and stopped the same way:
1. throughput: a feed server process (`cryptotui feed serve --simulate --speed max`: as fast as its client
   reads) and a real `cryptotui stage run ingest` process. After a warm-up, messages/s = growth of the
   end offsets of the market topics (what arrived in the broker) over `--duration` seconds (>= 20 s).
   CPU (user + system time / wall time) and peak RSS of the ingest process come from psutil;
2. latency: a paced feed (`--latency-rate`, default 2,000 msg/s) and a fresh ingest process. The stage
   measures every message itself: its delivery report compares the receive time (`recv_ns`, the Kafka
   timestamp) with the wall clock when the broker's acknowledgement is handled, into a log-bucket
   histogram in its `stage_status` counters. p50/p99 come from the difference of that cumulative
   histogram between the start and the end of the window (bucket resolution about 6 %);
3. ceiling: the same client with the stage's producer settings and delivery callback sending pre-built
   messages from this process: what the stage could reach with no per-message work of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import click
import psutil
from confluent_kafka import Consumer, Producer, TopicPartition

from cryptotui.bench.common import emit, log_tail, stop_process
from cryptotui.config import Settings, child_env
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.ingest.producer import LatencyHistogram, producer_config

TARGET_MSGS_PER_S = 20_000
TARGET_P99_MS = 250.0
WARMUP_S = 4.0
CEILING_MESSAGES = 300_000
START_TIMEOUT_S = 60.0


# --- processes ------------------------------------------------------------------------------------------


def _cryptotui(*args: str) -> list[str]:
    return [sys.executable, "-m", "cryptotui", *args]


def start_feed(settings: Settings, log_path: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """A `cryptotui feed serve` process on a free port: (process, ws://host:port)."""
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            _cryptotui("feed", "serve", "--simulate", "--port", "0", "--no-bursts", "--seed", "1",
                       "--symbols", ",".join(settings.symbols), *options),
            env=child_env(settings), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
        )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if b"listening on" in line or not line:
            break
    text = line.decode().strip()
    if "listening on" not in text:
        stop_process(process)
        raise RuntimeError(f"the feed server did not start: {text!r}\n{log_tail(log_path)}")
    return process, text.rsplit(" ", 1)[-1]


def start_ingest(settings: Settings, url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = child_env(settings)
    env["CRYPTOTUI_BINANCE_WS_URL"] = url
    env["CRYPTOTUI_BINANCE_REST_URL"] = url.replace("ws://", "http://", 1)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(_cryptotui("stage", "run", "ingest"), env=env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)




# --- measurements ---------------------------------------------------------------------------------------


class EndOffsets:
    """Sum of the end offsets of the market topics: the messages the broker holds."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings),
                                  "group.id": f"bench-ingest-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
        self.partitions: list[TopicPartition] = []
        for topic in settings.market_topics.values():
            metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
            self.partitions += [TopicPartition(topic, p) for p in metadata.partitions]

    def total(self) -> int:
        return sum(self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1] for tp in self.partitions)

    def close(self) -> None:
        self.consumer.close()


class ProcessSampler:
    """CPU time and peak RSS of one process."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self._cpu0 = self._cpu()
        self._t0 = time.monotonic()

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def restart(self) -> None:
        self._cpu0, self._t0 = self._cpu(), time.monotonic()

    def cpu_percent(self) -> float:
        return 100.0 * (self._cpu() - self._cpu0) / max(1e-6, time.monotonic() - self._t0)


async def stage_counters(conn: asyncpg.Connection, pid: int) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT pid, state, counters FROM stage_status WHERE stage = 'ingest'")
    if row is None or row["pid"] != pid or row["state"] != "running":
        return {}
    return json.loads(row["counters"])


async def _wait_flowing(offsets: EndOffsets, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    first = await asyncio.to_thread(offsets.total)
    while await asyncio.to_thread(offsets.total) < first + 1000:
        if process.poll() is not None:
            raise RuntimeError(f"the ingest stage exited with {process.returncode}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no messages reached the broker within {START_TIMEOUT_S} s:\n{log_tail(log_path)}")
        await asyncio.sleep(0.2)


async def measure_throughput(settings: Settings, conn: asyncpg.Connection, duration: float,
                             log_dir: Path) -> dict[str, Any]:
    feed, url = start_feed(settings, log_dir / "bench-feed.log", "--speed", "max")
    ingest = start_ingest(settings, url, log_dir / "bench-ingest.log")
    offsets = await asyncio.to_thread(EndOffsets, settings)
    try:
        await _wait_flowing(offsets, ingest, log_dir / "bench-ingest.log")
        sampler = ProcessSampler(ingest.pid)
        await asyncio.sleep(WARMUP_S)
        sampler.restart()
        start_count, started = await asyncio.to_thread(offsets.total), time.monotonic()
        per_second: list[float] = []
        last_count, last_time = start_count, started
        while time.monotonic() - started < duration:
            await asyncio.sleep(1.0)
            sampler.sample()
            count, now = await asyncio.to_thread(offsets.total), time.monotonic()
            per_second.append((count - last_count) / (now - last_time))
            last_count, last_time = count, now
            if ingest.poll() is not None:
                raise RuntimeError(f"the ingest stage exited:\n{log_tail(log_dir / 'bench-ingest.log')}")
        elapsed = last_time - started
        cpu = sampler.cpu_percent()
        counters = await stage_counters(conn, ingest.pid)
    finally:
        offsets.close()
        code = stop_process(ingest)
        stop_process(feed)
    messages = last_count - start_count
    return {
        "msgs_per_s": round(messages / elapsed),
        "min_1s_msgs_per_s": round(min(per_second)) if per_second else None,
        "messages": messages,
        "duration_s": round(elapsed, 1),
        "cpu_percent": round(cpu, 1),
        "rss_mb": round(sampler.peak_rss / 2**20, 1),
        "dlq": counters.get("dlq"),
        "gaps": counters.get("gaps"),
        "spilled": counters.get("spilled"),
        "ingest_exit_code": code,
    }


def _histogram_diff(before: dict[str, int], after: dict[str, int]) -> dict[int, int]:
    return {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


async def measure_latency(settings: Settings, conn: asyncpg.Connection, rate: int, duration: float,
                          log_dir: Path) -> dict[str, Any]:
    feed, url = start_feed(settings, log_dir / "bench-feed.log", "--rate", str(rate))
    ingest = start_ingest(settings, url, log_dir / "bench-ingest.log")
    offsets = await asyncio.to_thread(EndOffsets, settings)
    try:
        await _wait_flowing(offsets, ingest, log_dir / "bench-ingest.log")
        await asyncio.sleep(WARMUP_S)

        async def counters_now() -> dict[str, Any]:
            deadline = time.monotonic() + 10
            while not (found := await stage_counters(conn, ingest.pid)):
                if time.monotonic() > deadline:
                    tail = log_tail(log_dir / "bench-ingest.log")
                    raise RuntimeError(f"no stage_status from the ingest stage:\n{tail}")
                await asyncio.sleep(0.2)
            return found

        before = await counters_now()
        started = time.monotonic()
        await asyncio.sleep(duration)
        after = await counters_now()
        elapsed = time.monotonic() - started
    finally:
        offsets.close()
        stop_process(ingest)
        stop_process(feed)
    window = _histogram_diff(before.get("ack_latency_hist", {}), after.get("ack_latency_hist", {}))
    acked = sum(window.values())
    return {
        "latency_rate": rate,
        "latency_msgs_per_s": round(acked / elapsed),
        "latency_messages": acked,
        "p50_ms": LatencyHistogram.quantile_of(window, 0.50),
        "p99_ms": LatencyHistogram.quantile_of(window, 0.99),
        "p999_ms": LatencyHistogram.quantile_of(window, 0.999),
        "max_bucket_ms": round(LatencyHistogram.upper_ms(max(window)), 3) if window else None,
    }


def measure_ceiling(settings: Settings, count: int = CEILING_MESSAGES) -> dict[str, Any]:
    """The stage's producer client and settings sending pre-built messages, nothing else."""
    acked = [0]
    histogram = LatencyHistogram()

    def delivered(err: Any, msg: Any) -> None:  # as much work as the stage's own delivery report
        if err is None:
            acked[0] += 1
            ts_ms = msg.timestamp()[1]
            histogram.add(max((msg.latency() or 0.0) * 1000.0, time.time() * 1000.0 - ts_ms - 0.5))

    producer = Producer(producer_config(bootstrap_servers(settings), 100_000, on_delivery=delivered))
    topics = list(settings.market_topics.values())
    value = ('{"e":"trade","E":1700000000001,"s":"BTCUSDT","t":5300000001,"p":"90000.12000000","q":"0.00200000",'
             '"T":1700000000000,"m":true,"M":true,"recv_ns":1700000000123456789}')
    messages = [(topics[n % 3], symbol, value) for n, symbol in enumerate(settings.symbols * 100)]
    size = len(messages)
    produce = producer.produce
    started = time.perf_counter()
    for n in range(count):
        topic, key, text = messages[n % size]
        while True:
            try:
                produce(topic, text, key, timestamp=int(time.time() * 1000))
                break
            except BufferError:
                producer.poll(0.005)
        if n % 512 == 0:
            producer.poll(0)
    left = producer.flush(60)
    elapsed = time.perf_counter() - started
    if left:
        raise RuntimeError(f"{left} message(s) not acknowledged in the ceiling run")
    return {"ceiling_msgs_per_s": round(count / elapsed), "ceiling_messages": acked[0]}


async def run_benchmark(duration: float, latency_rate: int, latency_duration: float) -> dict[str, Any]:
    from cryptotui.services.stack import temporary_stack

    async with temporary_stack() as stack:
        settings = stack.settings
        log_dir = settings.paths.logs
        log_dir.mkdir(parents=True, exist_ok=True)
        conn = await asyncpg.connect(database_url(settings))
        try:
            result: dict[str, Any] = {"mode": "subprocesses: cryptotui feed serve + cryptotui stage run ingest",
                                      "streams": len(settings.symbols) * len(settings.streams),
                                      "cpus": os.cpu_count()}
            result.update(await measure_throughput(settings, conn, duration, log_dir))
            result.update(await measure_latency(settings, conn, latency_rate, latency_duration, log_dir))
            result.update(await asyncio.to_thread(measure_ceiling, settings))
        finally:
            await conn.close()
    result["ratio"] = round(result["msgs_per_s"] / result["ceiling_msgs_per_s"], 3)
    result["targets"] = {"msgs_per_s": TARGET_MSGS_PER_S, "p99_ms": TARGET_P99_MS}
    result["meets_targets"] = bool(result["msgs_per_s"] >= TARGET_MSGS_PER_S and result["p99_ms"] is not None
                                   and result["p99_ms"] < TARGET_P99_MS)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cryptotui bench ingest", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [
        ("messages/s into Kafka (sustained)", f"{result['msgs_per_s']:,}", f">= {TARGET_MSGS_PER_S:,}"),
        ("slowest second", f"{result['min_1s_msgs_per_s']:,}", ""),
        ("producer ceiling (pre-built messages)", f"{result['ceiling_msgs_per_s']:,}", ""),
        ("share of the ceiling", f"{result['ratio']:.0%}", ""),
        (f"p50 receive -> ack at {result['latency_rate']:,} msg/s", f"{result['p50_ms']} ms", ""),
        (f"p99 receive -> ack at {result['latency_rate']:,} msg/s", f"{result['p99_ms']} ms",
         f"< {TARGET_P99_MS:g} ms"),
        ("ingest CPU", f"{result['cpu_percent']} %", ""),
        ("ingest peak RSS", f"{result['rss_mb']} MB", ""),
        ("messages measured", f"{result['messages']:,} in {result['duration_s']} s", ""),
    ]
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    verdict = "[green]meets the targets[/green]" if result["meets_targets"] else "[red]misses a target[/red]"
    console.print(verdict)


@click.command(name="ingest")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--duration", type=click.FloatRange(min=20), default=20.0, show_default=True,
              help="Seconds of the throughput measurement (after a warm-up).")
@click.option("--latency-rate", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Messages per second of the latency measurement.")
@click.option("--latency-duration", type=click.FloatRange(min=5), default=20.0, show_default=True,
              help="Seconds of the latency measurement.")
def command(as_json: bool, duration: float, latency_rate: int, latency_duration: float) -> None:
    """Ingest throughput into Kafka, receive -> ack latency, CPU and memory, against the client's ceiling."""
    from cryptotui.logs import setup_logging

    setup_logging("WARNING")
    result = asyncio.run(run_benchmark(duration, latency_rate, latency_duration))
    emit(result, as_json, _print_table)
