"""The supervisor: owns the stack, the feed server and the stages; the daemon and the TUI both drive it.

    async with Supervisor(settings, stages=("sink", "ingest")) as supervisor:
        await supervisor.start_all()
        async for event in supervisor.events():
            ...
        print(supervisor.status().to_json())

Stages run as child processes (`python -m cryptotui stage run NAME`) and are started in dependency
order (consumers before producers: sink, lag, spark, retention, then the feed server, then ingest). A
stage that exits without being asked is restarted after an exponential backoff and its restarts are
counted; one whose `stage_status` heartbeat is too old is killed and restarted the same way. Shutdown is
the reverse with ingest first, so nothing is produced any more, then waits for the sink to have stored
everything in the topics before stopping the consumers: no message is lost or left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from cryptotui.config import Settings, child_env
from cryptotui.db.connection import connect
from cryptotui.services.base import ServiceStatus
from cryptotui.services.stack import Stack
from cryptotui.stages import STAGES
from cryptotui.supervisor.events import (
    LogLine,
    ProcessExited,
    ProcessHung,
    ProcessStarted,
    RestartScheduled,
    Role,
    ServiceStateChanged,
    StackStep,
    StateChanged,
    SupervisorError,
    SupervisorEvent,
    SupervisorStarted,
    SupervisorStopped,
)
from cryptotui.supervisor.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, RotatingLog, tail_file
from cryptotui.supervisor.process import ChildProcess, ChildSpec, end_processes

log = logging.getLogger(__name__)

FEED = "feed"
INGEST = "ingest"
SINK = "sink"
#: Start order: whoever reads a topic starts before whoever writes it. Unknown stages go before ingest.
STAGE_ORDER: tuple[str, ...] = ("sink", "lag", "spark", "retention", "alerts", "ingest")
DEFAULT_STAGES: tuple[str, ...] = tuple(name for name in STAGE_ORDER if name in STAGES)
FEED_READY_PREFIX = "feed server listening on "
FEED_START_TIMEOUT_S = 30.0
CHILDREN_FILE = "children.json"

# Process states.
STOPPED = "stopped"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
BACKOFF = "backoff"
FAILED = "failed"


class SupervisorStartError(Exception):
    """The pipeline cannot start (the stack is down, a stage cannot be started); says why."""


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before restart number n of a crashing process: initial * factor**(n-1), at most max_s.

    A process that ran at least `reset_after_s` before crashing starts again from `initial_s`.
    """

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """The delay after `failures` consecutive crashes (1 for the first crash)."""
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.initial_s * self.factor ** (failures - 1))


def order_stages(names: Iterable[str]) -> list[str]:
    """The stages in start order (known ones by STAGE_ORDER; others just before ingest)."""
    rank = {name: index for index, name in enumerate(STAGE_ORDER)}
    unknown_rank = rank[INGEST] - 0.5
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=lambda name: (rank.get(name, unknown_rank), unique.index(name)))


def feed_command(settings: Settings, port: int) -> list[str] | None:
    """The feed server for `sim` / `replay:PATH` sources (None for `binance`)."""
    base = [sys.executable, "-m", "cryptotui", "feed", "serve"]
    if settings.source == "sim":
        return [*base, "--simulate", "--symbols", ",".join(settings.symbols), "--speed", settings.speed,
                "--port", str(port)]
    if settings.source.startswith("replay:"):
        path = str(Path(settings.source.removeprefix("replay:")).expanduser().resolve())
        return [*base, "--recording", path, "--speed", settings.speed, "--port", str(port)]
    return None


def stage_command(name: str) -> list[str]:
    return [sys.executable, "-m", "cryptotui", "stage", "run", name]


@dataclass(frozen=True)
class ProcessStatus:
    """One supervised process as a UI shows it."""

    name: str
    role: Role
    state: str
    pid: int | None
    uptime_s: float | None
    restarts: int
    last_error: str | None
    last_exit_code: int | None
    heartbeat_age_s: float | None
    counters: dict[str, Any]
    log_file: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SupervisorStatus:
    """A snapshot: the services (postgres, kafka, grafana, feed) and the stages."""

    source: str
    services: tuple[ServiceStatus, ...]
    stages: tuple[ProcessStatus, ...]
    feed: ProcessStatus | None

    def stage(self, name: str) -> ProcessStatus:
        for status in self.stages:
            if status.name == name:
                return status
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "services": [service.to_json() for service in self.services],
            "stages": [stage.to_json() for stage in self.stages],
            "feed": self.feed.to_json() if self.feed else None,
        }


@dataclass
class _Managed:
    """Bookkeeping of one supervised process across its restarts."""

    name: str
    role: Role
    log: RotatingLog
    state: str = STOPPED
    wanted: bool = False
    child: ChildProcess | None = None
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    last_exit_code: int | None = None
    heartbeat_age_s: float | None = None
    heartbeat_seen: bool = False
    counters: dict[str, Any] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restart_task: asyncio.Task[None] | None = None
    watch_task: asyncio.Task[None] | None = None


class Supervisor:
    """Runs the pipeline; see the module docstring. All methods run on one asyncio loop."""

    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str] | None = None,
        *,
        stack: Stack | None = None,
        manage_stack: bool = True,
        stop_stack_on_exit: bool = False,
        backoff: BackoffPolicy | None = None,
        heartbeat_timeout_s: float | None = None,
        start_timeout_s: float = 300.0,
        poll_interval_s: float = 1.0,
        service_interval_s: float = 5.0,
        drain_timeout_s: float = 30.0,
        stop_timeout_s: float = 15.0,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
        log_backups: int = DEFAULT_BACKUPS,
        log_line_events: bool = False,
        feed_args: Sequence[str] = (),
        stage_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        names = list(DEFAULT_STAGES if stages is None else stages)
        unknown = [name for name in names if name not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(sorted(STAGES))}")
        self.stage_names: list[str] = order_stages(names)
        self.stack = stack if stack is not None else Stack(settings)
        self.manage_stack = manage_stack
        self.stop_stack_on_exit = stop_stack_on_exit
        self.backoff = backoff or BackoffPolicy()
        self.heartbeat_timeout_s = heartbeat_timeout_s or max(30.0, 15 * settings.heartbeat_s)
        self.start_timeout_s = start_timeout_s
        self.poll_interval_s = poll_interval_s
        self.service_interval_s = service_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_line_events = log_line_events
        self.feed_args = list(feed_args)
        self.stage_env = stage_env or {}
        self.uses_feed = settings.source != "binance"
        self.feed_port: int | None = settings.feed_port or None
        self._feed_ready: asyncio.Future[int] | None = None
        self._log_args = (log_max_bytes, log_backups)
        self._procs: dict[str, _Managed] = {}
        for name in self.stage_names:
            self._procs[name] = self._new_managed(name, "stage")
        if self.uses_feed:
            self._procs[FEED] = self._new_managed(FEED, "service")
        self._subscribers: list[asyncio.Queue[SupervisorEvent]] = []
        self._listeners: list[Callable[[SupervisorEvent], None]] = []
        self._services: dict[str, ServiceStatus] = {}
        self._monitor_task: asyncio.Task[None] | None = None
        self._db: asyncpg.Connection | None = None
        self._db_warned = False
        self._closing = False
        self._started = False

    def _new_managed(self, name: str, role: Role) -> _Managed:
        max_bytes, backups = self._log_args
        return _Managed(name, role, RotatingLog(self.log_path(name), max_bytes=max_bytes, backups=backups))

    # --- events ----------------------------------------------------------------------------------
    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue[SupervisorEvent]:
        """A queue receiving every event from now on (the oldest are dropped when it is full)."""
        queue: asyncio.Queue[SupervisorEvent] = asyncio.Queue(maxsize)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[SupervisorEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    async def events(self) -> AsyncIterator[SupervisorEvent]:
        """Every event from now on, as an async iterator (until the consumer stops iterating)."""
        queue = self.subscribe()
        try:
            while True:
                yield await queue.get()
        finally:
            self.unsubscribe(queue)

    def add_listener(self, listener: Callable[[SupervisorEvent], None]) -> None:
        """A callback called synchronously with every event (the daemon logs them this way)."""
        self._listeners.append(listener)

    def _emit(self, event: SupervisorEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def _set_state(self, managed: _Managed, state: str) -> None:
        if managed.state != state:
            previous, managed.state = managed.state, state
            self._emit(StateChanged(managed.name, managed.role, state, previous))

    # --- paths, logs -----------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.settings.paths.logs / f"{name}.log"

    def logs(self, name: str, lines: int = 50) -> list[str]:
        """The last lines a process wrote (from memory, else from its log file on disk)."""
        managed = self._managed(name)
        recent = managed.log.tail(lines)
        return recent if recent else tail_file(self.log_path(name), lines, backups=self._log_args[1])

    @property
    def names(self) -> list[str]:
        """Every supervised process: the stages, and `feed` when the source needs the feed server."""
        return list(self._procs)

    def _managed(self, name: str) -> _Managed:
        try:
            return self._procs[name]
        except KeyError:
            raise KeyError(f"{name!r} is not supervised here; supervised: {', '.join(self._procs)}") from None

    # --- status ----------------------------------------------------------------------------------
    def _process_status(self, managed: _Managed) -> ProcessStatus:
        child = managed.child
        active = child is not None and managed.state not in (STOPPED, BACKOFF, FAILED)
        return ProcessStatus(
            name=managed.name,
            role=managed.role,
            state=managed.state,
            pid=child.pid if child is not None and active else None,
            uptime_s=round(child.uptime_s, 3) if child is not None and active else None,
            restarts=managed.restarts,
            last_error=managed.last_error,
            last_exit_code=managed.last_exit_code,
            heartbeat_age_s=managed.heartbeat_age_s if active else None,
            counters=dict(managed.counters),
            log_file=str(self.log_path(managed.name)),
        )

    def status(self) -> SupervisorStatus:
        """A snapshot of the services and the stages (counters as of the last `stage_status` poll)."""
        feed = self._process_status(self._procs[FEED]) if FEED in self._procs else None
        services = list(self._services.values())
        if feed is not None:
            address = f"ws://127.0.0.1:{self.feed_port}" if self.feed_port else None
            services.append(ServiceStatus(
                FEED, "running" if feed.state == RUNNING else ("crashed" if feed.state in (BACKOFF, FAILED)
                                                                else "stopped"),
                pid=feed.pid, address=address,
                details={"source": self.settings.source, "speed": self.settings.speed, "restarts": feed.restarts,
                         "uptime_s": feed.uptime_s, "last_error": feed.last_error},
            ))
        return SupervisorStatus(
            source=self.settings.source,
            services=tuple(services),
            stages=tuple(self._process_status(self._procs[name]) for name in self.stage_names),
            feed=feed,
        )

    def pids(self) -> dict[str, int]:
        """PIDs of the supervised processes that run now."""
        return {name: managed.child.pid for name, managed in self._procs.items()
                if managed.child is not None and managed.child.alive and managed.child.pid is not None}

    # --- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start_stack(self) -> None:
        """Bring the stack up (start what is not running); raises SupervisorStartError with the reason."""
        if not self.manage_stack:
            await self._refresh_services()
            return
        try:
            await self.stack.up(lambda step: self._emit(StackStep(step)))
        except Exception as error:
            reason = str(error) or type(error).__name__
            self._emit(SupervisorError(f"the stack cannot start: {reason}"))
            raise SupervisorStartError(f"the stack cannot start: {reason}") from error
        await self._refresh_services()

    async def start_all(self) -> None:
        """Stack up, then every stage (and the feed server) in dependency order; returns once started."""
        self._closing = False
        await self.start_stack()
        for message in await asyncio.to_thread(self._end_orphans):
            self._emit(SupervisorError(message))
        self._ensure_monitor()
        for name in self.stage_names:
            await self.start(name)
        self._started = True
        self._emit(SupervisorStarted(tuple(self.stage_names), self.settings.source))

    async def stop_all(self) -> None:
        """Stop everything in order: ingest, the feed, wait for the sink to drain, then the rest."""
        for managed in self._procs.values():
            managed.wanted = False
            self._cancel_restart(managed)
        order = [name for name in reversed(self.stage_names) if name != INGEST]
        if INGEST in self._procs:
            await self.stop(INGEST)
        if FEED in self._procs:
            await self.stop(FEED)
        if SINK in self._procs and self._procs[SINK].child is not None and self._procs[SINK].child.alive:
            await self.drain()
        for name in order:
            await self.stop(name)

    async def close(self) -> None:
        """Stop every process, the monitor, and the stack when `stop_stack_on_exit`."""
        if self._closing:
            return
        try:
            await self.stop_all()
        finally:
            self._closing = True
            for managed in self._procs.values():  # whatever a failed stop left: by PID, now
                if managed.child is not None and managed.child.alive:
                    managed.child.kill()
                    with contextlib.suppress(Exception):
                        await managed.child.wait()
            if self._monitor_task is not None:
                self._monitor_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._monitor_task
                self._monitor_task = None
            await self._close_db()
            stopped = False
            if self.stop_stack_on_exit and self.manage_stack:
                try:
                    await self.stack.down(lambda step: self._emit(StackStep(step)))
                    stopped = True
                except Exception as error:
                    self._emit(SupervisorError(f"stopping the stack failed: {error}"))
            for managed in self._procs.values():
                managed.log.close()
            self._write_children()
            self._emit(SupervisorStopped(stopped))

    async def start(self, name: str) -> None:
        """Start one process (the feed server first when ingest needs it); a no-op when it runs."""
        managed = self._managed(name)
        managed.wanted = True
        self._cancel_restart(managed)
        self._ensure_monitor()
        if name == INGEST and FEED in self._procs:
            await self.start(FEED)
        async with managed.lock:
            if managed.child is not None and managed.child.running:
                return
            managed.failures = 0
            await self._launch(managed)
        if name == FEED:
            await self._wait_feed_ready()

    async def stop(self, name: str) -> None:
        """Stop one process (SIGTERM, then SIGKILL after the stop timeout); it stays stopped."""
        managed = self._managed(name)
        managed.wanted = False
        self._cancel_restart(managed)
        async with managed.lock:
            child = managed.child
            if child is None or not child.running:
                if managed.state in (BACKOFF, FAILED, STARTING):
                    self._set_state(managed, STOPPED)
                return
            self._set_state(managed, STOPPING)
            await child.stop(self.stop_timeout_s)
            if managed.watch_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await managed.watch_task
            self._set_state(managed, STOPPED)

    async def restart(self, name: str) -> None:
        """Stop, then start one process."""
        await self.stop(name)
        await self.start(name)

    # --- starting processes ----------------------------------------------------------------------
    def _spec(self, managed: _Managed) -> ChildSpec:
        if managed.name == FEED:
            argv = feed_command(self.settings, self.feed_port or 0)
            assert argv is not None
            return ChildSpec(FEED, [*argv, *self.feed_args], child_env(self.settings))
        settings = self.settings
        if managed.name == INGEST and self.uses_feed:
            if not self.feed_port:
                raise SupervisorStartError("the feed server has no port yet")
            settings = settings.model_copy(update={
                "binance_ws_url": f"ws://127.0.0.1:{self.feed_port}",
                "binance_rest_url": f"http://127.0.0.1:{self.feed_port}",
            })
        env = child_env(settings)
        env.update(self.stage_env.get(managed.name, {}))
        return ChildSpec(managed.name, stage_command(managed.name), env)

    def _on_line(self, managed: _Managed) -> Callable[[str], None]:
        def handle(line: str) -> None:
            if managed.name == FEED and FEED_READY_PREFIX in line:
                address = line.split(FEED_READY_PREFIX, 1)[1].strip()
                port = int(address.rsplit(":", 1)[1].split("/")[0])
                self.feed_port = port  # pinned: a restarted feed server comes back on the same port
                if self._feed_ready is not None and not self._feed_ready.done():
                    self._feed_ready.set_result(port)
                self._set_state(managed, RUNNING)
            if self.log_line_events:
                self._emit(LogLine(managed.name, line))

        return handle

    async def _launch(self, managed: _Managed) -> None:
        """Start the process of `managed` (its lock held)."""
        if managed.name == FEED:
            self._feed_ready = asyncio.get_running_loop().create_future()
        try:
            spec = self._spec(managed)
            child = ChildProcess(spec, managed.log, self._on_line(managed))
            self._set_state(managed, STARTING)
            pid = await child.start()
        except (OSError, SupervisorStartError) as error:
            managed.last_error = f"cannot start: {error}"
            self._set_state(managed, FAILED)
            self._emit(SupervisorError(managed.last_error, managed.name))
            raise SupervisorStartError(f"{managed.name}: {managed.last_error}") from error
        managed.child = child
        managed.heartbeat_seen = False
        managed.heartbeat_age_s = None
        self._write_children()
        self._emit(ProcessStarted(managed.name, managed.role, pid, managed.restarts))
        managed.watch_task = asyncio.create_task(self._watch(managed, child), name=f"watch:{managed.name}")

    async def _wait_feed_ready(self) -> None:
        managed = self._procs[FEED]
        future = self._feed_ready
        if future is None or future.done():
            return
        child = managed.child
        assert child is not None
        exited = asyncio.ensure_future(child.wait())
        try:
            done, _ = await asyncio.wait({future, exited}, timeout=FEED_START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if future not in done:
            reason = managed.last_error or "; ".join(managed.log.tail(3)) or "no output"
            raise SupervisorStartError(f"the feed server did not start: {reason}")

    # --- exits and restarts ----------------------------------------------------------------------
    async def _watch(self, managed: _Managed, child: ChildProcess) -> None:
        code = await child.wait()
        self._write_children()
        expected = not managed.wanted or managed.state == STOPPING or self._closing
        managed.last_exit_code = code
        error = None
        if not expected:
            error = await self._crash_reason(managed, child, code)
            managed.last_error = error
        self._emit(ProcessExited(managed.name, managed.role, child.pid or 0, code, expected, child.uptime_s, error))
        if expected or managed.child is not child:
            return
        # A crash: restart after a backoff (reset when it had been running long enough).
        if child.uptime_s >= self.backoff.reset_after_s:
            managed.failures = 0
        managed.failures += 1
        delay = self.backoff.delay(managed.failures)
        self._set_state(managed, BACKOFF)
        self._emit(RestartScheduled(managed.name, managed.role, delay, managed.restarts + 1))
        managed.restart_task = asyncio.create_task(self._restart_later(managed, child, delay),
                                                   name=f"restart:{managed.name}")

    async def _restart_later(self, managed: _Managed, crashed: ChildProcess, delay: float) -> None:
        await asyncio.sleep(delay)
        async with managed.lock:
            if not managed.wanted or self._closing or managed.child is not crashed:
                return
            managed.restarts += 1
            managed.restart_task = None
            try:
                await self._launch(managed)
            except SupervisorStartError:
                return
        if managed.name == FEED:
            with contextlib.suppress(SupervisorStartError):
                await self._wait_feed_ready()

    def _cancel_restart(self, managed: _Managed) -> None:
        task = managed.restart_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        managed.restart_task = None

    async def _crash_reason(self, managed: _Managed, child: ChildProcess, code: int) -> str:
        """The stage's own last_error when it wrote one, else its last output line, else the exit code."""
        if managed.role == "stage":
            row = await self._fetch_rows([managed.name])
            status = row.get(managed.name)
            if status and status["pid"] == child.pid and status["last_error"]:
                return str(status["last_error"])
        lines = [line for line in managed.log.tail(20) if line and not line.startswith("--- cryptotui supervisor")]
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        if lines:
            return f"exit code {code}: {lines[-1][-300:]}"
        return f"exit code {code}"

    # --- monitoring ------------------------------------------------------------------------------
    def _ensure_monitor(self) -> None:
        if self._monitor_task is None or self._monitor_task.done():
            self._monitor_task = asyncio.create_task(self._monitor(), name="supervisor-monitor")

    async def _monitor(self) -> None:
        """Poll `stage_status` (heartbeats, counters) and the services; never two polls at once."""
        next_services = time.monotonic() + self.service_interval_s
        while True:
            try:
                await self._poll_stages()
                if time.monotonic() >= next_services:
                    next_services = time.monotonic() + self.service_interval_s
                    await self._refresh_services(recover=True)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.exception("supervisor poll failed")
                self._emit(SupervisorError(f"poll failed: {error}"))
            await asyncio.sleep(self.poll_interval_s)

    async def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close(timeout=2)
            self._db = None

    async def _fetch_rows(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """stage_status rows of these stages with their heartbeat age; {} when the database is away."""
        try:
            if self._db is None or self._db.is_closed():
                self._db = await connect(self.settings, timeout=3)
            rows = await self._db.fetch(
                "SELECT stage, pid, state, counters, last_error,"
                " extract(epoch FROM now() - heartbeat_at)::float8 AS age"
                " FROM stage_status WHERE stage = ANY($1::text[])", list(names), timeout=3)
            self._db_warned = False
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            if not self._db_warned:
                self._db_warned = True
                self._emit(SupervisorError(f"cannot read stage_status: {error}"))
            await self._close_db()
            return {}
        except Exception as error:  # DatabaseNotReady: no password file yet
            if not self._db_warned:
                self._db_warned = True
                self._emit(SupervisorError(f"cannot read stage_status: {error}"))
            return {}
        result = {}
        for row in rows:
            counters = row["counters"]
            if isinstance(counters, str):
                counters = json.loads(counters)
            result[row["stage"]] = {**dict(row), "counters": counters}
        return result

    async def _poll_stages(self) -> None:
        running = {name: managed for name, managed in self._procs.items()
                   if managed.role == "stage" and managed.child is not None and managed.child.running}
        await asyncio.to_thread(self._track_descendants)
        if not running:
            return
        rows = await self._fetch_rows(list(running))
        for name, managed in running.items():
            child = managed.child
            assert child is not None
            row = rows.get(name)
            if row is not None and row["pid"] == child.pid:
                managed.counters = row["counters"] or {}
                managed.heartbeat_age_s = round(row["age"], 3) if row["age"] is not None else None
                if row["state"] == RUNNING:
                    managed.heartbeat_seen = True
                    if managed.state == STARTING:
                        self._set_state(managed, RUNNING)
                if row["last_error"]:
                    managed.last_error = row["last_error"]
            if managed.state == STOPPING or (not rows and self._db_warned):
                continue
            # Hung: a heartbeat older than the timeout, or none at all long after the start.
            age = managed.heartbeat_age_s if managed.heartbeat_seen else None
            hung = (age is not None and age > self.heartbeat_timeout_s) or (
                not managed.heartbeat_seen and child.uptime_s > self.start_timeout_s)
            if hung and child.alive:
                self._emit(ProcessHung(name, managed.role, child.pid or 0, age))
                managed.last_error = (f"no heartbeat for {age:.0f} s" if age is not None
                                      else f"no heartbeat {self.start_timeout_s:.0f} s after start")
                child.kill()

    def _track_descendants(self) -> None:
        for managed in self._procs.values():
            if managed.child is not None:
                managed.child.track_descendants()

    async def _refresh_services(self, recover: bool = False) -> None:
        try:
            statuses = await self.stack.status()
        except Exception as error:
            self._emit(SupervisorError(f"cannot read the services' status: {error}"))
            return
        crashed = []
        for status in statuses:
            previous = self._services.get(status.name)
            if previous is None or previous.state != status.state:
                self._emit(ServiceStateChanged(status.name, status.state, previous.state if previous else None))
            self._services[status.name] = status
            if status.state == "crashed":
                crashed.append(status.name)
        if recover and crashed and self.manage_stack and not self._closing and self._started:
            try:
                await self.stack.up(lambda step: self._emit(StackStep(step)))
            except Exception as error:
                self._emit(SupervisorError(f"restarting {', '.join(crashed)} failed: {error}"))

    # --- draining --------------------------------------------------------------------------------
    async def drain(self) -> bool:
        """Wait until the sink stored every message in the market topics (or `drain_timeout_s`)."""
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            behind = await self.sink_backlog()
            if behind == 0:
                return True
            if behind is None:
                break
            await asyncio.sleep(0.5)
        else:
            self._emit(SupervisorError(f"the sink had not caught up after {self.drain_timeout_s:.0f} s; "
                                       "the rest stays in Kafka for its next start", SINK))
            return False
        # Unknown backlog: wait until the sink's counters stop changing for a few heartbeats.
        quiet_s = self.settings.sink_batch_timeout_s + 3 * self.settings.heartbeat_s
        last: dict[str, Any] | None = None
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            rows = await self._fetch_rows([SINK])
            counters = rows.get(SINK, {}).get("counters")
            if counters != last:
                last, stable_since = counters, time.monotonic()
            elif time.monotonic() - stable_since >= quiet_s:
                return True
            await asyncio.sleep(self.settings.heartbeat_s)
        return False

    async def sink_backlog(self) -> int | None:
        """Messages in the market topics the sink has not stored yet (None when it cannot be told)."""
        try:
            rows = await self._db_fetch(
                "SELECT topic, partition, max(next_offset) AS next_offset FROM sink_offsets"
                " WHERE topic = ANY($1::text[]) GROUP BY topic, partition",
                [self.settings.market_topics[kind] for kind in self.settings.streams])
        except Exception:
            return None
        stored = {(row["topic"], row["partition"]): row["next_offset"] for row in rows}
        topics = [self.settings.market_topics[kind] for kind in self.settings.streams]
        try:
            ends = await asyncio.to_thread(_high_watermarks, self.settings, topics)
        except Exception:
            return None
        return sum(max(0, end - stored.get(key, 0)) for key, end in ends.items())

    async def _db_fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        if self._db is None or self._db.is_closed():
            self._db = await connect(self.settings, timeout=3)
        return await self._db.fetch(query, *args, timeout=5)

    # --- leftovers of a previous supervisor --------------------------------------------------------
    def _children_file(self) -> Path:
        return self.settings.paths.run / CHILDREN_FILE

    def _write_children(self) -> None:
        """Record the running children (pid and start time) so a later supervisor can end leftovers."""
        entries = {}
        for name, managed in self._procs.items():
            child = managed.child
            if child is None or not child.alive or child.pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                entries[name] = {"pid": child.pid, "create_time": psutil.Process(child.pid).create_time()}
        path = self._children_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(entries))
            tmp.replace(path)
        except OSError as error:
            log.warning("cannot write %s: %s", path, error)

    def _end_orphans(self) -> list[str]:
        """End children a previous supervisor left running (it was killed), by recorded PID."""
        try:
            entries = json.loads(self._children_file().read_text())
        except (OSError, ValueError):
            return []
        messages = []
        mine = set(self.pids().values())
        leftovers = []
        for name, entry in entries.items():
            with contextlib.suppress(psutil.Error, KeyError, TypeError):
                proc = psutil.Process(int(entry["pid"]))
                if proc.pid not in mine and abs(proc.create_time() - float(entry["create_time"])) < 0.01:
                    leftovers.extend([proc, *proc.children(recursive=True)])
                    messages.append(f"ending {name} (pid {proc.pid}) left running by a previous supervisor")
        end_processes(leftovers)
        return messages


def _high_watermarks(settings: Settings, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """{(topic, partition): high watermark} through the Kafka client API."""
    from confluent_kafka import Consumer, TopicPartition

    from cryptotui.services.kafka import bootstrap_servers

    consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings), "group.id": "cryptotui-supervisor",
                         "enable.auto.commit": False, "socket.timeout.ms": 5000})
    try:
        metadata = consumer.list_topics(timeout=5)
        result = {}
        for topic in topics:
            described = metadata.topics.get(topic)
            if described is None or described.error is not None:
                continue
            for partition in described.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
                result[(topic, partition)] = high
        return result
    finally:
        consumer.close()
