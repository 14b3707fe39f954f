"""`cryptotui bench stack`: how long `stack up` takes from nothing (first run) and from stopped."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from cryptotui.services.stack import Stack, temporary_settings


async def _measure(runs: int) -> dict[str, Any]:
    first: list[float] = []
    from_stopped: list[float] = []
    already_running: list[float] = []
    for _ in range(runs):
        data_dir = Path(tempfile.mkdtemp(prefix="cryptotui-bench-", dir="/tmp"))
        data_dir.chmod(0o755)
        stack = Stack(temporary_settings(data_dir))
        try:
            started = time.perf_counter()
            await stack.up()
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            await stack.up()
            already_running.append(time.perf_counter() - started)
            await stack.down()
            started = time.perf_counter()
            await stack.up()
            from_stopped.append(time.perf_counter() - started)
        finally:
            await stack.down()
            stack.postgres.kill()
            stack.kafka.kill()
            shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "runs": runs,
        "first_run_s": round(statistics.median(first), 3),
        "from_stopped_s": round(statistics.median(from_stopped), 3),
        "already_running_s": round(statistics.median(already_running), 3),
        "first_run_all_s": [round(value, 3) for value in first],
        "from_stopped_all_s": [round(value, 3) for value in from_stopped],
    }


@click.command("stack")
@click.option("--runs", default=5, show_default=True, help="Repetitions; medians are reported.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(runs: int, as_json: bool) -> None:
    """Time `stack up` from nothing (initdb, schema, topics) and from stopped (medians)."""
    result = asyncio.run(_measure(runs))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"stack up, median of {runs}: first run {result['first_run_s']} s, "
               f"from stopped {result['from_stopped_s']} s, already running {result['already_running_s']} s")
