"""Where cryptotui keeps its files: one place, so every stage and service agrees."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "cryptotui"


def default_data_dir() -> Path:
    """The user data directory, or a system location for root.

    PostgreSQL refuses to run as root and runs under the `postgres` account instead; that account
    cannot traverse root's home (mode 700), so root gets /var/lib/cryptotui.
    """
    if os.geteuid() == 0:
        return Path("/var/lib") / APP_NAME
    return Path(platformdirs.user_data_dir(APP_NAME))


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


@dataclass(frozen=True)
class DataPaths:
    """The layout of the data directory."""

    root: Path

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def postgres_log(self) -> Path:
        return self.root / "logs" / "postgres.log"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def postgres_password_file(self) -> Path:
        return self.secrets / "postgres.password"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def spill(self) -> Path:
        return self.root / "spill"

    @property
    def spark(self) -> Path:
        return self.root / "spark"

    @property
    def spark_checkpoint(self) -> Path:
        return self.spark / "checkpoint"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def ensure(self) -> None:
        for path in (self.root, self.logs, self.run, self.spill):
            path.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
