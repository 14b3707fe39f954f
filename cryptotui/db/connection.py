"""How every part of cryptotui reaches the database."""

from __future__ import annotations

from urllib.parse import quote

import asyncpg

from cryptotui.config import Settings

EMBEDDED_HOST = "127.0.0.1"


class DatabaseNotReady(Exception):
    """The embedded database has no password file yet: `cryptotui stack up` has not run."""


def read_embedded_password(settings: Settings) -> str:
    path = settings.paths.postgres_password_file
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise DatabaseNotReady(
            f"no database password at {path}: run `cryptotui stack up` or set CRYPTOTUI_DATABASE_URL"
        ) from None


def database_url(settings: Settings) -> str:
    """The external URL when configured, else the embedded server's URL with its generated password."""
    if settings.database_url:
        return settings.database_url
    password = quote(read_embedded_password(settings), safe="")
    return (
        f"postgresql://{quote(settings.database_user, safe='')}:{password}@{EMBEDDED_HOST}:"
        f"{settings.postgres_port}/{quote(settings.database_name, safe='')}"
    )


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and status output."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


async def connect(settings: Settings, timeout: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(database_url(settings), timeout=timeout)


async def create_pool(settings: Settings, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(database_url(settings), min_size=min_size, max_size=max_size, timeout=10)
