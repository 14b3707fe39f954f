"""`cryptotui bench e2e`: the whole pipeline (`cryptotui --daemon --source sim`) at a steady rate.

Measures, on a throwaway data directory with free ports:
- msgs_per_s: messages in (ingest's `received` counter) and rows_per_s: rows written (the sink's
  `rows_written`), over the steady phase (at least 60 s, after the first VWAP row);
- p50_ms / p99_ms: receive time (recv_ns, stamped by ingest) -> row committed, every row of the last 60 s,
  as the sink measures it at commit; observed_p50_ms / observed_p99_ms: the same seen from outside by
  polling the trades table every 100 ms (an upper bound, coarser by the poll interval);
- window_latency_s: for each 1-minute trade window closed during the run, from the window's end to its
  final trade_metrics row (updated_at) - the event-time watermark delay is part of it;
- first_vwap_s: from starting `cryptotui --daemon` to the first VWAP row, cold (fresh data directory:
  initdb, Spark session and checkpoint from nothing) and warm (a second start on the same directory);
- peak_rss_mb: the largest sum of the RSS of every process of the pipeline (the daemon, its stages, the
  feed server, the Spark JVM and its Python workers, PostgreSQL and the Kafka broker), sampled every
  0.5 s. Shared pages (PostgreSQL's shared buffers, forked Python workers) count once per process, so
  this overstates; peak_pss_mb (proportional set size: shared pages split between their users) is the
  memory the pipeline really takes, with its breakdown per kind of process.

The helpers (`DaemonProcess`, `ProcessTree`) also serve the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import click
import psutil

from cryptotui.bench.common import percentile
from cryptotui.config import Settings, child_env
from cryptotui.db.connection import database_url
from cryptotui.services.stack import Stack, temporary_settings

DEFAULT_RATE = 2000.0
DEFAULT_DURATION_S = 60.0
FIRST_VWAP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0
#: After the measured phase, how long to wait for the watermark to pass a window that ended within it.
WINDOW_WAIT_S = 120.0
MB = 1024 * 1024


# --- running the daemon --------------------------------------------------------------------------------
class ProcessTree:
    """Every process of a pipeline seen so far (by PID and start time), and its peak total RSS."""

    def __init__(self, settings: Settings, root_pid: int) -> None:
        self.settings = settings
        self.root_pid = root_pid
        self.seen: dict[int, psutil.Process] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_breakdown: dict[str, int] = {}  # PSS per kind of process at the PSS peak
        self._lock = threading.Lock()

    def _roots(self) -> list[int]:
        stack = Stack(self.settings)
        pids = [self.root_pid]
        for service in (stack.postgres, stack.kafka):
            with contextlib.suppress(Exception):
                pid = service.pid()
                if pid:
                    pids.append(pid)
        return pids

    def sample(self) -> int:
        """Record the processes now running; returns their total RSS in bytes."""
        current: dict[int, psutil.Process] = {}
        for pid in self._roots():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                current[root.pid] = root
                for child in root.children(recursive=True):
                    current[child.pid] = child
        total = 0
        total_pss = 0
        breakdown: dict[str, int] = {}
        for proc in current.values():
            with contextlib.suppress(psutil.Error):
                memory = proc.memory_full_info()
                total += memory.rss
                total_pss += memory.pss
                label = _label(proc)
                breakdown[label] = breakdown.get(label, 0) + memory.pss
        with self._lock:
            for pid, proc in current.items():
                known = self.seen.get(pid)
                if known is None or not known.is_running():
                    self.seen[pid] = proc
            self.peak_rss = max(self.peak_rss, total)
            if total_pss > self.peak_pss:
                self.peak_pss = total_pss
                self.peak_breakdown = breakdown
        return total

    def alive(self) -> list[int]:
        """PIDs recorded so far that still run (the same process: PID and start time match)."""
        with self._lock:
            procs = list(self.seen.values())
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
        return alive

    def kill_leftovers(self) -> list[int]:
        """SIGKILL what still runs of the recorded processes (cleanup after a failed run)."""
        leftovers = self.alive()
        for pid in leftovers:
            with contextlib.suppress(psutil.Error):
                self.seen[pid].kill()
        return leftovers


def _label(proc: psutil.Process) -> str:
    """What a pipeline process is: `stage NAME`, `daemon`, `feed`, `spark jvm`, `spark python`, ..."""
    with contextlib.suppress(psutil.Error):
        args = proc.cmdline()
        joined = " ".join(args)
        if "stage" in args and "run" in args:
            return "stage " + args[args.index("run") + 1]
        if "--daemon" in args:
            return "daemon"
        if "feed" in args and "serve" in args:
            return "feed"
        name = proc.name()
        if name == "java" or (args and args[0].endswith("/java")):
            return "spark jvm"
        if "pyspark" in joined or "spark" in joined:
            return "spark python"
        if name.startswith("postgres"):
            return "postgres"
        if "noida" in joined:
            return "kafka"
        return name
    return "?"


@dataclass
class DaemonProcess:
    """`python -m cryptotui --daemon ...` as a child process, its output in files, its tree sampled."""

    settings: Settings
    args: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    tree: ProcessTree | None = None
    started_at: float = 0.0  # time.monotonic() at spawn
    started_wall: float = 0.0
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    @property
    def stdout_path(self) -> Path:
        return (self.output_dir or self.settings.data_dir) / "daemon.stdout"

    @property
    def stderr_path(self) -> Path:
        return (self.output_dir or self.settings.data_dir) / "daemon.stderr"

    def start(self) -> None:
        env = child_env(self.settings)
        env["CRYPTOTUI_CONFIG_FILE"] = "/nonexistent/cryptotui-bench.toml"
        env.update(self.extra_env)
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cryptotui", "--daemon", *self.args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.tree = ProcessTree(self.settings, self.proc.pid)
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        assert self.tree is not None
        while not self._stop_sampling.wait(0.5):
            with contextlib.suppress(Exception):
                self.tree.sample()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Signal the daemon and wait for its exit code (SIGKILL after `timeout`, then code -9)."""
        assert self.proc is not None
        if self.tree is not None:
            with contextlib.suppress(Exception):
                self.tree.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(5)
        return code

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines the daemon wrote to stdout."""
        lines = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
        return lines

    def output_tail(self, lines: int = 40) -> str:
        text = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)


def new_data_dir(prefix: str = "cryptotui-e2e-") -> Path:
    """A /tmp directory PostgreSQL's `postgres` account can traverse (mode 0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("CRYPTOTUI_TMP", "/tmp")))
    path.chmod(0o755)
    return path


def cleanup(settings: Settings, daemons: list[DaemonProcess]) -> None:
    """Stop what a run left behind (by recorded PID), then the stack, and remove the data directory."""
    for daemon in daemons:
        if daemon.running():
            daemon.stop(signal.SIGKILL, timeout=10)
        if daemon.tree is not None:
            daemon.tree.kill_leftovers()
    stack = Stack(settings)
    # Callable from inside an event loop too (asyncio.run needs a thread without one).
    stopper = threading.Thread(target=lambda: _quietly(lambda: asyncio.run(stack.down())), name="stack-down")
    stopper.start()
    stopper.join(60)
    stack.postgres.kill()
    stack.kafka.kill()
    shutil.rmtree(settings.data_dir, ignore_errors=True)


def _quietly(action: Any) -> None:
    with contextlib.suppress(Exception):
        action()


# --- measuring -----------------------------------------------------------------------------------------
async def connect_when_ready(settings: Settings, deadline: float) -> asyncpg.Connection:
    """Connect once the daemon created the database (its password file and schema)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url(settings), timeout=3)
            if await conn.fetchval("SELECT to_regclass('trade_metrics') IS NOT NULL"):
                return conn
            await conn.close()
        except Exception as error:  # not there yet: no password file, server starting
            last = error
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the database did not come up: {last}")


async def wait_first_vwap(settings: Settings, daemon: DaemonProcess, timeout: float = FIRST_VWAP_TIMEOUT_S) -> float:
    """Seconds from the daemon's start to a trade_metrics row with a VWAP written after that start."""
    deadline = daemon.started_at + timeout
    conn = await connect_when_ready(settings, deadline)
    since = datetime.fromtimestamp(daemon.started_wall).astimezone()
    try:
        while time.monotonic() < deadline:
            if not daemon.running():
                raise RuntimeError(f"the daemon exited early:\n{daemon.output_tail()}")
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM trade_metrics WHERE vwap IS NOT NULL"
                                   " AND updated_at >= $1)", since):
                return time.monotonic() - daemon.started_at
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    raise TimeoutError(f"no VWAP row within {timeout:.0f} s:\n{daemon.output_tail()}")


async def stage_counters(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch("SELECT stage, counters FROM stage_status")
    return {row["stage"]: json.loads(row["counters"]) if isinstance(row["counters"], str) else row["counters"]
            for row in rows}


def _total(value: Any) -> float:
    if isinstance(value, dict):
        return float(sum(item for item in value.values() if isinstance(item, (int, float))))
    return float(value or 0)



async def observe_latency(conn: asyncpg.Connection, symbols: list[str], seconds: float,
                          interval_s: float = 0.1) -> list[float]:
    """Poll the newest trades: for each row first seen, now - recv_time in ms (an upper bound)."""
    latencies: list[float] = []
    seen: set[tuple[str, int]] = set()
    last = await conn.fetchval("SELECT max(recv_time) FROM trades")
    end = time.monotonic() + seconds
    priming = True  # the first poll only learns what is already there
    while time.monotonic() < end:
        # (symbol, trade_time) leads the primary key: an index range scan per symbol.
        rows = await conn.fetch(
            "SELECT symbol, trade_id, extract(epoch FROM clock_timestamp() - recv_time) * 1000 AS age_ms,"
            " recv_time FROM trades WHERE symbol = ANY($2::text[])"
            " AND trade_time > $1::timestamptz - interval '10 seconds'"
            " AND recv_time > $1::timestamptz - interval '5 seconds'", last, symbols)
        for row in rows:
            key = (row["symbol"], row["trade_id"])
            if key not in seen:
                seen.add(key)
                if not priming:
                    latencies.append(float(row["age_ms"]))
                if last is None or row["recv_time"] > last:
                    last = row["recv_time"]
        priming = False
        await asyncio.sleep(interval_s)
    return latencies


async def steady_phase(settings: Settings, duration_s: float) -> dict[str, Any]:
    """Rates, latencies and window latencies over `duration_s` seconds of a running pipeline."""
    conn = await asyncpg.connect(database_url(settings), timeout=10)
    try:
        started = time.monotonic()
        start_wall = await conn.fetchval("SELECT now()")
        before = await stage_counters(conn)
        observer = await asyncpg.connect(database_url(settings), timeout=10)
        try:
            observed = await observe_latency(observer, settings.symbols, duration_s)
        finally:
            await observer.close()
        after = await stage_counters(conn)
        elapsed = time.monotonic() - started
        received = _total(after.get("ingest", {}).get("received")) - _total(before.get("ingest", {}).get("received"))
        written = (_total(after.get("sink", {}).get("rows_written"))
                   - _total(before.get("sink", {}).get("rows_written")))
        sink_latency = after.get("sink", {}).get("latency_ms") or {}
        # At least one window that ended during the phase must be final (the watermark passed its end).
        first_end = await conn.fetchval("SELECT date_trunc('minute', $1::timestamptz) + interval '1 minute'",
                                        start_wall)
        deadline = time.monotonic() + WINDOW_WAIT_S
        watermark = await conn.fetchval("SELECT max(watermark) FROM spark_progress")
        while (watermark is None or watermark < first_end) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            watermark = await conn.fetchval("SELECT max(watermark) FROM spark_progress")
        windows = await conn.fetch(
            "SELECT extract(epoch FROM updated_at - window_end)::float8 AS latency_s FROM trade_metrics"
            " WHERE window_end > $1 AND window_end <= $2", start_wall, watermark) if watermark else []
        lag = await conn.fetch(
            "SELECT DISTINCT ON (group_id, topic, partition) group_id, lag FROM kafka_lag"
            " ORDER BY group_id, topic, partition, time DESC")
    finally:
        await conn.close()
    window_latencies = [row["latency_s"] for row in windows]
    lag_by_group: dict[str, int] = {}
    for row in lag:
        lag_by_group[row["group_id"]] = lag_by_group.get(row["group_id"], 0) + row["lag"]
    return {
        "duration_s": round(elapsed, 1),
        "msgs_per_s": round(received / elapsed, 1),
        "rows_per_s": round(written / elapsed, 1),
        "p50_ms": sink_latency.get("p50_ms"),
        "p99_ms": sink_latency.get("p99_ms"),
        "max_ms": sink_latency.get("max_ms"),
        "latency_rows": sink_latency.get("rows"),
        "observed_p50_ms": _round(percentile(observed, 0.50)),
        "observed_p99_ms": _round(percentile(observed, 0.99)),
        "observed_rows": len(observed),
        "window_latency_s": _round(statistics.median(window_latencies)) if window_latencies else None,
        "window_latency_max_s": _round(max(window_latencies)) if window_latencies else None,
        "windows_closed": len(window_latencies),
        "final_lag": lag_by_group,
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


async def _measure(rate: float, duration_s: float, bursts: bool, keep: bool = False) -> dict[str, Any]:
    data_dir = new_data_dir("cryptotui-bench-e2e-")
    settings = temporary_settings(data_dir)
    feed_args = f"--rate {rate:g}" + ("" if bursts else " --no-bursts")
    env = {"CRYPTOTUI_FEED_ARGS": feed_args}
    daemons: list[DaemonProcess] = []
    try:
        cold = DaemonProcess(settings, ["--source", "sim"], env, output_dir=data_dir)
        daemons.append(cold)
        cold.start()
        first_vwap_cold = await wait_first_vwap(settings, cold)
        # Let the window that was open at the first VWAP close within the measured phase.
        steady = await steady_phase(settings, max(duration_s, DEFAULT_DURATION_S))
        stopping = time.monotonic()
        if cold.stop() != 0:
            raise RuntimeError(f"the daemon did not exit cleanly:\n{cold.output_tail()}")
        shutdown_s = time.monotonic() - stopping
        leftovers = cold.tree.alive() if cold.tree else []
        warm = DaemonProcess(settings, ["--source", "sim"], env, output_dir=data_dir)
        daemons.append(warm)
        warm.start()
        first_vwap_warm = await wait_first_vwap(settings, warm)
        warm.stop()
        peak_tree = max((daemon.tree for daemon in daemons if daemon.tree), key=lambda tree: tree.peak_rss)
        return {
            "rate": rate,
            "bursts": bursts,
            **steady,
            "first_vwap_s": round(first_vwap_cold, 1),
            "first_vwap_warm_s": round(first_vwap_warm, 1),
            "shutdown_s": round(shutdown_s, 1),
            "peak_rss_mb": round(peak_tree.peak_rss / MB, 1),
            "peak_pss_mb": round(peak_tree.peak_pss / MB, 1),
            "peak_pss_by_process_mb": {name: round(pss / MB, 1) for name, pss in
                                       sorted(peak_tree.peak_breakdown.items(), key=lambda item: -item[1])},
            "leftover_processes": leftovers,
        }
    finally:
        if keep:
            for daemon in daemons:
                if daemon.running():
                    daemon.stop()
            click.echo(f"data directory kept: {data_dir} (stack stopped)", err=True)
        else:
            cleanup(settings, daemons)


@click.command("e2e")
@click.option("--rate", default=DEFAULT_RATE, show_default=True, help="Simulated messages per second.")
@click.option("--duration", default=DEFAULT_DURATION_S, show_default=True,
              help="Seconds of the measured steady phase (at least 60).")
@click.option("--bursts/--no-bursts", default=False, show_default=True, help="Simulated bursts of activity.")
@click.option("--keep", is_flag=True, help="Keep the data directory (logs) for inspection.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(rate: float, duration: float, bursts: bool, keep: bool, as_json: bool) -> None:
    """The whole pipeline on the simulator: throughput, latency, window latency, start time, memory."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so the run's cleanup (daemons, stack, data directory) happens

    signal.signal(signal.SIGTERM, interrupted)
    result = asyncio.run(_measure(rate, duration, bursts, keep))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"e2e at {rate:g} msg/s for {result['duration_s']} s: in {result['msgs_per_s']} msg/s, "
        f"written {result['rows_per_s']} rows/s, latency p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms "
        f"(observed p50 {result['observed_p50_ms']} p99 {result['observed_p99_ms']} ms), window end -> final "
        f"row {result['window_latency_s']} s, first VWAP cold {result['first_vwap_s']} s "
        f"warm {result['first_vwap_warm_s']} s, peak RSS {result['peak_rss_mb']} MB"
    )
