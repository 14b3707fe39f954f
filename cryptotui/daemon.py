"""`cryptotui --daemon`: the supervisor without a UI.

Logs one JSON object per line to stdout and to `<logs>/daemon.log` (the stages' own output goes to
`<logs>/<stage>.log`), prints a summary every 10 s, stops cleanly on SIGTERM/SIGINT (exit 0) and exits
1 with the reason when the stack cannot start. A locked pid file (`<data_dir>/run/daemon.pid`) keeps a
second daemon off the same data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import shlex
import signal
import sys
from typing import Any

from cryptotui.config import Settings
from cryptotui.logs import JsonFormatter
from cryptotui.supervisor.events import SupervisorEvent
from cryptotui.supervisor.pidfile import AlreadyRunning, PidFile
from cryptotui.supervisor.summary import SummaryTracker
from cryptotui.supervisor.supervisor import Supervisor, SupervisorStartError

log = logging.getLogger("cryptotui.daemon")

EXIT_OK = 0
EXIT_FAILED = 1
SUMMARY_INTERVAL_S = 10.0
PID_FILE = "daemon.pid"
DAEMON_LOG = "daemon.log"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(settings: Settings) -> None:
    """JSON lines on stdout and in the rotating `daemon.log`."""
    formatter = JsonFormatter()
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(formatter)
    handlers: list[logging.Handler] = [stdout]
    try:
        settings.paths.logs.mkdir(parents=True, exist_ok=True)
        to_file = logging.handlers.RotatingFileHandler(
            settings.paths.logs / DAEMON_LOG, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8")
        to_file.setFormatter(formatter)
        handlers.append(to_file)
    except OSError as error:
        print(f"cryptotui: cannot write {settings.paths.logs / DAEMON_LOG}: {error}", file=sys.stderr)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(settings.log_level)
    for noisy in ("aiokafka", "kafka", "py4j", "asyncio", "websockets", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))


def log_event(event: SupervisorEvent) -> None:
    """One supervisor event as one log line (its fields as JSON keys)."""
    fields = event.to_json()
    fields.pop("time", None)
    log.log(_LEVELS.get(event.level, logging.INFO), event.message(), extra={"fields": fields})



async def _summaries(supervisor: Supervisor, interval_s: float) -> None:
    """Log a summary every `interval_s` until cancelled."""
    tracker = SummaryTracker(interval_s)
    while True:
        await asyncio.sleep(interval_s)
        status = supervisor.status()
        counters = {stage.name: stage.counters for stage in status.stages}
        running = sum(stage.state == "running" for stage in status.stages)
        restarts = sum(stage.restarts for stage in (*status.stages, *([status.feed] if status.feed else [])))
        conn = None
        try:
            from cryptotui.db.connection import connect

            conn = await connect(supervisor.settings, timeout=3)
            summary = await tracker.sample(conn, counters, running, len(status.stages), restarts)
        except Exception as error:  # the database is away: report what the counters say
            log.debug("summary without the database: %s", error)
            summary = await tracker.sample(None, counters, running, len(status.stages), restarts)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        log.info("summary: " + summary.line(), extra={"fields": {"event": "summary", **summary.to_json()}})


async def run_supervisor(settings: Settings, stop_stack_on_exit: bool, stop: asyncio.Event,
                         summary_interval_s: float = SUMMARY_INTERVAL_S, **supervisor_options: Any) -> int:
    """Run the pipeline until `stop` is set; the exit code."""
    supervisor_options.setdefault("stages", settings.stages)
    supervisor_options.setdefault("feed_args", shlex.split(settings.feed_args))
    try:
        supervisor = Supervisor(settings, stop_stack_on_exit=stop_stack_on_exit, **supervisor_options)
    except ValueError as error:  # an unknown stage name
        log.error(str(error))
        print(f"cryptotui: {error}", file=sys.stderr)
        return EXIT_FAILED
    supervisor.add_listener(log_event)
    log.info("cryptotui daemon starting", extra={"fields": {
        "event": "daemon_starting", "pid": os.getpid(), "data_dir": str(settings.data_dir),
        "source": settings.source, "speed": settings.speed, "stages": supervisor.stage_names}})
    code = EXIT_OK
    summaries: asyncio.Task[None] | None = None
    try:
        starting = asyncio.create_task(supervisor.start_all(), name="start-all")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while starting")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, SupervisorStartError):
                await starting
        else:
            starting.result()
            summaries = asyncio.create_task(_summaries(supervisor, summary_interval_s), name="summaries")
            await stopping
        log.info("stopping: signal received")
    except SupervisorStartError as error:
        log.error(f"cannot start: {error}", extra={"fields": {"event": "start_failed", "reason": str(error)}})
        print(f"cryptotui: cannot start: {error}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        if summaries is not None:
            summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await summaries
        await supervisor.close()
    log.info("cryptotui daemon stopped", extra={"fields": {"event": "daemon_stopped", "exit_code": code}})
    return code


async def _main(settings: Settings, stop_stack_on_exit: bool, early_stop: list[int], **options: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early_stop:  # a signal arrived before the loop ran: stop at once, still cleanly
        stop.set()
    return await run_supervisor(settings, stop_stack_on_exit, stop, **options)


def run_daemon(settings: Settings, stop_stack_on_exit: bool = True, **options: Any) -> int:
    """Run the whole pipeline headless until SIGTERM/SIGINT; returns the process exit code."""
    # From the very start a signal means "stop cleanly" (the event loop takes the signals over later).
    early_stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: early_stop.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    configure_logging(settings)
    pid_file = PidFile(settings.paths.run / PID_FILE)
    try:
        pid_file.acquire()
    except AlreadyRunning as error:
        log.error(str(error), extra={"fields": {"event": "already_running", "pid": error.pid}})
        print(f"cryptotui: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        log.error(f"cannot create the pid file: {error}")
        print(f"cryptotui: cannot create the pid file {pid_file.path}: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return asyncio.run(_main(settings, stop_stack_on_exit, early_stop, **options))
    finally:
        pid_file.release()
        logging.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
