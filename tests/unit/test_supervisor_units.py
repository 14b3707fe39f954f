"""Supervisor building blocks without services: backoff, stage order, log rotation and tail, pid file,
the daemon's summary line, child processes (start, output capture, stop by PID, leftover children)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from cryptotui.supervisor.events import ProcessExited, StateChanged
from cryptotui.supervisor.logs import RotatingLog, tail_file
from cryptotui.supervisor.pidfile import AlreadyRunning, PidFile, read_pid
from cryptotui.supervisor.process import ChildProcess, ChildSpec
from cryptotui.supervisor.summary import Summary, SummaryTracker, counter, rate
from cryptotui.supervisor.supervisor import BackoffPolicy, feed_command, order_stages


# --- backoff and order --------------------------------------------------------------------------
def test_backoff_doubles_up_to_the_cap() -> None:
    policy = BackoffPolicy(initial_s=1, factor=2, max_s=10)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(0) == 0


def test_stages_start_consumers_first_and_ingest_last() -> None:
    assert order_stages(["ingest", "retention", "spark", "sink", "lag"]) == ["sink", "lag", "spark", "retention",
                                                                             "ingest"]
    assert order_stages(["ingest", "custom", "sink"]) == ["sink", "custom", "ingest"]
    assert order_stages(["sink", "sink"]) == ["sink"]


def test_feed_command_follows_the_source(tmp_path: Path) -> None:
    from cryptotui.config import load_settings

    assert feed_command(load_settings(source="binance"), 0) is None
    sim = feed_command(load_settings(source="sim", speed="5"), 0)
    assert sim is not None and "--simulate" in sim and sim[sim.index("--speed") + 1] == "5"
    assert sim[sim.index("--symbols") + 1] == "BTCUSDT,ETHUSDT,BNBUSDT"
    replay = feed_command(load_settings(source=f"replay:{tmp_path}/x.jsonl", speed="max"), 4321)
    assert replay is not None and replay[replay.index("--recording") + 1] == f"{tmp_path}/x.jsonl"
    assert replay[replay.index("--port") + 1] == "4321" and replay[replay.index("--speed") + 1] == "max"


# --- logs ---------------------------------------------------------------------------------------
def test_log_rotates_at_max_bytes_and_keeps_n_backups(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "sink.log", max_bytes=100, backups=2, keep_lines=1000)
    for index in range(50):
        log.write(f"line {index:03d} " + "x" * 10)  # 20 bytes with the newline
    log.close()
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["sink.log", "sink.log.1", "sink.log.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 100
    # Newest lines are in sink.log, the ones before in .1 then .2; the oldest were dropped.
    assert (tmp_path / "sink.log").read_text().splitlines()[-1].startswith("line 049")
    assert (tmp_path / "sink.log.1").read_text().splitlines()[-1].startswith("line 044")
    assert "line 000" not in "".join(path.read_text() for path in tmp_path.iterdir())


def test_tail_from_memory_and_from_disk_across_a_rotation(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "x.log", max_bytes=60, backups=3, keep_lines=5)
    for index in range(10):
        log.write(f"l{index}")
    assert log.tail(3) == ["l7", "l8", "l9"]
    assert log.tail(100) == ["l5", "l6", "l7", "l8", "l9"], "memory keeps keep_lines"
    log.close()
    assert tail_file(tmp_path / "x.log", 10) == [f"l{index}" for index in range(10)]
    assert tail_file(tmp_path / "x.log", 2) == ["l8", "l9"]
    assert tail_file(tmp_path / "missing.log", 5) == []


def test_log_appends_to_an_existing_file_and_survives_long_and_odd_lines(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("old\n")
    log = RotatingLog(tmp_path / "a.log", max_bytes=1_000_000)
    log.write("new\r\n")
    log.write("\udcff bad surrogate")
    log.close()
    assert tail_file(tmp_path / "a.log", 5)[:2] == ["old", "new"]


# --- pid file -----------------------------------------------------------------------------------
def test_pid_file_holds_our_pid_and_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "run" / "daemon.pid"
    with PidFile(path):
        assert read_pid(path) == os.getpid()
    assert not path.exists()


def test_stale_pid_file_of_a_dead_process_is_replaced(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "daemon.pid"
    path.write_text(f"{dead.pid}\n")
    pid_file = PidFile(path)
    pid_file.acquire()
    try:
        assert read_pid(path) == os.getpid()
    finally:
        pid_file.release()


def test_second_daemon_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "daemon.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from cryptotui.supervisor.pidfile import PidFile
            PidFile({str(path)!r}).acquire()
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning) as refused:
            PidFile(path).acquire()
        assert refused.value.pid == holder.pid
        assert str(holder.pid) in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    # Killed without cleanup: the file stays but is no longer locked, so it is taken over.
    assert path.exists()
    with PidFile(path):
        assert read_pid(path) == os.getpid()


# --- summary ------------------------------------------------------------------------------------
def test_rates_between_samples_and_after_a_counter_reset() -> None:
    assert rate(None, 100, 10) is None
    assert rate(100, 300, 10) == 20
    assert rate(300, 50, 10) == 5, "a restarted stage counts from zero"
    assert rate(1, None, 10) is None
    assert counter({"rows_written": 7, "rows": 9}, ("rows_written", "rows")) == 7
    assert counter({"rows": {"total": 4}}, ("rows_written", "rows")) == 4
    assert counter({"rows": True}, ("rows",)) is None
    assert counter({"rows_written": {"trades": 3, "book_ticker": 4}}, ("rows_written",)) == 7


def test_summary_line_names_every_figure() -> None:
    tracker = SummaryTracker(10)
    assert tracker.rates(0.0, 1000, 500) == (None, None)
    assert tracker.rates(10.0, 21000, 20500) == (2000, 2000)
    summary = Summary(10, 2000.0, 1995.5, lag={"sink": 12, "spark": 340}, spark_batch=57, spark_rows=4120,
                      spark_age_s=3.0, alerts=1, flagged_windows=2, stages_running=5, stages_total=5, restarts=1)
    line = summary.line()
    assert line == ("in 2,000.0 msg/s | written 1,995.5 rows/s | lag sink=12 spark=340 | "
                    "spark batch #57 (4,120 rows, 3 s ago) | alerts 1 (flagged windows 2) | "
                    "stages 5/5 up, 1 restarts")
    empty = Summary(10).line()
    assert empty.startswith("in - | written - | lag - | spark batch - |")
    assert summary.to_json()["msgs_in_per_s"] == 2000.0


async def test_summary_sample_without_a_database_uses_counters() -> None:
    tracker = SummaryTracker(10)
    await tracker.sample(None, {"ingest": {"messages_in": 0}, "sink": {"rows_written": 0}}, now=0.0)
    summary = await tracker.sample(None, {"ingest": {"messages_in": 500}, "sink": {"rows_written": 400}},
                                   running=2, total=2, now=5.0)
    assert summary.msgs_in_per_s == 100 and summary.rows_per_s == 80
    assert summary.stages_running == 2


# --- events -------------------------------------------------------------------------------------
def test_events_have_a_kind_a_level_and_json() -> None:
    crash = ProcessExited("sink", "stage", 42, -9, expected=False, uptime_s=3.0, last_error="killed by SIGKILL")
    assert crash.kind == "process_exited" and crash.level == "error"
    assert "crashed" in crash.message() and "SIGKILL" in crash.message()
    assert ProcessExited("sink", "stage", 42, 0, expected=True, uptime_s=3.0).level == "info"
    data = StateChanged("sink", "stage", "running", "starting").to_json()
    assert data["event"] == "state_changed" and data["state"] == "running" and "time" in data


# --- child processes ----------------------------------------------------------------------------
async def test_child_output_goes_to_its_log_and_stop_terminates_it(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
        print("hello out", flush=True)
        print("hello err", file=sys.stderr, flush=True)
        time.sleep(60)
    """)
    seen: list[str] = []
    child = ChildProcess(ChildSpec("demo", [sys.executable, "-c", script]), RotatingLog(tmp_path / "demo.log"),
                         seen.append)
    pid = await child.start()
    for _ in range(100):
        if "hello err" in seen:
            break
        await asyncio.sleep(0.05)
    assert {"hello out", "hello err"} <= set(seen)
    assert os.getpgid(pid) == pid, "the child leads its own process group"
    code = await child.stop(timeout=5)
    assert code == 0 and not child.running
    assert "got SIGTERM" in child.log.tail(10)
    child.log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "hello out" in text and f"pid {pid} exited with 0" in text


async def test_child_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
             "time.sleep(60)"
    child = ChildProcess(ChildSpec("stubborn", [sys.executable, "-c", script]), RotatingLog(tmp_path / "s.log"))
    await child.start()
    await asyncio.sleep(0.5)
    started = time.monotonic()
    code = await child.stop(timeout=1)
    assert code == -9 and time.monotonic() - started < 5


async def test_grandchildren_do_not_outlive_a_killed_child(tmp_path: Path) -> None:
    """Like a Spark stage's JVM: the stage is SIGKILLed, the process it started must end too."""
    script = textwrap.dedent("""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"grandchild {grandchild.pid}", flush=True)
        time.sleep(120)
    """)
    lines: list[str] = []
    child = ChildProcess(ChildSpec("parent", [sys.executable, "-c", script]), RotatingLog(tmp_path / "p.log"),
                         lines.append)
    await child.start()
    for _ in range(100):
        if any(line.startswith("grandchild") for line in lines):
            break
        await asyncio.sleep(0.05)
    grandchild_pid = int(next(line for line in lines if line.startswith("grandchild")).split()[1])
    grandchild = psutil.Process(grandchild_pid)
    child.kill()
    assert await child.wait() == -9
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
