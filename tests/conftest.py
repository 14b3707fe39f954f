"""Shared fixtures: one real stack (PostgreSQL/TimescaleDB + Kafka broker) per test session.

Tests that need isolation take `settings`: unique topics on the shared broker and a fresh database on
the shared server, so tests never see each other's data and services start only once per session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

# Hermetic settings: neither the developer's config file nor their environment leaks into tests.
os.environ["CRYPTOTUI_CONFIG_FILE"] = "/nonexistent/cryptotui-test-config.toml"
for _key in [key for key in os.environ if key.startswith("CRYPTOTUI_") and key != "CRYPTOTUI_CONFIG_FILE"]:
    del os.environ[_key]

from cryptotui.config import Settings  # noqa: E402
from cryptotui.db.connection import database_url  # noqa: E402
from cryptotui.db.schema import apply_schema  # noqa: E402
from cryptotui.services.stack import Stack, temporary_stack  # noqa: E402


@pytest_asyncio.fixture(scope="session")
async def stack() -> AsyncIterator[Stack]:
    """A running embedded stack for the whole session (torn down and deleted at the end)."""
    async with temporary_stack() as running:
        yield running


@pytest_asyncio.fixture
async def settings(stack: Stack) -> AsyncIterator[Settings]:
    """Settings isolated for one test: unique topics (created) and a fresh database with the schema."""
    suffix = uuid.uuid4().hex[:8]
    database = f"test_{suffix}"
    isolated = stack.settings.model_copy(
        update={
            "database_name": database,
            "topic_trade": f"t{suffix}.trade",
            "topic_aggtrade": f"t{suffix}.aggtrade",
            "topic_bookticker": f"t{suffix}.bookticker",
            "topic_dlq": f"t{suffix}.dlq",
        }
    )
    await stack.postgres.create_database(database)
    conn = await asyncpg.connect(database_url(isolated))
    try:
        await apply_schema(conn, isolated.timescaledb)
    finally:
        await conn.close()
    stack.kafka.create_topics(isolated.all_topics)
    yield isolated
    await drop_database(stack, database)


async def drop_database(stack: Stack, database: str) -> None:
    """Drop a test database; a stopped server (a test stopped it) keeps it, which is harmless."""
    try:
        conn = await asyncpg.connect(database_url(stack.settings).rsplit("/", 1)[0] + "/postgres")
    except (OSError, asyncpg.PostgresError):
        return
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's own database."""
    conn = await asyncpg.connect(database_url(settings))
    yield conn
    await conn.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may be skipped silently: a skipped test fails the run there."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) were skipped; every test must run in CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
