"""Grafana: listed in the stack's status; started by a later issue when a server binary exists.

No Grafana server can be installed on the machines cryptotui is developed on (see the README), so here
it reports `not-installed` unless `grafana` or `grafana-server` is on the PATH.
"""

from __future__ import annotations

import shutil

from cryptotui.config import Settings
from cryptotui.services.base import Service, ServiceStatus


def find_grafana_binary() -> str | None:
    return shutil.which("grafana") or shutil.which("grafana-server")


class GrafanaService(Service):
    name = "grafana"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.binary = find_grafana_binary()

    @property
    def external(self) -> bool:
        return False

    async def start(self) -> None:
        """Nothing yet: dashboards are file-provisioned for a Grafana the user runs."""

    async def stop(self) -> None:
        """Nothing to stop: cryptotui does not start Grafana yet."""

    async def provision(self) -> None:
        """Provisioning is by files in grafana/provisioning."""

    async def status(self) -> ServiceStatus:
        if self.binary is None:
            return ServiceStatus(self.name, "not-installed")
        return ServiceStatus(self.name, "stopped", address=f"127.0.0.1:{self.settings.grafana_port}",
                             details={"binary": self.binary})
