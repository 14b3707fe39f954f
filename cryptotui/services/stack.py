"""The stack: the services the pipeline needs, brought up and down together."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cryptotui.config import Settings, load_settings
from cryptotui.db.connection import database_url
from cryptotui.services.base import Service, ServiceStatus, free_port
from cryptotui.services.grafana import GrafanaService
from cryptotui.services.kafka import KafkaService, bootstrap_servers
from cryptotui.services.postgres import PostgresService

Report = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.postgres = PostgresService(settings)
        self.kafka = KafkaService(settings)
        self.grafana = GrafanaService(settings)

    @property
    def services(self) -> list[Service]:
        return [self.postgres, self.kafka, self.grafana]

    async def up(self, report: Report = _quiet) -> None:
        """Start what is not running (restart what crashed), then create the schema and the topics."""
        self.settings.paths.ensure()
        for service in (self.postgres, self.kafka):
            where = "checking external" if service.external else "starting"
            report(f"{where} {service.name} at {service.address}")
            await service.start()
            report(f"{service.name}: {'schema' if service is self.postgres else 'topics'}")
            await service.provision()
            report(f"{service.name} ready")

    async def down(self, report: Report = _quiet) -> None:
        """Stop the embedded services (data is kept); external ones are left alone."""
        for service in (self.kafka, self.postgres):
            if not service.external:
                report(f"stopping {service.name}")
                await service.stop()

    async def status(self) -> list[ServiceStatus]:
        return [await service.status() for service in self.services]

    async def status_json(self) -> dict[str, Any]:
        return {"data_dir": str(self.settings.data_dir), "services": [s.to_json() for s in await self.status()]}

    def env_lines(self) -> list[str]:
        """Shell exports so psql, kcat and other tools reach the same services."""
        return [
            f"export CRYPTOTUI_DATABASE_URL='{database_url(self.settings)}'",
            f"export CRYPTOTUI_KAFKA_BOOTSTRAP='{bootstrap_servers(self.settings)}'",
        ]


def temporary_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a throwaway stack: free ports, embedded services whatever the environment says."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "postgres_port": free_port(),
        "kafka_port": free_port(),
        "database_url": None,
        "kafka_bootstrap": None,
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def temporary_stack(**overrides: Any) -> AsyncIterator[Stack]:
    """A throwaway stack in a temporary directory, for tests and benchmarks; removed afterwards."""
    # /tmp rather than a private temp dir: as root, the `postgres` account must traverse the path.
    data_dir = Path(tempfile.mkdtemp(prefix="cryptotui-", dir=os.environ.get("CRYPTOTUI_TMP", "/tmp")))
    data_dir.chmod(0o755)
    stack = Stack(temporary_settings(data_dir, **overrides))
    try:
        await stack.up()
        yield stack
    finally:
        with contextlib.suppress(Exception):
            await stack.down()
        for service in (stack.kafka, stack.postgres):
            service.kill()  # in case a stop failed: never leave a server behind
        shutil.rmtree(data_dir, ignore_errors=True)
