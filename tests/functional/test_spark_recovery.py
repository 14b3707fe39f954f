"""`cryptotui stage run spark` killed with SIGKILL mid-run and restarted from its checkpoint ends with the
same tables as an uninterrupted run; its heartbeat carries Spark's counters; SIGTERM stops it in 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from cryptotui.config import Settings, child_env
from cryptotui.db.connection import database_url
from cryptotui.db.schema import apply_schema
from cryptotui.services.stack import Stack
from spark.job import MetricsJob
from tests.conftest import drop_database
from tests.functional.spark_fixtures import (
    SparkHolder,
    compare,
    expected_trade_metrics,
    make_events,
    metric_settings,
    produce,
    spark_holder,  # noqa: F401 - fixture
    stored,
)

pytestmark = pytest.mark.spark

QUERIES = ("trade_metrics", "spread_metrics")


def start_stage(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "cryptotui", "stage", "run", "spark"], env=child_env(settings),
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


async def latest_progress(db: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await db.fetch(
        "SELECT DISTINCT ON (query) query, batch_id, end_offsets, offsets_behind FROM spark_progress"
        " ORDER BY query, time DESC"
    )
    return {row["query"]: {**dict(row), "end_offsets": json.loads(row["end_offsets"] or "null")} for row in rows}


async def data_batches(db: asyncpg.Connection, query: str) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM spark_progress WHERE query = $1 AND num_input_rows > 0", query
    )


async def wait_until(predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the stage exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout} s:\n{log.read_text()[-3000:]}")


async def test_sigkill_mid_run_and_restart_give_the_uninterrupted_tables(
    settings: Settings, db: asyncpg.Connection, stack: Stack, spark_holder: SparkHolder, tmp_path: Path  # noqa: F811
) -> None:
    run = metric_settings(settings, tmp_path / "stage-checkpoint", spark_max_rows_per_trigger=1000,
                          spark_trigger_s=0.5, heartbeat_s=0.5)
    events = make_events(seed=5, minutes=10)
    ends = produce(run, events)
    topic_of = {"trade_metrics": run.topic_trade, "spread_metrics": run.topic_bookticker}

    # The uninterrupted reference run (in this process, into a database of its own).
    reference_db = f"{settings.database_name}_ref"
    await stack.postgres.create_database(reference_db)
    reference = run.model_copy(update={"database_name": reference_db,
                                       "spark_checkpoint_dir": tmp_path / "reference-checkpoint"})
    ref_conn = await asyncpg.connect(database_url(reference))
    try:
        await apply_schema(ref_conn, reference.timescaledb)
        job = MetricsJob(spark_holder.get(), reference, emit=lambda event: None)
        await asyncio.to_thread(job.run_available_now)
        expected = (await stored(ref_conn, "trade_metrics"), await stored(ref_conn, "spread_metrics"))
    finally:
        await ref_conn.close()
        await drop_database(stack, reference_db)
    assert compare(expected[0], expected_trade_metrics(events.all_trades(), run)) == []
    spark_holder.shutdown()  # from here on the Spark JVMs are the stage's, one at a time

    log = tmp_path / "stage.log"
    first = start_stage(run, log)
    try:
        async def two_batches_written() -> bool:
            return await data_batches(db, "trade_metrics") >= 2

        await wait_until(two_batches_written, 240, "two trade batches were written", first, log)
        tree = descendants(first.pid)
        assert any("java" in " ".join(p.cmdline()) for p in tree if p.is_running())
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    # Mid-run: the trade query had not reached the end of its topic.
    progress = await latest_progress(db)
    assert progress["trade_metrics"]["end_offsets"] != {run.topic_trade: ends[run.topic_trade]}
    # Without its stage the driver dies at once (PR_SET_PDEATHSIG); the JVM and the Python workers follow.
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [p.cmdline()[:3] for p in alive]

    second = start_stage(run, log)
    try:
        async def everything_processed() -> bool:
            progress = await latest_progress(db)
            return all(
                progress.get(query, {}).get("end_offsets") == {topic_of[query]: ends[topic_of[query]]}
                for query in QUERIES
            )

        await wait_until(everything_processed, 300, "all offsets were processed", second, log)

        async def heartbeat_caught_up() -> bool:
            row = await db.fetchrow("SELECT * FROM stage_status WHERE stage = 'spark'")
            counters = json.loads(row["counters"]) if row else {}
            return bool(row and row["pid"] == second.pid and counters.get("offsets_behind") == 0
                        and set(counters.get("queries", {})) == set(QUERIES))

        await wait_until(heartbeat_caught_up, 30, "the heartbeat showed the queries caught up", second, log)
        row = await db.fetchrow("SELECT * FROM stage_status WHERE stage = 'spark'")
        counters = json.loads(row["counters"])
        assert row["state"] == "running" and counters["state"] in ("running", "idle")
        assert counters["batches"] >= 2 and counters["rows"] > 0 and counters["last_batch_ms"] is not None
        assert counters["watermark"] is not None and counters["session_start_s"] > 0
        for query in QUERIES:
            assert counters["queries"][query]["end_offsets"] == {topic_of[query]: ends[topic_of[query]]}

        tree = descendants(second.pid)
        started = time.monotonic()
        second.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(second.wait, 15)
        took = time.monotonic() - started
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert code == 0, log.read_text()[-3000:]
    assert took < 10, f"the stage took {took:.1f} s to stop"
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [p.cmdline()[:3] for p in alive]
    assert (await db.fetchval("SELECT state FROM stage_status WHERE stage = 'spark'")) == "stopped"

    actual = (await stored(db, "trade_metrics"), await stored(db, "spread_metrics"))
    assert compare(actual[0], expected[0]) == []
    assert compare(actual[1], expected[1]) == []
    assert actual == expected  # every column, bit for bit
