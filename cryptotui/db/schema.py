"""Versioned, idempotent schema migrations, with TimescaleDB hypertables when available.

Migrations are the numbered SQL files in `migrations/`, applied in order under an advisory lock (stages
start concurrently and all apply the schema). Converting tables to hypertables is a separate, idempotent
step because it depends on the server, not on the schema version: the same migrations serve a plain
PostgreSQL and a TimescaleDB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import asyncpg

from cryptotui.db.tables import TIME_SERIES_TABLES

log = logging.getLogger(__name__)

# Arbitrary, fixed: serialises concurrent schema application across processes.
SCHEMA_LOCK_ID = 0x63727970746F
TimescaleMode = Literal["auto", "on", "off"]


class SchemaError(Exception):
    """The schema cannot be applied as configured (e.g. TimescaleDB required but missing)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class SchemaReport:
    applied: list[int]
    current_version: int
    timescaledb_version: str | None
    timescaledb_license: str | None
    hypertables: list[str]

    @property
    def timescaledb(self) -> bool:
        return self.timescaledb_version is not None


def load_migrations() -> list[Migration]:
    folder = resources.files("cryptotui.db") / "migrations"
    migrations = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            migrations.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(migrations, key=lambda migration: migration.version)


async def timescaledb_available(conn: asyncpg.Connection) -> bool:
    """The extension is installed on the server and preloaded (it cannot be created otherwise)."""
    available = await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
    if not available:
        return False
    preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
    return "timescaledb" in preload


async def timescaledb_info(conn: asyncpg.Connection) -> tuple[str | None, str | None]:
    """(version, license) of the extension in this database, or (None, None)."""
    version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    if version is None:
        return None, None
    license_ = await conn.fetchval("SELECT current_setting('timescaledb.license', true)")
    return version, license_


async def hypertables(conn: asyncpg.Connection) -> list[str]:
    if (await timescaledb_info(conn))[0] is None:
        return []
    rows = await conn.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1")
    return [row["hypertable_name"] for row in rows]


async def _apply_migrations(conn: asyncpg.Connection) -> list[int]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        log.info("applying migration %04d_%s", migration.version, migration.name)
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
        )
        applied.append(migration.version)
    return applied


async def _make_hypertables(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    existing = set(await hypertables(conn))
    for table, time_column in TIME_SERIES_TABLES.items():
        if table in existing:
            continue
        await conn.execute(
            "SELECT create_hypertable($1::regclass, $2::name, chunk_time_interval => INTERVAL '1 day',"
            " if_not_exists => TRUE, migrate_data => TRUE)",
            table,
            time_column,
        )


async def apply_schema(conn: asyncpg.Connection, timescaledb: TimescaleMode = "auto") -> SchemaReport:
    """Bring the database to the newest schema; safe to call concurrently and repeatedly."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
        applied = await _apply_migrations(conn)
        if timescaledb != "off":
            if await timescaledb_available(conn):
                await _make_hypertables(conn)
            elif timescaledb == "on":
                raise SchemaError(
                    "CRYPTOTUI_TIMESCALEDB=on but the timescaledb extension is not installed and preloaded "
                    "on this server (shared_preload_libraries)"
                )
    version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    ts_version, ts_license = await timescaledb_info(conn)
    return SchemaReport(applied, version or 0, ts_version, ts_license, await hypertables(conn))
