"""The stack commands against real services: lifecycle, crashes, external mode, ports, kcat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from cryptotui.config import Settings
from cryptotui.db.connection import database_url
from cryptotui.services.kafka import bootstrap_servers
from cryptotui.services.stack import Stack, temporary_settings
from tests.functional.cli_helpers import cryptotui, stack_states


@pytest.fixture
def own_stack_settings() -> Iterator[Settings]:
    """Settings for a stack this test starts itself (the lifecycle under test); always torn down."""
    data_dir = Path(tempfile.mkdtemp(prefix="cryptotui-life-", dir="/tmp"))
    data_dir.chmod(0o755)
    settings = temporary_settings(data_dir)
    yield settings
    cryptotui(settings, "stack", "down")
    stack = Stack(settings)
    stack.postgres.kill()
    stack.kafka.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_lifecycle_up_crash_recover_down(own_stack_settings: Settings) -> None:
    settings = own_stack_settings
    up = cryptotui(settings, "stack", "up")
    assert up.returncode == 0, up.stderr
    states = stack_states(settings)
    assert states["postgres"]["state"] == "running"
    assert states["postgres"]["address"] == f"127.0.0.1:{settings.postgres_port}"
    assert states["postgres"]["timescaledb"]["license"] == "apache"
    assert states["kafka"]["state"] == "running"
    assert set(states["kafka"]["topics"]) >= {"binance.trade", "binance.aggtrade", "binance.bookticker", "binance.dlq"}
    assert states["grafana"]["state"] == "not-installed"
    password_file = settings.paths.postgres_password_file
    assert password_file.stat().st_mode & 0o777 == 0o600

    # Running services are left alone by a second `up`.
    pids = {name: states[name]["pid"] for name in ("postgres", "kafka")}
    assert cryptotui(settings, "stack", "up").returncode == 0
    assert {name: stack_states(settings)[name]["pid"] for name in pids} == pids

    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    _wait_dead(pids.values())
    states = stack_states(settings)
    assert states["postgres"]["state"] == "crashed"
    assert states["kafka"]["state"] == "crashed"

    recovered = cryptotui(settings, "stack", "up")
    assert recovered.returncode == 0, recovered.stderr
    states = stack_states(settings)
    assert states["postgres"]["state"] == "running" and states["kafka"]["state"] == "running"
    assert states["postgres"]["pid"] != pids["postgres"]

    down = cryptotui(settings, "stack", "down")
    assert down.returncode == 0, down.stderr
    states = stack_states(settings)
    assert states["postgres"]["state"] == "stopped" and states["kafka"]["state"] == "stopped"
    assert (settings.paths.postgres / "PG_VERSION").exists(), "down keeps the data"


def _wait_dead(pids: object) -> None:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):  # type: ignore[attr-defined]
            return
        time.sleep(0.1)


def test_busy_port_names_port_and_setting(own_stack_settings: Settings) -> None:
    settings = own_stack_settings
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", settings.postgres_port))
        blocker.listen()
        result = cryptotui(settings, "stack", "up")
    assert result.returncode == 1
    assert f"port {settings.postgres_port}" in result.stderr
    assert "CRYPTOTUI_POSTGRES_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_kafka_port_names_its_setting(own_stack_settings: Settings) -> None:
    settings = own_stack_settings
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", settings.kafka_port))
        blocker.listen()
        result = cryptotui(settings, "stack", "up")
    assert result.returncode == 1
    assert f"port {settings.kafka_port}" in result.stderr and "CRYPTOTUI_KAFKA_PORT" in result.stderr


async def test_external_services_are_checked_and_provisioned(stack: Stack, settings: Settings) -> None:
    """Point a second configuration at the session's servers as external ones."""
    external = {
        "CRYPTOTUI_DATABASE_URL": database_url(settings),
        "CRYPTOTUI_KAFKA_BOOTSTRAP": bootstrap_servers(settings),
        "CRYPTOTUI_TOPIC_TRADE": settings.topic_trade + ".ext",
    }
    data_dir = Path(tempfile.mkdtemp(prefix="cryptotui-ext-", dir="/tmp"))
    try:
        own = temporary_settings(data_dir)
        result = cryptotui(own, "stack", "up", extra_env=external)
        assert result.returncode == 0, result.stderr
        states = stack_states(own, extra_env=external)
        assert states["postgres"]["state"] == "external"
        assert states["postgres"]["timescaledb"]["version"]
        assert "***" in states["postgres"]["address"], "the password is never printed"
        assert states["kafka"]["state"] == "external"
        assert settings.topic_trade + ".ext" in states["kafka"]["topics"]
        assert not (data_dir / "postgres").exists(), "nothing embedded was started"
        down = cryptotui(own, "stack", "down", extra_env=external)
        assert down.returncode == 0
        assert stack.postgres.pid() is not None and stack.kafka.pid() is not None, "external services untouched"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_unreachable_external_database_is_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    own = temporary_settings(tmp_path)
    result = cryptotui(own, "stack", "up", extra_env={"CRYPTOTUI_DATABASE_URL": f"postgresql://u:secret@127.0.0.1:{port}/x"})
    assert result.returncode == 1
    assert "cannot reach CRYPTOTUI_DATABASE_URL postgresql://u:***@127.0.0.1" in result.stderr
    assert "secret" not in result.stderr


def test_kcat_lists_the_topics(settings: Settings) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is installed by make setup"
    result = subprocess.run([kcat, "-b", bootstrap_servers(settings), "-L", "-J"], capture_output=True,
                            text=True, timeout=30, check=True)
    topics = {topic["topic"]: len(topic["partitions"]) for topic in json.loads(result.stdout)["topics"]}
    for topic in settings.all_topics:
        assert topics[topic] == settings.kafka_partitions


async def test_stack_env_reaches_the_same_services(settings: Settings) -> None:
    result = cryptotui(settings, "stack", "env")
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    url = exports["CRYPTOTUI_DATABASE_URL"].strip("'")
    psql = subprocess.run(["psql", url, "-tAc", "SELECT count(*) FROM trades"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert psql.returncode == 0, psql.stderr
    assert exports["CRYPTOTUI_KAFKA_BOOTSTRAP"].strip("'") == bootstrap_servers(settings)
    conn = await asyncpg.connect(url)
    await conn.close()
