"""The spark stage: runs the Spark metrics job (`spark/job.py`) as a child process and reports on it.

The driver is a separate process (`python -m spark.job`, with these settings in its environment) so its
JVM, memory and crashes stay out of the stage process, and the job stays an ordinary PySpark
application (the same entry point works with spark-submit on a cluster). The job prints one status line
per event on stdout (`@@cryptotui-spark {json}`: session started, one per micro-batch, failures); the
stage turns them into its counters, which the StageRunner writes to `stage_status` with every heartbeat:
state, batches, rows, last batch duration, watermark, offsets behind, per query.

Stopping: SIGTERM to the stage -> SIGTERM to the driver, which stops its queries (the running batch is
abandoned and replayed from the checkpoint next time) and Spark; whatever is left after 6 s is killed,
the whole process group (driver, JVM, Python workers). If the stage itself is killed, the driver dies
with it (PR_SET_PDEATHSIG) and its JVM exits when its stdin closes; the next driver waits for that
JVM before touching the checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import Any

import psutil

from cryptotui.config import Settings, child_env
from cryptotui.stages.base import Stage

STOP_GRACE_S = 6.0
GROUP_EXIT_S = 0.8
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the stage process dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SparkStage(Stage):
    name = "spark"

    def __init__(self, settings: Settings, *, available_now: bool = False, queries: tuple[str, ...] = ()) -> None:
        super().__init__(settings)
        self.available_now = available_now
        self.queries = queries
        self.process: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
        self._tree: dict[int, psutil.Process] = {}
        self._started = time.monotonic()
        self._last_error: str | None = None
        self._per_query: dict[str, dict[str, Any]] = {}
        self.counters = {
            "state": "starting",
            "master": settings.spark_master,
            "driver_pid": None,
            "session_start_s": None,
            "batches": 0,
            "rows": 0,
            "last_batch_ms": None,
            "last_batch_at": None,
            "watermark": None,
            "offsets_behind": None,
            "input_rows_per_s": None,
            "processed_rows_per_s": None,
            "late_rows_dropped": 0,
            "queries": self._per_query,
        }

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "spark.job"]
        if self.available_now:
            args.append("--available-now")
        for query in self.queries:
            args += ["--query", query]
        return args

    def environment(self) -> dict[str, str]:
        env = child_env(self.settings)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def run(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=self.environment(),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._pgid = self.process.pid
        asyncio.get_running_loop().call_later(20, self._remember_tree)
        self.counters["driver_pid"] = self.process.pid
        self.log.info("Spark driver pid %d on %s", self.process.pid, self.settings.spark_master)
        await self._read_output()
        code = await self.process.wait()
        await self._reap_group(GROUP_EXIT_S)
        if code != 0:
            self.counters["state"] = "failed"
            raise RuntimeError(f"the Spark job exited with code {code}: {self._last_error or 'see its log'}")
        self.counters["state"] = "finished"

    async def _read_output(self) -> None:
        from spark.progress import parse_status

        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            event = parse_status(line)
            if event is None:
                if line:
                    self.log.info("%s", line)
                continue
            self.handle_event(event)

    def handle_event(self, event: dict[str, Any]) -> None:
        """Fold one status event of the job into the counters."""
        kind = event.get("event")
        counters = self.counters
        if kind == "starting":
            counters["state"] = "starting"
        elif kind == "session":
            counters["state"] = "session"
            counters["session_start_s"] = event.get("seconds")
        elif kind == "running":
            counters["state"] = "running"
        elif kind == "idle":
            if counters["state"] == "running":
                counters["state"] = "idle"
        elif kind == "progress":
            self._fold_progress(event)
        elif kind in ("failed", "terminated"):
            error = event.get("error") or event.get("exception")
            if error:
                self._last_error = str(error)[:2000]
                counters["last_error"] = self._last_error
                counters["state"] = "failed"
        elif kind in ("stopping", "stopped") and counters["state"] != "failed":
            counters["state"] = kind

    def _fold_progress(self, event: dict[str, Any]) -> None:
        counters = self.counters
        name = str(event.get("query"))
        rows = int(event.get("num_input_rows") or 0)
        query = self._per_query.setdefault(name, {"batches": 0, "rows": 0})
        query.update(
            batches=query["batches"] + 1,
            rows=query["rows"] + rows,
            batch_id=event.get("batch_id"),
            last_batch_ms=event.get("batch_duration_ms"),
            watermark=event.get("watermark"),
            offsets_behind=event.get("offsets_behind"),
            input_rows_per_s=event.get("input_rows_per_second"),
            processed_rows_per_s=event.get("processed_rows_per_second"),
            state_rows=event.get("state_rows"),
            late_rows_dropped=int(query.get("late_rows_dropped", 0)) + int(event.get("late_rows_dropped") or 0),
            end_offsets=event.get("end_offsets"),
        )
        queries = list(self._per_query.values())
        watermarks = [q["watermark"] for q in queries if q.get("watermark")]
        behind = [q["offsets_behind"] for q in queries if q.get("offsets_behind") is not None]
        counters.update(
            state="running" if counters["state"] in ("idle", "session", "starting") else counters["state"],
            batches=counters["batches"] + 1,
            rows=counters["rows"] + rows,
            last_batch_ms=event.get("batch_duration_ms"),
            last_batch_at=event.get("time"),
            # The slowest query's watermark: every window before it is final everywhere.
            watermark=min(watermarks) if watermarks else None,
            offsets_behind=sum(behind) if behind else None,
            input_rows_per_s=sum(q.get("input_rows_per_s") or 0 for q in queries),
            processed_rows_per_s=sum(q.get("processed_rows_per_s") or 0 for q in queries),
            late_rows_dropped=sum(q["late_rows_dropped"] for q in queries),
        )

    def _remember_tree(self) -> None:
        """Note the driver's descendants: Spark's Python workers leave its process group, and once the
        driver is gone they can no longer be found from it."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._tree[child.pid] = child

    def status(self) -> dict[str, Any]:
        self._remember_tree()
        status = dict(self.counters)
        status["uptime_s"] = round(time.monotonic() - self._started, 1)
        return status

    async def flush(self) -> None:
        """After a stop signal: let the driver stop its queries, then make sure nothing is left."""
        await self._stop_driver(STOP_GRACE_S)

    async def close(self) -> None:
        await self._stop_driver(0.5)

    async def _stop_driver(self, grace_s: float) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            self.counters["state"] = "stopping"
            self._remember_tree()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            drain = asyncio.ensure_future(self._drain())
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                self.log.warning("the Spark driver did not stop within %.0f s: killing it", grace_s)
            drain.cancel()
        await self._reap_group(GROUP_EXIT_S if process.returncode is not None else 0)
        with contextlib.suppress(ProcessLookupError):
            if process.returncode is None:
                process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 2)
        if self.counters["state"] != "failed":
            self.counters["state"] = "stopped"

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            await self._read_output()

    async def _reap_group(self, wait_s: float) -> None:
        """Give the JVM and the Python workers wait_s to exit after the driver, then kill the group."""
        pgid = self._pgid
        if pgid is None:
            return
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for child in list(self._tree.values()):
            with contextlib.suppress(psutil.Error):
                if child.is_running():  # also checks the pid was not reused
                    child.kill()
        self._tree.clear()
