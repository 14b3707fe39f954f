"""The Spark job on a known event set, compared row by row with an independent decimal computation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cryptotui.config import Settings
from spark.job import MetricsJob, read_topic
from tests.functional.spark_fixtures import (
    SPREAD_WINDOW_MS,
    TRADE_WINDOW_MS,
    SparkHolder,
    accepted,
    compare,
    expected_spread_metrics,
    expected_trade_metrics,
    late_events,
    make_events,
    metric_settings,
    produce,
    spark_holder,  # noqa: F401 - fixture
    stored,
)

pytestmark = pytest.mark.spark


def run_available_now(spark: Any, settings: Settings, statuses: list[dict[str, Any]]) -> None:
    MetricsJob(spark, settings, emit=statuses.append).run_available_now()


async def test_metrics_equal_an_independent_decimal_computation(
    settings: Settings, db: asyncpg.Connection, spark_holder: SparkHolder, tmp_path: Path  # noqa: F811
) -> None:
    test_settings = metric_settings(settings, tmp_path / "checkpoint")
    events = make_events()
    produce(test_settings, events)
    spark = spark_holder.get()
    statuses: list[dict[str, Any]] = []
    await asyncio.to_thread(run_available_now, spark, test_settings, statuses)
    phase1_batches = {
        s["batch_id"]
        for s in statuses
        if s.get("event") == "progress" and s["query"] == "trade_metrics" and s["num_input_rows"]
    }

    # Phase 2, a new run from the checkpoint: late records inside the watermark count, older ones are dropped.
    late, dropped_trades, dropped_books = late_events(events, test_settings.spark_watermark_s)
    ends = produce(test_settings, late)
    await asyncio.to_thread(run_available_now, spark, test_settings, statuses)

    trades = accepted(events.all_trades(), late.all_trades(), test_settings.spark_watermark_s, TRADE_WINDOW_MS)
    books = accepted(events.all_books(), late.all_books(), test_settings.spark_watermark_s, SPREAD_WINDOW_MS)
    expected_trades = expected_trade_metrics(trades, test_settings)
    expected_spreads = expected_spread_metrics(books, test_settings)
    assert compare(await stored(db, "trade_metrics"), expected_trades) == []
    assert compare(await stored(db, "spread_metrics"), expected_spreads) == []

    # The event set exercises both values of every flag, and many windows of every symbol.
    for flag, rows in (("volatility_alert", expected_trades), ("volume_spike", expected_trades),
                       ("spread_warning", expected_spreads)):
        values = {row[flag] for row in rows.values()}
        assert values == {True, False}, flag
    assert len(expected_trades) >= 3 * 12 and len(expected_spreads) >= 3 * 24
    # BNBUSDT has no absolute threshold: its alerts come from volatility_default_bps of the vwap.
    assert {row["volatility_alert"] for key, row in expected_trades.items() if key[0] == "BNBUSDT"} == {True, False}

    # Late rows beyond the watermark were dropped by Spark, and counted (after partial aggregation: rows
    # of one window and symbol are merged before the state store counts them, so at most one per event).
    dropped = {}
    for status in statuses:
        if status.get("event") == "progress":
            dropped[status["query"]] = dropped.get(status["query"], 0) + status["late_rows_dropped"]
    assert 0 < dropped["trade_metrics"] <= dropped_trades
    assert 0 < dropped["spread_metrics"] <= dropped_books

    # Phase 1 was read in several batches of at most spark_max_rows_per_trigger rows.
    assert len(phase1_batches) >= 3
    rows = await db.fetch("SELECT * FROM spark_progress ORDER BY query, batch_id")
    assert {row["query"] for row in rows} == {"trade_metrics", "spread_metrics"}
    assert max(row["num_input_rows"] for row in rows) <= test_settings.spark_max_rows_per_trigger
    for query, topic in (("trade_metrics", test_settings.topic_trade),
                         ("spread_metrics", test_settings.topic_bookticker)):
        last = [row for row in rows if row["query"] == query][-1]
        assert json.loads(last["end_offsets"]) == {topic: ends[topic]}
        assert last["offsets_behind"] == 0
        assert last["watermark"] is not None
        total = sum(row["num_input_rows"] for row in rows if row["query"] == query)
        assert total == sum(ends[topic].values())
    assert await db.fetchval("SELECT count(*) FROM spark_progress WHERE jsonb_typeof(end_offsets) <> 'object'") == 0


async def test_replayed_batches_rewrite_the_same_rows(
    settings: Settings, db: asyncpg.Connection, spark_holder: SparkHolder, tmp_path: Path  # noqa: F811
) -> None:
    """A run from a lost checkpoint replays everything: the upsert leaves the same tables."""
    test_settings = metric_settings(settings, tmp_path / "first", spark_max_rows_per_trigger=200_000)
    events = make_events(seed=3, minutes=5)
    produce(test_settings, events)
    spark = spark_holder.get()
    statuses: list[dict[str, Any]] = []
    await asyncio.to_thread(run_available_now, spark, test_settings, statuses)
    first = (await stored(db, "trade_metrics"), await stored(db, "spread_metrics"))
    again = metric_settings(settings, tmp_path / "second", spark_max_rows_per_trigger=200_000)
    await asyncio.to_thread(run_available_now, spark, again, statuses)
    assert (await stored(db, "trade_metrics"), await stored(db, "spread_metrics")) == first
    expected = expected_trade_metrics(events.all_trades(), test_settings)
    assert compare(first[0], expected) == []


def test_builtin_kafka_source_without_connector_says_what_is_missing(
    settings: Settings, spark_holder: SparkHolder  # noqa: F811
) -> None:
    spark = spark_holder.get()
    with pytest.raises(RuntimeError, match="spark-sql-kafka"):
        read_topic(spark, settings.model_copy(update={"spark_source": "kafka"}), settings.topic_trade)
