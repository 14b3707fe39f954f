"""The contract every stage keeps: start, run until SIGTERM/SIGINT, flush, report status.

A stage is a class with `setup()`, `run()` (works until cancelled), `flush()` (writes out what is
buffered once `run()` was cancelled) and `close()`; it keeps its figures in `self.counters`. The
`StageRunner` does the rest the same way for every stage: applies the schema, handles signals, writes a
heartbeat with the counters to `stage_status` every `heartbeat_s`, and exits 0 within 10 s of a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg

from cryptotui.config import Settings
from cryptotui.db.connection import connect
from cryptotui.db.schema import apply_schema

log = logging.getLogger(__name__)

# A stage must exit within 10 s of SIGTERM; leave room for the final status write.
CANCEL_TIMEOUT_S = 2.0
FLUSH_TIMEOUT_S = 5.0
EXIT_OK = 0
EXIT_FAILED = 1


class Stage(ABC):
    """One step of the pipeline, run by `cryptotui stage run NAME` in its own process."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counters: dict[str, Any] = {}
        self.log = logging.getLogger(f"cryptotui.stages.{self.name}")

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Connect to what the stage needs; runs before `run()`."""

    @abstractmethod
    async def run(self) -> None:
        """Do the stage's work until cancelled (or return when there is nothing more to do)."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Write out whatever is buffered; runs after `run()` was cancelled by a signal."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; runs last, also after a failure."""

    def status(self) -> dict[str, Any]:
        """The counters written with every heartbeat (stages may add computed values)."""
        return dict(self.counters)


class StatusReporter:
    """Writes one stage's row in `stage_status`, reconnecting when the database comes back."""

    def __init__(self, settings: Settings, stage: str) -> None:
        self._settings = settings
        self._stage = stage
        self._conn: asyncpg.Connection | None = None
        self.started_at = datetime.now(UTC)

    async def write(self, state: str, counters: dict[str, Any], last_error: str | None = None) -> bool:
        """Upsert the row; False when the database cannot be reached (the stage keeps running)."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self._settings, timeout=3)
            await self._conn.execute(
                "INSERT INTO stage_status (stage, pid, state, started_at, heartbeat_at, counters, last_error)"
                " VALUES ($1, $2, $3, $4, now(), $5::jsonb, $6)"
                " ON CONFLICT (stage) DO UPDATE SET pid = EXCLUDED.pid, state = EXCLUDED.state,"
                " started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at,"
                " counters = EXCLUDED.counters, last_error = EXCLUDED.last_error",
                self._stage,
                os.getpid(),
                state,
                self.started_at,
                json.dumps(counters, default=str),
                last_error,
                timeout=3,
            )
            return True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            log.warning("cannot write stage_status for %s: %s", self._stage, error)
            await self.close()
            return False

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
            self._conn = None


async def prepare_database(settings: Settings) -> None:
    """Apply the schema (idempotent): every stage does it at start, so any start order works."""
    conn = await connect(settings)
    try:
        await apply_schema(conn, settings.timescaledb)
    finally:
        await conn.close()


async def cancel_and_wait(task: asyncio.Task[None], timeout: float) -> None:
    """Cancel a task and wait until it has really ended, cancelling again if needed.

    On Python 3.11 `asyncio.wait_for` can swallow a cancellation that arrives just as its awaitable
    completes, so a loop around it may survive one cancel; repeating it keeps the 10 s exit promise.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not task.done():
        task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.error("task %s ignored cancellation for %.1f s; exiting without it", task.get_name(), timeout)
            return
        await asyncio.wait({task}, timeout=min(0.5, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r while stopping", task.get_name(), task.exception())


class StageRunner:
    """Runs one stage under the contract; `await runner.run()` returns the process exit code."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.reporter = StatusReporter(stage.settings, stage.name)
        self._stop = asyncio.Event()
        self._state = "starting"
        self._error: str | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def _heartbeat(self) -> None:
        while True:
            await self.reporter.write(self._state, self.stage.status(), self._error)
            await asyncio.sleep(self.stage.settings.heartbeat_s)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> int:
        self._install_signal_handlers()
        started = time.monotonic()
        heartbeat: asyncio.Task[None] | None = None
        try:
            await prepare_database(self.stage.settings)
            await self.stage.setup()
            self._state = "running"
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            work = asyncio.create_task(self.stage.run(), name=f"stage:{self.stage.name}")
            stopper = asyncio.create_task(self._stop.wait(), name="stop-signal")
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                stopper.cancel()
                work.result()  # raises the stage's failure
                log.info("stage %s finished its work", self.stage.name)
            else:
                log.info("stage %s stopping on signal", self.stage.name)
                self._state = "stopping"
                await cancel_and_wait(work, CANCEL_TIMEOUT_S)
                await asyncio.wait_for(self.stage.flush(), FLUSH_TIMEOUT_S)
            self._state = "stopped"
            return EXIT_OK
        except Exception as error:
            log.exception("stage %s failed", self.stage.name)
            self._state = "failed"
            self._error = f"{type(error).__name__}: {error}"
            return EXIT_FAILED
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.stage.close(), 2)
            await self.reporter.write(self._state, self.stage.status(), self._error)
            await self.reporter.close()
            log.info("stage %s %s after %.1f s", self.stage.name, self._state, time.monotonic() - started)
