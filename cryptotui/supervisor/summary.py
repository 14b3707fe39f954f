"""The daemon's periodic one-line summary: messages/s in, rows/s written, lag, last Spark batch, alerts.

Rates come from the stages' counters in `stage_status` (ingest's messages in, the sink's rows written)
between two samples; lag, Spark progress and alerts from their tables. `Summary.line()` is the text,
`Summary.to_json()` the structured fields of the log line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

# Counter names, first match wins: stages name their figures in their own words.
MESSAGES_IN_KEYS: tuple[str, ...] = ("messages_in", "received", "messages_received", "produced", "messages")
ROWS_WRITTEN_KEYS: tuple[str, ...] = ("rows_written", "rows", "written", "rows_inserted", "inserted")

SUMMARY_QUERY = """
SELECT
  (SELECT coalesce(json_object_agg(group_id, lag), '{}'::json) FROM (
      SELECT group_id, sum(lag)::bigint AS lag FROM (
          SELECT DISTINCT ON (group_id, topic, partition) group_id, lag FROM kafka_lag
          WHERE time > now() - interval '2 minutes'
          ORDER BY group_id, topic, partition, time DESC) latest
      GROUP BY group_id) per_group) AS lag,
  (SELECT row_to_json(p) FROM (
      SELECT batch_id, num_input_rows, extract(epoch FROM now() - time)::float8 AS age_s, batch_duration_ms
      FROM spark_progress ORDER BY time DESC LIMIT 1) p) AS spark,
  (SELECT count(*) FROM alert_events WHERE time > now() - make_interval(secs => $1)) AS alerts,
  (SELECT count(*) FROM trade_metrics WHERE updated_at > now() - make_interval(secs => $1)
      AND (volatility_alert OR volume_spike)) AS flagged_windows
"""


def counter(counters: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    """The first numeric counter among `keys`, or None. A mapping counts as its `total`, else as the sum of
    its numbers (per-table counters such as `{"trades": 5, "book_ticker": 7}`)."""
    for key in keys:
        value = counters.get(key)
        if isinstance(value, Mapping):
            numbers = [item for item in value.values() if _is_number(item)]
            value = value["total"] if "total" in value else (sum(numbers) if numbers else None)
        if _is_number(value):
            return float(value)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rate(previous: float | None, current: float | None, seconds: float) -> float | None:
    """Per-second rate of a counter; a counter that went down (its stage restarted) counts from 0."""
    if current is None or previous is None or seconds <= 0:
        return None
    if current < previous:
        previous = 0.0
    return (current - previous) / seconds


@dataclass
class Summary:
    """One summary: every field may be None when its source has nothing yet."""

    interval_s: float
    msgs_in_per_s: float | None = None
    rows_per_s: float | None = None
    lag: dict[str, int] = field(default_factory=dict)
    spark_batch: int | None = None
    spark_rows: int | None = None
    spark_age_s: float | None = None
    alerts: int = 0
    flagged_windows: int = 0
    stages_running: int = 0
    stages_total: int = 0
    restarts: int = 0

    def line(self) -> str:
        def number(value: float | None, unit: str) -> str:
            return "-" if value is None else f"{value:,.1f} {unit}"

        lag = " ".join(f"{group}={value:,}" for group, value in sorted(self.lag.items())) or "-"
        if self.spark_batch is None:
            spark = "-"
        else:
            age = "" if self.spark_age_s is None else f", {self.spark_age_s:.0f} s ago"
            spark = f"#{self.spark_batch} ({self.spark_rows or 0:,} rows{age})"
        return (f"in {number(self.msgs_in_per_s, 'msg/s')} | written {number(self.rows_per_s, 'rows/s')} | "
                f"lag {lag} | spark batch {spark} | alerts {self.alerts} (flagged windows {self.flagged_windows})"
                f" | stages {self.stages_running}/{self.stages_total} up, {self.restarts} restarts")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SummaryTracker:
    """Keeps the previous sample; `await tracker.sample(conn, stage_counters)` gives the next Summary."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._previous: tuple[float, float | None, float | None] | None = None

    def rates(self, now: float, messages: float | None, rows: float | None) -> tuple[float | None, float | None]:
        previous = self._previous
        self._previous = (now, messages, rows)
        if previous is None:
            return None, None
        seconds = now - previous[0]
        return rate(previous[1], messages, seconds), rate(previous[2], rows, seconds)

    async def sample(self, conn: asyncpg.Connection | None, counters: Mapping[str, Mapping[str, Any]],
                     running: int = 0, total: int = 0, restarts: int = 0, now: float | None = None) -> Summary:
        """A summary from the stages' counters ({stage: counters}) and, when connected, the tables."""
        messages = counter(counters.get("ingest", {}), MESSAGES_IN_KEYS)
        rows = counter(counters.get("sink", {}), ROWS_WRITTEN_KEYS)
        msgs_rate, rows_rate = self.rates(time.monotonic() if now is None else now, messages, rows)
        summary = Summary(self.interval_s, msgs_rate, rows_rate, stages_running=running, stages_total=total,
                          restarts=restarts)
        if conn is not None:
            row = await conn.fetchrow(SUMMARY_QUERY, float(self.interval_s), timeout=5)
            if row is not None:
                lag = row["lag"]
                summary.lag = json.loads(lag) if isinstance(lag, str) else dict(lag or {})
                spark = row["spark"]
                spark = json.loads(spark) if isinstance(spark, str) else spark
                if spark:
                    summary.spark_batch = spark.get("batch_id")
                    summary.spark_rows = spark.get("num_input_rows")
                    age = spark.get("age_s")
                    summary.spark_age_s = round(age, 1) if age is not None else None
                summary.alerts = int(row["alerts"] or 0)
                summary.flagged_windows = int(row["flagged_windows"] or 0)
        return summary
