"""`cryptotui --daemon` as a real process: the whole pipeline on the simulator, its log, its exit.

Each test uses its own data directory under /tmp (mode 0755: as root PostgreSQL runs as `postgres`,
which must traverse it) and free ports, so it never touches a developer's stack.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import asyncpg
import pytest

from cryptotui.bench.e2e import DaemonProcess, cleanup, connect_when_ready, new_data_dir
from cryptotui.config import Settings, child_env
from cryptotui.services.stack import temporary_settings
from cryptotui.supervisor.pidfile import read_pid

RAW = {"trades": "trade_time", "agg_trades": "trade_time", "book_ticker": "recv_time"}
RUN_S = 120.0
MAX_WAIT_S = 360.0


@dataclass
class Run:
    """A data directory with free ports, and the daemons started on it (all cleaned up afterwards)."""

    settings: Settings
    daemons: list[DaemonProcess] = field(default_factory=list)

    def start(self, *args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.settings, list(args), env or {})
        self.daemons.append(daemon)
        daemon.start()
        return daemon


@pytest.fixture
def run() -> Iterator[Run]:
    own = Run(temporary_settings(new_data_dir("cryptotui-e2e-")))
    yield own
    cleanup(own.settings, own.daemons)


async def pipeline_complete(conn: asyncpg.Connection, symbols: list[str]) -> dict[str, bool]:
    """Which of the end-to-end conditions hold now."""
    done: dict[str, bool] = {}
    for table in RAW:
        found = {row["symbol"] for row in await conn.fetch(f"SELECT DISTINCT symbol FROM {table}")}
        done[table] = found >= set(symbols)
    watermark = await conn.fetchval("SELECT max(watermark) FROM spark_progress")
    closed = await conn.fetch("SELECT DISTINCT symbol FROM trade_metrics WHERE window_end <= $1 AND vwap IS NOT NULL",
                              watermark) if watermark else []
    done["closed_windows"] = {row["symbol"] for row in closed} >= set(symbols)
    done["kafka_lag"] = bool(await conn.fetchval("SELECT count(*) FROM kafka_lag"))
    done["spark_progress"] = bool(await conn.fetchval("SELECT count(*) FROM spark_progress"))
    return done


async def vwap_mismatches(conn: asyncpg.Connection) -> tuple[int, list[str]]:
    """Closed windows checked against a SQL recomputation over the stored trades; (checked, mismatches)."""
    watermark = await conn.fetchval("SELECT max(watermark) FROM spark_progress")
    rows = await conn.fetch(
        "SELECT m.symbol, m.window_start, m.vwap, m.trade_count,"
        " (SELECT sum(t.price * t.qty) / sum(t.qty) FROM trades t WHERE t.symbol = m.symbol"
        "   AND t.trade_time >= m.window_start AND t.trade_time < m.window_end) AS recomputed,"
        " (SELECT count(*) FROM trades t WHERE t.symbol = m.symbol"
        "   AND t.trade_time >= m.window_start AND t.trade_time < m.window_end) AS stored_trades"
        " FROM trade_metrics m WHERE m.window_end <= $1 ORDER BY m.window_start, m.symbol", watermark)
    bad = []
    for row in rows:
        vwap, recomputed = row["vwap"], row["recomputed"]
        if vwap is None or recomputed is None or abs(vwap - recomputed) / abs(recomputed) > Decimal("1e-9"):
            bad.append(f"{row['symbol']} {row['window_start']}: vwap {vwap} vs SQL {recomputed} "
                       f"({row['trade_count']} vs {row['stored_trades']} trades)")
    return len(rows), bad


@pytest.mark.e2e
@pytest.mark.spark
async def test_daemon_runs_the_whole_pipeline_on_the_simulator_and_stops_cleanly(run: Run) -> None:
    settings = run.settings
    daemon = run.start("--source", "sim", env={"CRYPTOTUI_FEED_ARGS": "--rate 500"})
    conn = await connect_when_ready(settings, time.monotonic() + 120)
    try:
        done: dict[str, bool] = {}
        while time.monotonic() - daemon.started_at < MAX_WAIT_S:
            assert daemon.running(), f"the daemon exited:\n{daemon.output_tail()}"
            done = await pipeline_complete(conn, settings.symbols)
            if all(done.values()) and time.monotonic() - daemon.started_at >= RUN_S:
                break
            await asyncio.sleep(2)
        assert all(done.values()), f"not reached in {MAX_WAIT_S:.0f} s: {done}\n{daemon.output_tail()}"
        checked, bad = await vwap_mismatches(conn)
        assert checked >= len(settings.symbols) and not bad, "\n".join(bad)
        assert await conn.fetchval("SELECT count(*) FROM stage_status WHERE state = 'running'") == 5
    finally:
        await conn.close()

    assert daemon.tree is not None
    daemon.tree.sample()
    recorded = set(daemon.tree.seen)
    assert len(recorded) >= 8, "daemon, feed, five stages, the Spark JVM (and the services)"
    code = daemon.stop(signal.SIGTERM, timeout=120)
    assert code == 0, daemon.output_tail()
    left = daemon.tree.alive()
    assert not left, f"still running after the daemon exited: {left}"
    assert not (settings.paths.run / "daemon.pid").exists()

    lines = daemon.log_lines()
    assert lines and all("level" in line and "message" in line for line in lines), "JSON lines on stdout"
    summaries = [line for line in lines if line.get("event") == "summary"]
    assert summaries, "a summary every 10 s"
    assert any(line["msgs_in_per_s"] and line["rows_per_s"] for line in summaries)
    assert any(line["spark_batch"] is not None and line["lag"] for line in summaries)
    assert lines[-1]["event"] == "daemon_stopped"
    crashes = [line for line in lines if line.get("event") == "process_exited" and not line.get("expected")]
    assert not crashes, crashes
    for name in ("sink", "ingest", "lag", "spark", "retention", "feed", "daemon"):
        assert (settings.paths.logs / f"{name}.log").exists(), name


@pytest.mark.e2e
def test_daemon_exits_1_with_the_reason_when_the_stack_cannot_start(run: Run) -> None:
    own_settings = run.settings
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", own_settings.postgres_port))
        blocker.listen()
        result = subprocess.run([sys.executable, "-m", "cryptotui", "--daemon", "--source", "sim"],
                                env=child_env(own_settings), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"port {own_settings.postgres_port}" in result.stderr and "CRYPTOTUI_POSTGRES_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert '"event": "start_failed"' in result.stdout
    assert not (own_settings.paths.run / "daemon.pid").exists()


@pytest.mark.e2e
async def test_second_daemon_on_the_same_data_dir_is_refused_and_sigint_stops_the_first(run: Run) -> None:
    own_settings = run.settings
    env = {"CRYPTOTUI_STAGES": "retention"}
    first = run.start(env=env)
    pid_file = own_settings.paths.run / "daemon.pid"
    deadline = time.monotonic() + 60
    while read_pid(pid_file) != first.proc.pid and time.monotonic() < deadline:  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "cryptotui", "--daemon"], env={**child_env(own_settings), **env},
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"pid {first.proc.pid}" in second.stderr  # type: ignore[union-attr]
    assert "another cryptotui daemon" in second.stderr
    assert first.running()
    # Wait until it runs its stage, then Ctrl-C.
    conn = await connect_when_ready(own_settings, time.monotonic() + 120)
    try:
        while not await conn.fetchval("SELECT count(*) FROM stage_status WHERE stage = 'retention'"
                                      " AND state = 'running'"):
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert first.stop(signal.SIGINT, timeout=60) == 0
    assert first.tree is not None and not first.tree.alive()
    assert not pid_file.exists()


@pytest.mark.e2e
def test_stale_pid_file_of_a_dead_daemon_is_replaced(run: Run) -> None:
    own_settings = run.settings
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    own_settings.paths.run.mkdir(parents=True, exist_ok=True)
    (own_settings.paths.run / "daemon.pid").write_text(f"{dead.pid}\n")
    daemon = run.start(env={"CRYPTOTUI_STAGES": "retention"})
    deadline = time.monotonic() + 60
    while read_pid(own_settings.paths.run / "daemon.pid") != daemon.proc.pid:  # type: ignore[union-attr]
        assert time.monotonic() < deadline and daemon.running(), daemon.output_tail()
        time.sleep(0.05)
    # Stopped right away, while it is still starting: still a clean exit, nothing left behind.
    assert daemon.stop(signal.SIGTERM, timeout=60) == 0, daemon.output_tail()
    assert daemon.tree is not None and not daemon.tree.alive()
    assert not (own_settings.paths.run / "daemon.pid").exists()
