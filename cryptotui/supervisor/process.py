"""One supervised child process: start, capture its output, watch its exit, stop it by PID.

The child runs in its own session (so a Ctrl-C in the terminal reaches only the supervisor, which then
stops the children in order). Its stdout and stderr are merged into one stream, written line by line to
a `RotatingLog` and handed to an optional callback. Stopping sends SIGTERM to the child's PID, waits, then
SIGKILLs; processes the child started itself (a Spark JVM) are recorded by PID while it runs and ended
after it, so nothing outlives a stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cryptotui.supervisor.logs import RotatingLog

log = logging.getLogger(__name__)

#: A stage must exit within 10 s of SIGTERM (its contract); allow a little more before SIGKILL.
STOP_TIMEOUT_S = 15.0
#: Descendants left after the child exited get this long after SIGTERM before SIGKILL.
ORPHAN_GRACE_S = 3.0
_READ_LIMIT = 1 << 20


@dataclass
class ChildSpec:
    """What to run: a name (log file `<name>.log`), the argv and the environment."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def end_processes(processes: Sequence[psutil.Process], grace_s: float = ORPHAN_GRACE_S) -> list[int]:
    """SIGTERM the given processes that still run (same PID *and* start time), then SIGKILL survivors.

    Returns the PIDs that had to be ended.
    """
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                alive.append(proc)
    if not alive:
        return []
    _, survivors = psutil.wait_procs(alive, timeout=grace_s)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=grace_s)
    return [proc.pid for proc in alive]


class ChildProcess:
    """A child process and the tasks that read its output and wait for its exit."""

    def __init__(self, spec: ChildSpec, log_file: RotatingLog, on_line: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.log = log_file
        self.on_line = on_line
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started_at: float | None = None  # wall clock
        self._started_mono: float | None = None
        self._ended_mono: float | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._exit: asyncio.Future[int] | None = None
        self._transport: asyncio.ReadTransport | None = None
        self._reader: asyncio.Task[None] | None = None
        self._descendants: dict[int, psutil.Process] = {}
        self._finishing: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        """Started and its exit not yet observed by `wait()`."""
        return self._popen is not None and self.returncode is None

    @property
    def alive(self) -> bool:
        """The OS process still exists (its exit not yet seen)."""
        return self._exit is not None and not self._exit.done()

    @property
    def uptime_s(self) -> float:
        if self._started_mono is None:
            return 0.0
        end = self._ended_mono if self._ended_mono is not None else time.monotonic()
        return end - self._started_mono

    async def start(self) -> int:
        """Start the process; returns its PID."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        loop = asyncio.get_running_loop()
        self.log.write(f"--- cryptotui supervisor: starting {' '.join(self.spec.argv)}")
        # Popen, not asyncio's subprocess: asyncio reports the exit only once every holder of the output
        # pipe closed it, and a stage's own children (a Spark JVM) may hold it long after the stage died.
        self._popen = subprocess.Popen(
            list(self.spec.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.spec.env, cwd=self.spec.cwd, start_new_session=True,
        )
        self.pid = self._popen.pid
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._exit = loop.create_future()
        self._watch_exit(loop)
        assert self._popen.stdout is not None
        reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), self._popen.stdout)
        self._reader = asyncio.create_task(self._read_output(reader), name=f"output:{self.name}")
        self.log.write(f"--- cryptotui supervisor: {self.name} pid {self.pid}")
        return self.pid

    def _watch_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        """Resolve `self._exit` with the exit code when the process ends (pidfd, else a thread)."""
        assert self._popen is not None and self._exit is not None
        popen, future = self._popen, self._exit

        def reaped(code: int) -> None:
            if not future.done():
                future.set_result(code)

        try:
            pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            loop.run_in_executor(None, popen.wait).add_done_callback(lambda done: reaped(done.result()))
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            reaped(popen.wait())

        loop.add_reader(pidfd, readable)

    async def _read_output(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what is buffered as one line
                raw = await stream.read(_READ_LIMIT)
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self.log.write(line)
            if self.on_line is not None:
                try:
                    self.on_line(line)
                except Exception:  # a listener must not stop the capture
                    log.exception("output listener of %s failed", self.name)

    async def wait(self) -> int:
        """Wait for the exit (and the end of its output); returns the exit code (negative: signal)."""
        if self._exit is None:
            raise RuntimeError(f"{self.name} was not started")
        code = await asyncio.shield(self._exit)
        if self._finishing is None:
            self._finishing = asyncio.create_task(self._finish(code), name=f"finish:{self.name}")
        await asyncio.shield(self._finishing)
        assert self.returncode is not None
        return self.returncode

    async def _wait_output(self, timeout: float) -> None:
        if self._reader is not None and not self._reader.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def _finish(self, code: int) -> None:
        self._ended_mono = time.monotonic()
        await self._wait_output(1.0)  # the last lines it wrote
        await asyncio.to_thread(self.end_descendants)
        await self._wait_output(1.0)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._transport is not None:
            self._transport.close()
        self.log.write(f"--- cryptotui supervisor: {self.name} pid {self.pid} exited with {code}")
        self.returncode = code

    def track_descendants(self) -> None:
        """Record the processes the child started (call now and then while it runs)."""
        if self.pid is None or not self.alive:
            return
        parent = _process(self.pid)
        if parent is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in parent.children(recursive=True):
                self._descendants.setdefault(child.pid, child)

    def descendant_pids(self) -> list[int]:
        return sorted(self._descendants)

    def end_descendants(self) -> list[int]:
        """End recorded descendants and the rest of the child's process group, by PID."""
        survivors = list(self._descendants.values())
        if self.pid is not None:
            # The child leads its own session/process group: members it started but we never saw.
            for proc in psutil.process_iter(["pid"]):
                with contextlib.suppress(psutil.Error):
                    if proc.pid not in self._descendants and os.getpgid(proc.pid) == self.pid:
                        survivors.append(proc)
        ended = end_processes(survivors)
        if ended:
            self.log.write(f"--- cryptotui supervisor: ended leftover processes of {self.name}: {ended}")
        return ended

    def send_signal(self, sig: int) -> None:
        if self.alive and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the child now (its exit is still observed through `wait()`)."""
        self.track_descendants()
        self.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
        if self._exit is None:
            raise RuntimeError(f"{self.name} was not started")
        if self.alive:
            self.track_descendants()
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), timeout)
            except TimeoutError:
                log.warning("%s (pid %s) did not exit %.0f s after SIGTERM; killing it", self.name, self.pid, timeout)
                self.log.write(f"--- cryptotui supervisor: no exit {timeout:.0f} s after SIGTERM, sending SIGKILL")
                self.send_signal(signal.SIGKILL)
        return await self.wait()
