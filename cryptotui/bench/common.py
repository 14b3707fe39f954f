"""What the benchmarks share: child processes stopped by PID, log tails, percentiles, output."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; only this process, by its PID."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages ("" when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


def emit(result: dict[str, Any], as_json: bool, print_table: Callable[[dict[str, Any]], None]) -> None:
    """One JSON object with --json, else the benchmark's readable table."""
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_table(result)
