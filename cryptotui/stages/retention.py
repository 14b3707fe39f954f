"""Retention: drop rows older than the configured age, measured from each table's newest row.

Age is measured from the newest row, not from the clock, so that replaying an old recording is not
deleted while it runs. With TimescaleDB, whole chunks are dropped (`drop_chunks`); the Apache edition has
no retention policies, so this stage is the scheduler. Where the full (Timescale-licensed) edition runs,
its own `add_retention_policy` is used for the tables instead. Without the extension, rows are deleted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from cryptotui.db.connection import connect
from cryptotui.db.schema import hypertables, timescaledb_info
from cryptotui.db.tables import RAW_TABLES, TIME_SERIES_TABLES, quote_ident
from cryptotui.stages.base import Stage


@dataclass(frozen=True)
class RetentionResult:
    table: str
    method: str  # "drop_chunks", "delete", "policy" or "empty"
    removed: int  # chunks for drop_chunks, rows for delete


def max_age(table: str, raw_days: float, metrics_days: float) -> timedelta:
    return timedelta(days=raw_days if table in RAW_TABLES else metrics_days)


async def apply_retention(conn: asyncpg.Connection, raw_days: float, metrics_days: float) -> list[RetentionResult]:
    """One retention pass over every time-series table."""
    _, license_ = await timescaledb_info(conn)
    chunked = set(await hypertables(conn))
    results = []
    for table, time_column in TIME_SERIES_TABLES.items():
        age = max_age(table, raw_days, metrics_days)
        if table in chunked and license_ == "timescale":
            await conn.execute(
                "SELECT add_retention_policy($1::regclass, $2::interval, if_not_exists => TRUE)", table, age
            )
            results.append(RetentionResult(table, "policy", 0))
            continue
        newest = await conn.fetchval(f"SELECT max({quote_ident(time_column)}) FROM {quote_ident(table)}")
        if newest is None:
            results.append(RetentionResult(table, "empty", 0))
            continue
        cutoff = newest - age
        if table in chunked:
            dropped = await conn.fetch("SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)", table, cutoff)
            results.append(RetentionResult(table, "drop_chunks", len(dropped)))
        else:
            status = await conn.execute(
                f"DELETE FROM {quote_ident(table)} WHERE {quote_ident(time_column)} < $1", cutoff
            )
            results.append(RetentionResult(table, "delete", int(status.split()[-1])))
    return results


class RetentionStage(Stage):
    name = "retention"

    async def run(self) -> None:
        self.counters.update(passes=0, chunks_dropped=0, rows_deleted=0, last_run=None)
        while True:
            conn = await connect(self.settings)
            try:
                results = await apply_retention(
                    conn, self.settings.retention_raw_days, self.settings.retention_metrics_days
                )
            finally:
                await conn.close()
            for result in results:
                if result.method == "drop_chunks":
                    self.counters["chunks_dropped"] += result.removed
                elif result.method == "delete":
                    self.counters["rows_deleted"] += result.removed
            self.counters["passes"] += 1
            self.counters["last_run"] = datetime.now(UTC).isoformat()
            self.counters["methods"] = {result.table: result.method for result in results}
            await asyncio.sleep(self.settings.retention_interval_s)
