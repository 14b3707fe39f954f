"""Schema migrations in both modes (TimescaleDB hypertables and plain PostgreSQL), and retention."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from cryptotui.config import Settings
from cryptotui.db.connection import database_url
from cryptotui.db.schema import SchemaError, apply_schema, load_migrations
from cryptotui.db.tables import TIME_SERIES_TABLES
from cryptotui.services.stack import Stack
from cryptotui.stages.retention import apply_retention
from tests.conftest import drop_database

CATALOG_QUERY = """
SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns
WHERE table_schema = 'public' ORDER BY 1, 2
"""


@pytest_asyncio.fixture
async def empty_db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """A database with no schema yet."""
    name = f"schema_{uuid.uuid4().hex[:8]}"
    await stack.postgres.create_database(name)
    settings = stack.settings.model_copy(update={"database_name": name})
    conn = await asyncpg.connect(database_url(settings))
    yield conn
    await conn.close()
    await drop_database(stack, name)


async def catalog(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    columns = [tuple(row) for row in await conn.fetch(CATALOG_QUERY)]
    indexes = [tuple(row) for row in await conn.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2")]
    migrations = [tuple(row) for row in await conn.fetch("SELECT version, name, applied_at FROM schema_migrations")]
    return columns + indexes + migrations


async def test_timescaledb_mode_makes_hypertables(empty_db: asyncpg.Connection) -> None:
    report = await apply_schema(empty_db, "auto")
    assert report.applied == [m.version for m in load_migrations()]
    assert report.timescaledb_license == "apache"
    assert sorted(report.hypertables) == sorted(TIME_SERIES_TABLES)
    interval = await empty_db.fetchval(
        "SELECT time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = 'trades'")
    assert interval == timedelta(days=1)


async def test_plain_mode_has_tables_without_extension(empty_db: asyncpg.Connection) -> None:
    report = await apply_schema(empty_db, "off")
    assert report.timescaledb_version is None and report.hypertables == []
    rows = await empty_db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    tables = {row["tablename"] for row in rows}
    assert tables >= {*TIME_SERIES_TABLES, "stage_status", "schema_migrations"}
    indexes = {row["indexname"] for row in await empty_db.fetch("SELECT indexname FROM pg_indexes")}
    assert {"trades_pkey", "book_ticker_pkey", "trade_metrics_window"} <= indexes


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_migrations_applied_twice_change_nothing(empty_db: asyncpg.Connection, mode: str) -> None:
    await apply_schema(empty_db, mode)  # type: ignore[arg-type]
    before = await catalog(empty_db)
    report = await apply_schema(empty_db, mode)  # type: ignore[arg-type]
    assert report.applied == []
    assert await catalog(empty_db) == before


async def test_timescaledb_on_works_where_the_extension_is_preloaded(empty_db: asyncpg.Connection) -> None:
    await apply_schema(empty_db, "on")
    count = await empty_db.fetchval("SELECT count(*) FROM timescaledb_information.hypertables")
    assert count == len(TIME_SERIES_TABLES)


async def test_timescaledb_on_without_the_extension_names_the_setting(
    empty_db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's server preloads TimescaleDB; starting a second server without it only to get a
    # False from this probe would cost seconds, and the probe itself is exercised for real above.
    async def not_preloaded(_: asyncpg.Connection) -> bool:
        return False

    monkeypatch.setattr("cryptotui.db.schema.timescaledb_available", not_preloaded)
    with pytest.raises(SchemaError, match="CRYPTOTUI_TIMESCALEDB=on"):
        await apply_schema(empty_db, "on")


async def test_concurrent_schema_application_is_serialised(stack: Stack, empty_db: asyncpg.Connection) -> None:
    import asyncio

    url = database_url(stack.settings).rsplit("/", 1)[0] + "/" + await empty_db.fetchval("SELECT current_database()")
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        reports = await asyncio.gather(*(apply_schema(conn, "auto") for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    applied = [report.applied for report in reports]
    assert sum(len(a) for a in applied) == len(load_migrations()), "each migration applied exactly once"


async def _insert_trades(conn: asyncpg.Connection, newest: datetime, ages_days: list[float]) -> None:
    rows = [
        ("BTCUSDT", i, newest - timedelta(days=age), newest - timedelta(days=age), Decimal("1.5"), Decimal("2"), False,
         newest - timedelta(days=age))
        for i, age in enumerate(ages_days)
    ]
    await conn.executemany(
        "INSERT INTO trades (symbol, trade_id, trade_time, event_time, price, qty, is_buyer_maker, recv_time)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", rows)


@pytest.mark.parametrize("mode", ["auto", "off"])
async def test_retention_measures_age_from_newest_row(empty_db: asyncpg.Connection, mode: str) -> None:
    await apply_schema(empty_db, mode)  # type: ignore[arg-type]
    # An old replay: the newest row is a year ago, so nothing is "old" relative to the clock's view.
    newest = datetime(2025, 1, 15, 12, tzinfo=UTC)
    await _insert_trades(empty_db, newest, [0, 1, 3, 9, 10, 20])
    results = {r.table: r for r in await apply_retention(empty_db, raw_days=7, metrics_days=90)}
    remaining = sorted(row["trade_id"] for row in await empty_db.fetch("SELECT trade_id FROM trades"))
    if mode == "auto":
        assert results["trades"].method == "drop_chunks"
        # Whole 1-day chunks older than the cutoff are dropped; the chunk holding the cutoff stays.
        assert remaining == [0, 1, 2]
    else:
        assert results["trades"].method == "delete" and results["trades"].removed == 3
        assert remaining == [0, 1, 2]
    assert results["trade_metrics"].method == "empty"


async def test_retention_stage_runs_under_the_contract(settings: Settings, db: asyncpg.Connection) -> None:
    from tests.functional.stage_helpers import run_stage_until_heartbeats

    status = await run_stage_until_heartbeats(settings, "retention", db, heartbeats=2)
    assert status["state"] == "stopped"
    assert status["counters"]["passes"] >= 1
    assert status["counters"]["methods"]["trades"] in ("empty", "drop_chunks", "delete")
