"""The supervisor against the real stack with the retention stage: what a UI does with it.

Start, stop and restart a stage on request, crash recovery after SIGKILL with counted restarts, a hung
stage (no heartbeat) killed and restarted, log files and their last lines, the event stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import psutil
import pytest_asyncio

from cryptotui.config import Settings
from cryptotui.services.stack import Stack
from cryptotui.supervisor import (
    BackoffPolicy,
    ProcessExited,
    ProcessHung,
    RestartScheduled,
    Supervisor,
    SupervisorEvent,
)

FAST_BACKOFF = BackoffPolicy(initial_s=0.2, factor=2, max_s=2, reset_after_s=60)


@pytest_asyncio.fixture
async def supervisor(stack: Stack, settings: Settings) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(settings, stages=["retention"], stack=stack, manage_stack=False, backoff=FAST_BACKOFF,
                            poll_interval_s=0.3, heartbeat_timeout_s=4)
    try:
        yield supervisor
    finally:
        pids = [pid for pid in supervisor.pids().values()]
        await supervisor.close()
        for pid in pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def until(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout} s")


def drain(queue: asyncio.Queue[SupervisorEvent]) -> list[SupervisorEvent]:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


async def test_start_all_runs_the_stage_and_reports_its_heartbeat_and_counters(supervisor: Supervisor) -> None:
    events = supervisor.subscribe()
    await supervisor.start_all()
    await until(lambda: supervisor.status().stage("retention").state == "running", what="retention running")
    await until(lambda: supervisor.status().stage("retention").counters.get("passes", 0) >= 1, what="counters")
    status = supervisor.status().stage("retention")
    assert status.pid == supervisor.pids()["retention"]
    assert status.heartbeat_age_s is not None and status.heartbeat_age_s < 5
    assert status.uptime_s is not None and status.uptime_s > 0
    assert status.restarts == 0 and status.last_error is None
    services = {service.name: service.state for service in supervisor.status().services}
    assert services["postgres"] == "running" and services["kafka"] == "running"
    kinds = [event.kind for event in drain(events)]
    assert kinds.index("process_started") < kinds.index("supervisor_started")
    assert "state_changed" in kinds
    assert supervisor.status().to_json()["stages"][0]["name"] == "retention"


async def test_stage_restarts_after_sigkill_and_restarts_are_counted(supervisor: Supervisor) -> None:
    events = supervisor.subscribe()
    await supervisor.start_all()
    for round_ in (1, 2):
        await until(lambda: supervisor.status().stage("retention").state == "running", what="running")
        pid = supervisor.pids()["retention"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda pid=pid: supervisor.pids().get("retention") not in (None, pid), what="restarted")
        await until(lambda: supervisor.status().stage("retention").state == "running", what="running again")
        status = supervisor.status().stage("retention")
        assert status.restarts == round_
        assert status.last_error == "killed by SIGKILL"
        assert status.last_exit_code == -signal.SIGKILL
    seen = drain(events)
    crashes = [event for event in seen if isinstance(event, ProcessExited)]
    assert len(crashes) == 2 and not any(crash.expected for crash in crashes)
    delays = [event.delay_s for event in seen if isinstance(event, RestartScheduled)]
    assert delays == [0.2, 0.4], "consecutive crashes back off exponentially"


async def test_stop_start_and_restart_on_request(supervisor: Supervisor) -> None:
    await supervisor.start_all()
    await until(lambda: supervisor.status().stage("retention").state == "running", what="running")
    first = supervisor.pids()["retention"]
    await supervisor.stop("retention")
    status = supervisor.status().stage("retention")
    assert status.state == "stopped" and status.pid is None and status.last_exit_code == 0
    assert not psutil.pid_exists(first)
    await asyncio.sleep(1.5)
    assert supervisor.status().stage("retention").state == "stopped", "a stopped stage is not restarted"
    await supervisor.start("retention")
    await until(lambda: supervisor.status().stage("retention").state == "running", what="started again")
    second = supervisor.pids()["retention"]
    await supervisor.restart("retention")
    third = supervisor.pids()["retention"]
    assert len({first, second, third}) == 3
    assert supervisor.status().stage("retention").restarts == 0, "requested restarts are not crashes"


async def test_hung_stage_is_killed_and_restarted(supervisor: Supervisor) -> None:
    events = supervisor.subscribe()
    await supervisor.start_all()
    await until(lambda: supervisor.status().stage("retention").state == "running", what="running")
    pid = supervisor.pids()["retention"]
    os.kill(pid, signal.SIGSTOP)  # alive, but no heartbeat any more
    try:
        await until(lambda: supervisor.pids().get("retention") not in (None, pid), timeout=30, what="replaced")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
    hung = [event for event in drain(events) if isinstance(event, ProcessHung)]
    assert hung and hung[0].pid == pid and hung[0].heartbeat_age_s is not None and hung[0].heartbeat_age_s > 4
    await until(lambda: supervisor.status().stage("retention").state == "running", what="running again")
    assert supervisor.status().stage("retention").restarts == 1


async def test_output_goes_to_a_log_file_and_last_lines_are_available(supervisor: Supervisor,
                                                                     settings: Settings) -> None:
    await supervisor.start_all()
    await until(lambda: supervisor.status().stage("retention").state == "running", what="running")
    await supervisor.stop("retention")
    lines = supervisor.logs("retention", 20)
    assert any("stage retention stopping on signal" in line for line in lines)
    path = settings.paths.logs / "retention.log"
    assert supervisor.status().stage("retention").log_file == str(path)
    assert "stage retention stopped after" in path.read_text()
    # A new supervisor (a restarted UI) reads the same last lines from disk.
    later = Supervisor(settings, stages=["retention"], manage_stack=False)
    assert later.logs("retention", 5)[-1] == lines[-1]


async def test_children_left_by_a_killed_supervisor_are_ended_at_the_next_start(supervisor: Supervisor,
                                                                               settings: Settings) -> None:
    """A daemon SIGKILLed cannot stop its stages; the next one ends them by their recorded PID."""
    import json
    import subprocess
    import sys

    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        settings.paths.run.mkdir(parents=True, exist_ok=True)
        (settings.paths.run / "children.json").write_text(json.dumps(
            {"retention": {"pid": leftover.pid, "create_time": psutil.Process(leftover.pid).create_time()}}))
        await supervisor.start_all()
        assert leftover.wait(10) is not None
        assert supervisor.pids()["retention"] != leftover.pid
        recorded = json.loads((settings.paths.run / "children.json").read_text())
        assert recorded["retention"]["pid"] == supervisor.pids()["retention"]
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
