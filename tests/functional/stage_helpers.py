"""Running a stage as a real `cryptotui stage run NAME` process and watching its stage_status row."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import asyncpg

from cryptotui.config import Settings, child_env

STOP_DEADLINE_S = 10.0


def start_stage(settings: Settings, name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = child_env(settings)
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "cryptotui", "stage", "run", name], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


async def stage_row(db: asyncpg.Connection, name: str) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM stage_status WHERE stage = $1", name)
    if row is None:
        return None
    status = dict(row)
    status["counters"] = json.loads(status["counters"])
    return status


async def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


async def stop_stage(process: subprocess.Popen[bytes]) -> tuple[int, float, str]:
    """SIGTERM, then (exit code, seconds to exit, output)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(process.wait, STOP_DEADLINE_S + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("stage did not exit after SIGTERM") from None
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    return code, time.monotonic() - started, output


async def run_stage_until_heartbeats(settings: Settings, name: str, db: asyncpg.Connection,
                                     heartbeats: int = 2) -> dict[str, Any]:
    """Start a stage, wait for `heartbeats` distinct heartbeats, SIGTERM it; assert the contract."""
    process = start_stage(settings, name)
    try:
        seen: set[Any] = set()

        async def beating() -> bool:
            row = await stage_row(db, name)
            if row and row["state"] == "running" and row["pid"] == process.pid:
                seen.add(row["heartbeat_at"])
            return len(seen) >= heartbeats

        await wait_for(beating, timeout=60)
        code, took, output = await stop_stage(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, output
    assert took < STOP_DEADLINE_S, f"stage took {took:.1f} s to stop"
    row = await stage_row(db, name)
    assert row is not None
    return row
