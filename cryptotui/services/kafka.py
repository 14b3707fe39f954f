"""The Kafka broker: the embedded noida-db (Kafka wire protocol, one broker) or an external cluster.

cryptotui only speaks the standard Kafka protocol through its clients, so any real Kafka (a cluster,
Redpanda, MSK, Confluent) is used by setting CRYPTOTUI_KAFKA_BOOTSTRAP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from cryptotui.config import Settings
from cryptotui.services.base import (
    PortInUse,
    Service,
    ServiceError,
    ServiceStatus,
    pid_alive,
    port_free,
    port_open,
)

EMBEDDED_HOST = "127.0.0.1"
BROKER_BINARY = "noida-db"
START_TIMEOUT_S = 20
# noida-db writes its pid and version here while it runs.
CONTROL_FILE = "noida.control.json"


def bootstrap_servers(settings: Settings) -> str:
    """The address every Kafka client of cryptotui connects to."""
    return settings.kafka_bootstrap or f"{EMBEDDED_HOST}:{settings.kafka_port}"


def find_broker_binary() -> str | None:
    """The noida-db launcher installed with cryptotui (next to this Python), else one on PATH."""
    beside_python = Path(sys.executable).parent / BROKER_BINARY
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(BROKER_BINARY)


def admin_client(settings: Settings) -> AdminClient:
    # log_level 4: librdkafka logs harmless "purging unserved events" at info level when a client closes.
    return AdminClient({"bootstrap.servers": bootstrap_servers(settings), "socket.timeout.ms": 10_000, "log_level": 4})


class KafkaService(Service):
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.paths.kafka
        self.binary = find_broker_binary()

    @property
    def external(self) -> bool:
        return self.settings.kafka_bootstrap is not None

    @property
    def address(self) -> str:
        return bootstrap_servers(self.settings)

    def _control(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.data_dir / CONTROL_FILE).read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        control = self._control()
        return int(control["pid"]) if control and "pid" in control else None

    @property
    def installed(self) -> bool:
        return self.binary is not None

    def _broker_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.binary is not None
        result = subprocess.run(
            [self.binary, *args, "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if result.returncode != 0:
            raise ServiceError(f"noida-db {args[0]} failed: {(result.stderr or result.stdout).strip()[-600:]}")
        return result

    async def start(self) -> None:
        if self.external:
            await self._wait_metadata(f"cannot reach CRYPTOTUI_KAFKA_BOOTSTRAP {self.address}")
            return
        if self.binary is None:
            raise ServiceError("the noida-db broker is not installed: run `make setup`")
        state = self.local_state()
        if state == "running":
            return
        if state == "crashed":
            # The stale control file would make noida-db believe it is still running.
            (self.data_dir / CONTROL_FILE).unlink(missing_ok=True)
        if not port_free(self.settings.kafka_port):
            raise PortInUse(self.settings.kafka_port, "CRYPTOTUI_KAFKA_PORT")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(
            self._broker_command, "up", "--only", "kafka", "--host", EMBEDDED_HOST,
            "--kafka-port", str(self.settings.kafka_port),
        )
        await self._wait_metadata(f"the embedded broker on {self.address} did not become healthy")

    async def _wait_metadata(self, message: str) -> None:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            try:
                await asyncio.to_thread(self._list_topics, 3.0)
                return
            except (KafkaException, ServiceError) as error:
                if asyncio.get_running_loop().time() > deadline:
                    raise ServiceError(f"{message}: {error}") from None
                await asyncio.sleep(0.2)

    def _list_topics(self, timeout: float) -> list[str]:
        if not self.external and not port_open(self.settings.kafka_port):
            raise ServiceError("port not open")
        metadata = admin_client(self.settings).list_topics(timeout=timeout)
        return sorted(name for name in metadata.topics if not name.startswith("__"))

    async def stop(self) -> None:
        if self.external or self.local_state() != "running":
            return
        await asyncio.to_thread(self._broker_command, "down")

    def kill(self) -> None:
        """SIGKILL the broker (tests simulate crashes with it)."""
        pid = self.pid()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    async def provision(self) -> None:
        await asyncio.to_thread(self.create_topics, self.settings.all_topics)

    def create_topics(self, topics: list[str]) -> None:
        admin = admin_client(self.settings)
        existing = set(admin.list_topics(timeout=10).topics)
        wanted = [
            NewTopic(topic, num_partitions=self.settings.kafka_partitions,
                     replication_factor=self.settings.kafka_replication_factor)
            for topic in topics
            if topic not in existing
        ]
        if not wanted:
            return
        for topic, future in admin.create_topics(wanted, operation_timeout=10).items():
            try:
                future.result()
            except KafkaException as error:
                if error.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise ServiceError(f"cannot create topic {topic}: {error}") from None

    async def status(self) -> ServiceStatus:
        state = self.local_state()
        status = ServiceStatus(self.name, state, address=self.address, details={"topics": []})  # type: ignore[arg-type]
        if state == "not-installed":
            status.address = None
            return status
        if not self.external:
            control = self._control() or {}
            status.pid = self.pid() if state == "running" else None
            status.version = f"noida-db {control['version']}" if state == "running" and "version" in control else None
            status.details["data_dir"] = str(self.data_dir)
        if state in ("running", "external"):
            try:
                status.details["topics"] = await asyncio.to_thread(self._list_topics, 5.0)
            except (KafkaException, ServiceError) as error:
                if state == "external":
                    status.state = "unreachable"
                status.details["error"] = str(error)
        return status
