"""The one place that names cryptotui's tables and their time columns."""

from __future__ import annotations

from typing import Final

# Raw market tables -> time column (the hypertable dimension and the retention clock).
RAW_TABLES: Final[dict[str, str]] = {
    "trades": "trade_time",
    "agg_trades": "trade_time",
    "book_ticker": "recv_time",
}

# Metric and pipeline history tables -> time column.
HISTORY_TABLES: Final[dict[str, str]] = {
    "trade_metrics": "window_start",
    "spread_metrics": "window_start",
    "kafka_lag": "time",
    "spark_progress": "time",
    "alert_events": "time",
}

TIME_SERIES_TABLES: Final[dict[str, str]] = {**RAW_TABLES, **HISTORY_TABLES}
STAGE_STATUS: Final = "stage_status"


def quote_ident(name: str) -> str:
    """Quote a table or column name from the fixed lists above (identifiers cannot be parameters)."""
    if name not in TIME_SERIES_TABLES and name not in TIME_SERIES_TABLES.values() and name != STAGE_STATUS:
        raise ValueError(f"unknown table or column {name!r}")
    return '"' + name + '"'
