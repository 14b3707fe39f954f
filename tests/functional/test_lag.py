"""The lag stage against a real broker and database: messages and seconds behind, per group, as history."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from cryptotui.bench.sink import start_sink, stop_process
from cryptotui.config import Settings, child_env
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.lag import LagRow, LagStage, lag_rows, received_ns
from tests.functional.test_sink import log_text, produce_values, realistic, wait_stored


def start_lag(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "cryptotui", "stage", "run", "lag"], env=child_env(settings),
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)


async def samples(db: asyncpg.Connection, group: str) -> list[tuple[object, int, float | None, int]]:
    """(time, total lag, largest lag in seconds, rows) of each sample of a group, oldest first."""
    rows = await db.fetch(
        "SELECT time, sum(lag)::bigint AS lag, max(lag_seconds) AS seconds, count(*) AS n FROM kafka_lag"
        " WHERE group_id = $1 GROUP BY time ORDER BY time", group,
    )
    return [(row["time"], row["lag"], row["seconds"], row["n"]) for row in rows]


async def wait_samples(db: asyncpg.Connection, group: str, count: int, timeout: float,
                       log_path: Path) -> list[tuple[object, int, float | None, int]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await samples(db, group)
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"only {len(found)} lag samples:\n{log_text(log_path)}"
        await asyncio.sleep(0.2)


async def test_lag_of_a_stopped_sink_counts_every_message_grows_in_seconds_then_falls_to_zero(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"lag_interval_s": 1.0})
    produce_values(settings, realistic(1000, seed=21))
    lag_log, sink_log = tmp_path / "lag.log", tmp_path / "sink.log"
    lag = start_lag(settings, lag_log)
    try:
        before = await wait_samples(db, "cryptotui-sink", 3, 60, lag_log)
        # Sink not running: every message is lag, and the oldest one ages.
        assert [total for _, total, _, _ in before] == [1000] * len(before)
        assert before[-1][3] == 9  # one row per partition of the three market topics
        assert before[0][2] > 0 and before[-1][2] > before[0][2] + 1.0
        committed = await db.fetch("SELECT DISTINCT committed_offset FROM kafka_lag WHERE group_id = 'cryptotui-sink'")
        assert [row["committed_offset"] for row in committed] == [None]

        sink = start_sink(settings, sink_log)
        try:
            await wait_stored(settings, 60, sink, sink_log)
            drained_at = await db.fetchval("SELECT now()")
            deadline = time.monotonic() + 20
            while True:
                after = [sample for sample in await samples(db, "cryptotui-sink") if sample[0] > drained_at]
                if after:
                    break
                assert time.monotonic() < deadline, log_text(lag_log)
                await asyncio.sleep(0.3)
        finally:
            assert stop_process(sink) == 0, log_text(sink_log)
        assert after[0][1] == 0 and after[0][2] == 0.0
        # The history keeps every sample: lag over time, not one current value.
        history = await samples(db, "cryptotui-sink")
        assert len(history) >= len(before) + 1
        row = await db.fetchrow("SELECT * FROM kafka_lag WHERE group_id = 'cryptotui-sink' AND time = $1"
                                " AND end_offset > 0 LIMIT 1", after[0][0])
        assert row["committed_offset"] == row["end_offset"] and row["lag"] == 0
    finally:
        assert stop_process(lag) == 0, log_text(lag_log)
    status = json.loads(await db.fetchval("SELECT counters FROM stage_status WHERE stage = 'lag'"))
    assert status["samples"] >= 4 and status["failed_samples"] == 0


async def test_lag_covers_other_consumer_groups_and_spark(settings: Settings, db: asyncpg.Connection) -> None:
    produce_values(settings, [("trade", "BTCUSDT", value) for _, _, value in realistic(90, seed=22)])
    tps = [TopicPartition(settings.topic_trade, partition) for partition in range(settings.kafka_partitions)]
    # Another consumer group, with committed offsets 5 behind the end of each non-empty partition.
    tool = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(settings), group_id=f"tool-{settings.topic_dlq}",
                            enable_auto_commit=False)
    await tool.start()
    try:
        tool.assign(tps)
        ends = await tool.end_offsets(tps)
        await tool.commit({tp: OffsetAndMetadata(end - 5, "") for tp, end in ends.items() if end >= 5})
    finally:
        await tool.stop()
    busy = {tp: end for tp, end in ends.items() if end >= 5}
    # Spark's progress: the end offsets of its last batch, 2 behind on each partition.
    spark_end = {settings.topic_trade: {str(tp.partition): end - 2 for tp, end in busy.items()}}
    await db.execute("INSERT INTO spark_progress (time, query, batch_id, num_input_rows, end_offsets)"
                     " VALUES (now(), 'metrics', 7, 0, $1::jsonb)", json.dumps(spark_end))

    stage = LagStage(settings)
    await stage.setup()
    try:
        rows = await stage.sample()
        await stage.write(rows)
    finally:
        await stage.close()
    by_group: dict[str, list[LagRow]] = {}
    for row in rows:
        by_group.setdefault(row.group_id, []).append(row)
    tool_rows = {(row.topic, row.partition): row for row in by_group[f"tool-{settings.topic_dlq}"]}
    for tp, end in busy.items():
        row = tool_rows[(tp.topic, tp.partition)]
        assert (row.end_offset, row.committed_offset, row.lag) == (end, end - 5, 5)
        assert row.lag_seconds is not None and 0 < row.lag_seconds < 120
    spark_rows = {(row.topic, row.partition): row for row in by_group["spark"]}
    for tp in busy:
        assert spark_rows[(tp.topic, tp.partition)].lag == 2
    sink_rows = [row for row in by_group["cryptotui-sink"] if row.topic == settings.topic_trade]
    assert sum(row.lag for row in sink_rows) == 90
    assert await db.fetchval("SELECT count(DISTINCT group_id) FROM kafka_lag") == 3

    # Without the end_offsets column (an older schema), Spark's lag is skipped, the rest goes on.
    await db.execute("ALTER TABLE spark_progress DROP COLUMN end_offsets")
    stage = LagStage(settings)
    await stage.setup()
    try:
        rows = await stage.sample()
    finally:
        await stage.close()
    assert {row.group_id for row in rows} == {"cryptotui-sink", f"tool-{settings.topic_dlq}"}


def test_lag_rows_without_a_committed_offset_count_from_the_log_start() -> None:
    tp = TopicPartition("t", 0)
    rows = lag_rows("g", {tp: None}, {tp: 10}, {tp: 25}, {(tp, 10): 1_000_000_000}, now_ns=4_000_000_000)
    assert rows[0].lag == 15 and rows[0].committed_offset is None and rows[0].lag_seconds == 3.0
    rows = lag_rows("g", {tp: 25}, {tp: 10}, {tp: 25}, {}, now_ns=0)
    assert rows[0].lag == 0 and rows[0].lag_seconds == 0.0
    assert received_ns(b'{"recv_ns": 5}', 9) == 5
    assert received_ns(b"garbage", 9) == 9_000_000
