"""The Kafka source's offset and read-limit logic, progress parsing, finishing arithmetic and the stage's
counters: no Spark session needed (only `test_read_range_*` needs the broker)."""

from __future__ import annotations

import json
import pickle
import random
from decimal import Context, Decimal, localcontext
from typing import Any

import pytest
from confluent_kafka import Producer
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadMaxRows

from cryptotui.config import Settings
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.stages.spark import SparkStage
from spark.kafka_source import (
    KafkaRange,
    KafkaStreamReader,
    cap_offsets,
    clamp,
    consumer_config,
    offsets_behind,
    parse_starting_offsets,
    plan_ranges,
    read_range,
)
from spark.metrics import Thresholds, finish_spread, finish_trade, population_stddev
from spark.progress import STATUS_PREFIX, parse_status, progress_record


# --- read limit ----------------------------------------------------------------------------------------
def test_limit_is_shared_in_proportion_to_backlog() -> None:
    start = {"t": {"0": 0, "1": 0, "2": 0}}
    latest = {"t": {"0": 1000, "1": 500, "2": 100}}
    assert cap_offsets(start, latest, 160) == {"t": {"0": 100, "1": 50, "2": 10}}


def test_limit_larger_than_backlog_reads_everything() -> None:
    start = {"t": {"0": 5, "1": 7}}
    latest = {"t": {"0": 10, "1": 9}}
    assert cap_offsets(start, latest, 1000) == latest


def test_leftover_rows_go_to_the_largest_remainders() -> None:
    start = {"a": {"0": 0}, "b": {"0": 0, "1": 0}}
    latest = {"a": {"0": 10}, "b": {"0": 10, "1": 10}}
    end = cap_offsets(start, latest, 10)  # 3.33 each: one partition gets the extra row, in topic order
    assert end == {"a": {"0": 4}, "b": {"0": 3, "1": 3}}


def test_new_partition_starts_at_zero_and_idle_partitions_stay() -> None:
    start = {"t": {"0": 100, "1": 50}}
    latest = {"t": {"0": 100, "1": 150, "2": 100}}
    assert cap_offsets(start, latest, 100) == {"t": {"0": 100, "1": 100, "2": 50}}


@pytest.mark.parametrize("seed", range(30))
def test_limit_properties(seed: int) -> None:
    rng = random.Random(seed)
    start = {f"topic{t}": {str(p): rng.randint(0, 10_000) for p in range(rng.randint(1, 6))} for t in range(3)}
    latest = {t: {p: o + rng.choice([0, rng.randint(0, 100_000)]) for p, o in parts.items()}
              for t, parts in start.items()}
    total = offsets_behind(start, latest)
    max_rows = rng.randint(1, 200_000)
    end = cap_offsets(start, latest, max_rows)
    assert offsets_behind(start, end) == min(total, max_rows)
    for topic, parts in latest.items():
        for part, high in parts.items():
            begin, stop = start[topic][part], end[topic][part]
            assert begin <= stop <= high
            if total > max_rows:  # every partition within one row of its exact proportional share
                assert abs((stop - begin) - max_rows * (high - begin) / total) < 1


def test_limit_of_zero_rows_is_refused() -> None:
    with pytest.raises(ValueError):
        cap_offsets({"t": {"0": 0}}, {"t": {"0": 5}}, 0)


def test_clamp_to_available_now_target() -> None:
    latest = {"t": {"0": 100, "1": 80, "2": 30}, "u": {"0": 9}}
    target = {"t": {"0": 90, "1": 90}}
    assert clamp(latest, target) == {"t": {"0": 90, "1": 80}}


def test_ranges_skip_empty_partitions_and_split_long_ones() -> None:
    start = {"t": {"0": 0, "1": 10}}
    end = {"t": {"0": 25, "1": 10, "2": 3}}
    assert plan_ranges(start, end, 10) == [
        KafkaRange("t", 0, 0, 10), KafkaRange("t", 0, 10, 20), KafkaRange("t", 0, 20, 25), KafkaRange("t", 2, 0, 3),
    ]


def test_starting_offsets_option() -> None:
    assert parse_starting_offsets("earliest") == "earliest"
    assert parse_starting_offsets(' {"t": {"1": 5, "0": -2}} ') == {"t": {"0": -2, "1": 5}}
    with pytest.raises(ValueError):
        parse_starting_offsets("yesterday")


# --- the stream reader with a fake broker ---------------------------------------------------------------
class FakeReader(KafkaStreamReader):
    """The reader with `_watermarks` answered from a dict instead of a broker."""

    marks: dict[str, dict[str, tuple[int, int]]]

    def _watermarks(self) -> dict[str, dict[str, tuple[int, int]]]:
        return self.marks


def fake_reader(marks: dict[str, dict[str, tuple[int, int]]], **options: str) -> FakeReader:
    reader = FakeReader({"kafka.bootstrap.servers": "127.0.0.1:1", "subscribe": "t", **options})
    reader.marks = marks
    return reader


def test_initial_offsets_earliest_latest_and_json() -> None:
    marks = {"t": {"0": (5, 50), "1": (0, 10)}}
    assert fake_reader(marks).initialOffset() == {"t": {"0": 5, "1": 0}}
    assert fake_reader(marks, startingOffsets="latest").initialOffset() == {"t": {"0": 50, "1": 10}}
    given = json.dumps({"t": {"0": 7, "1": -1}})
    assert fake_reader(marks, startingOffsets=given).initialOffset() == {"t": {"0": 7, "1": 10}}


def test_latest_offset_honours_the_engine_limit() -> None:
    reader = fake_reader({"t": {"0": (0, 300), "1": (0, 100)}}, maxOffsetsPerTrigger="40")
    assert reader.getDefaultReadLimit() == ReadMaxRows(40)
    start = {"t": {"0": 0, "1": 0}}
    assert reader.latestOffset(start, ReadMaxRows(40)) == {"t": {"0": 30, "1": 10}}
    # ReadAllAvailable (what the engine passes for some triggers) ignores the option.
    assert reader.latestOffset(start, ReadAllAvailable()) == {"t": {"0": 300, "1": 100}}
    assert reader.reportLatestOffset() == {"t": {"0": 300, "1": 100}}
    assert fake_reader({}).getDefaultReadLimit() == ReadAllAvailable()


def test_available_now_stops_at_the_target_and_reaches_it() -> None:
    reader = fake_reader({"t": {"0": (0, 100), "1": (0, 40)}}, maxRowsPerTrigger="60")
    reader.prepareForTriggerAvailableNow()
    reader.marks = {"t": {"0": (0, 500), "1": (0, 400), "2": (0, 9)}}  # data arriving later
    offsets = {"t": {"0": 0, "1": 0}}
    for _ in range(10):
        end = reader.latestOffset(offsets, ReadMaxRows(60))
        if end == offsets:
            break
        assert offsets_behind(offsets, end) <= 60
        offsets = end
    assert offsets == {"t": {"0": 100, "1": 40}}


def test_offsets_never_go_back() -> None:
    reader = fake_reader({"t": {"0": (0, 10)}})
    assert reader.latestOffset({"t": {"0": 50}}, ReadAllAvailable()) == {"t": {"0": 50}}


def test_reader_pickles_without_its_consumer() -> None:
    reader = fake_reader({"t": {"0": (0, 1)}})
    reader._consumer = object()
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._consumer is None and copy.topics == ["t"] and copy.config == reader.config


def test_consumer_config_passes_kafka_options_and_fixes_the_rest() -> None:
    config = consumer_config({"kafka.bootstrap.servers": "h:1", "kafka.security.protocol": "SSL", "other": "x"})
    assert config["bootstrap.servers"] == "h:1" and config["security.protocol"] == "SSL"
    assert config["enable.auto.commit"] is False and "other" not in config
    with pytest.raises(ValueError):
        consumer_config({"subscribe": "t"})


def test_read_range_returns_exactly_the_range_as_arrow(settings: Settings) -> None:
    producer = Producer({"bootstrap.servers": bootstrap_servers(settings)})
    for number in range(250):
        producer.produce(settings.topic_trade, key=b"BTCUSDT" if number % 7 else None,
                         value=json.dumps({"n": number}).encode(), partition=1)
    assert producer.flush(10) == 0
    config = consumer_config({"kafka.bootstrap.servers": bootstrap_servers(settings)})
    batches = list(read_range(config, KafkaRange(settings.topic_trade, 1, 17, 230), rows_per_batch=100))
    assert [batch.num_rows for batch in batches] == [100, 100, 13]
    rows = [row for batch in batches for row in batch.to_pylist()]
    assert [row["offset"] for row in rows] == list(range(17, 230))
    assert [json.loads(row["value"])["n"] for row in rows] == list(range(17, 230))
    assert {row["topic"] for row in rows} == {settings.topic_trade} and {row["partition"] for row in rows} == {1}
    assert rows[0]["key"] == b"BTCUSDT" and rows[4]["key"] is None  # offset 21 = 3 * 7
    assert all(row["timestamp"] is not None and row["timestampType"] == 0 for row in rows)
    # A range past the end of the partition stops at its end instead of waiting.
    assert sum(b.num_rows for b in read_range(config, KafkaRange(settings.topic_trade, 1, 240, 260))) == 10


# --- progress events -----------------------------------------------------------------------------------
PROGRESS = {
    "id": "0b4a2c3e-0000-0000-0000-000000000000", "name": "trade_metrics", "timestamp": "2024-03-01T00:05:00.123Z",
    "batchId": 7, "numInputRows": 1200, "inputRowsPerSecond": 600.0, "processedRowsPerSecond": "NaN",
    "durationMs": {"triggerExecution": 850, "addBatch": 600},
    "eventTime": {"watermark": "2024-03-01T00:04:50.000Z", "max": "2024-03-01T00:05:00.000Z"},
    "stateOperators": [{"numRowsTotal": 6, "numRowsDroppedByWatermark": 2}],
    "sources": [{"description": "cryptotui_kafka", "startOffset": '{"t": {"0": 0}}',
                 "endOffset": '{"t": {"1": 40, "0": 100}}', "latestOffset": '{"t": {"0": 130, "1": 40}}'}],
}


def test_progress_record_from_a_progress_event() -> None:
    record = progress_record(PROGRESS)
    assert record["query"] == "trade_metrics" and record["batch_id"] == 7 and record["num_input_rows"] == 1200
    assert record["time"].isoformat() == "2024-03-01T00:05:00.123000+00:00"
    assert record["watermark"].isoformat() == "2024-03-01T00:04:50+00:00"
    assert record["end_offsets"] == {"t": {"0": 100, "1": 40}}
    assert record["offsets_behind"] == 30
    assert record["batch_duration_ms"] == 850 and record["processed_rows_per_second"] is None
    assert record["late_rows_dropped"] == 2 and record["state_rows"] == 6


def test_progress_before_any_event_has_no_watermark_and_kafka_objects_work() -> None:
    progress = dict(PROGRESS, eventTime={"watermark": "1970-01-01T00:00:00.000Z"},
                    sources=[{"endOffset": {"t": {"0": 5}}, "latestOffset": None}])
    record = progress_record(progress)
    assert record["watermark"] is None and record["end_offsets"] == {"t": {"0": 5}}
    assert record["offsets_behind"] is None


def test_status_lines_round_trip() -> None:
    assert parse_status(STATUS_PREFIX + '{"event": "idle"}') == {"event": "idle"}
    assert parse_status("26/11/24 WARN something") is None
    assert parse_status(STATUS_PREFIX + "{broken") is None


# --- finishing arithmetic ------------------------------------------------------------------------------
THRESHOLDS = Thresholds({"BTCUSDT": 60.0}, volatility_default_bps=5.0, spread_warning_factor=3.0)


def trade_row(symbol: str, prices: list[str], qtys: list[str]) -> dict[str, Any]:
    p = [Decimal(x) for x in prices]
    q = [Decimal(x) for x in qtys]
    return {
        "symbol": symbol, "window_start_us": 1_709_251_200_000_000, "window_end_us": 1_709_251_260_000_000,
        "trade_count": len(p), "volume": sum(q), "quote_volume": sum(a * b for a, b in zip(p, q, strict=True)),
        "sum_price": sum(p), "sum_price_sq": sum(a * a for a in p), "open": p[0], "high": max(p), "low": min(p),
        "close": p[-1], "buy_volume": q[0], "sell_volume": sum(q[1:], Decimal(0)),
    }


def test_finish_trade_population_stddev_and_absolute_threshold() -> None:
    row = finish_trade(trade_row("BTCUSDT", ["100", "200", "300"], ["1", "1", "2"]), THRESHOLDS)
    assert row is not None
    assert row["vwap"] == Decimal("225")
    assert row["price_stddev"] == pytest.approx(81.64965809277261, rel=1e-15)  # sqrt(20000/3), not sqrt(10000)
    assert row["volatility_alert"] is True
    assert row["window_start"].isoformat() == "2024-03-01T00:00:00+00:00"


def test_finish_trade_relative_threshold_and_single_trade() -> None:
    # ETHUSDT has no absolute threshold: 5 bps of a 3000 vwap is 1.5.
    calm = finish_trade(trade_row("ETHUSDT", ["3000", "3001", "2999"], ["1", "1", "1"]), THRESHOLDS)
    wild = finish_trade(trade_row("ETHUSDT", ["3000", "3004", "2996"], ["1", "1", "1"]), THRESHOLDS)
    single = finish_trade(trade_row("ETHUSDT", ["3000.12345678"], ["0.5"]), THRESHOLDS)
    assert calm and wild and single
    assert calm["volatility_alert"] is False and wild["volatility_alert"] is True
    assert single["price_stddev"] == 0.0 and single["vwap"] == Decimal("3000.12345678")


def test_finish_trade_skips_overflowed_sums() -> None:
    row = trade_row("BTCUSDT", ["1"], ["1"])
    row["quote_volume"] = None
    assert finish_trade(row, THRESHOLDS) is None


def test_population_stddev_is_exact_for_huge_prices() -> None:
    prices = [Decimal("123456789.12345678") + i for i in (0, 1, 2)]
    with localcontext(Context(prec=60)):  # the squares have 33 digits: exact, as Spark's decimal(38, 20)
        sum_sq = sum(p * p for p in prices)
    stddev = population_stddev(3, sum(prices), sum_sq)
    assert abs(stddev - (Decimal(2) / Decimal(3)).sqrt()) < Decimal("1e-25")


def test_finish_spread_averages_and_warning() -> None:
    row = {"symbol": "BTCUSDT", "window_start_us": 0, "window_end_us": 30_000_000, "samples": 4,
           "sum_spread": Decimal("0.40"), "min_spread": Decimal("0.01"), "max_spread": Decimal("0.2"),
           "sum_spread_bps": Decimal("4.4")}
    finished = finish_spread(row, THRESHOLDS)
    assert finished is not None
    assert finished["avg_spread"] == Decimal("0.1") and finished["avg_spread_bps"] == 1.1
    assert finished["spread_warning"] is True  # 0.1 > 3 x 0.01
    assert finish_spread(dict(row, min_spread=Decimal("0.05")), THRESHOLDS)["spread_warning"] is False


# --- the stage's counters ------------------------------------------------------------------------------
def test_stage_counters_follow_the_status_events() -> None:
    stage = SparkStage(Settings())
    assert stage.counters["state"] == "starting"
    stage.handle_event({"event": "session", "seconds": 12.5})
    stage.handle_event({"event": "running", "queries": ["trade_metrics", "spread_metrics"]})
    for query, watermark, behind in (("trade_metrics", "2024-03-01 00:04:50+00:00", 30),
                                     ("spread_metrics", "2024-03-01 00:04:40+00:00", 5)):
        record = progress_record(dict(PROGRESS, name=query))
        stage.handle_event(json.loads(json.dumps({"event": "progress", **record, "watermark": watermark,
                                                  "offsets_behind": behind}, default=str)))
    status = stage.status()
    assert status["state"] == "running" and status["session_start_s"] == 12.5
    assert status["batches"] == 2 and status["rows"] == 2400 and status["last_batch_ms"] == 850
    assert status["watermark"] == "2024-03-01 00:04:40+00:00"  # the slower query's
    assert status["offsets_behind"] == 35 and status["late_rows_dropped"] == 4
    assert set(status["queries"]) == {"trade_metrics", "spread_metrics"}
    stage.handle_event({"event": "failed", "error": "query trade_metrics failed: boom"})
    assert stage.counters["state"] == "failed" and "boom" in stage.counters["last_error"]
