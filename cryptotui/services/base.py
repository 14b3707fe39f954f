"""What every service offers the stack manager, the supervisor and the TUI."""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ServiceState = Literal["running", "stopped", "crashed", "external", "not-installed", "unreachable"]


class ServiceError(Exception):
    """A service cannot be started or reached; the message tells the user what to do."""


class PortInUse(ServiceError):
    def __init__(self, port: int, setting: str) -> None:
        super().__init__(f"port {port} on 127.0.0.1 is in use by another program; set {setting} to another port")
        self.port = port
        self.setting = setting


@dataclass
class ServiceStatus:
    name: str
    state: ServiceState
    pid: int | None = None
    address: str | None = None
    version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        details = data.pop("details")
        return {**data, **details}


class Service(ABC):
    """A long-running server the stages depend on."""

    name: str

    @property
    @abstractmethod
    def external(self) -> bool:
        """True when the user points cryptotui at a server it does not manage."""

    @property
    def installed(self) -> bool:
        """The service's binaries are on this machine (external services need none)."""
        return True

    def pid(self) -> int | None:
        """The pid the running (or crashed) embedded server recorded, else None."""
        return None

    def local_state(self) -> ServiceState:
        """State from the pid file alone: a recorded pid that is gone means the server crashed."""
        if self.external:
            return "external"
        if not self.installed:
            return "not-installed"
        pid = self.pid()
        if pid is None:
            return "stopped"
        return "running" if pid_alive(pid) else "crashed"

    @abstractmethod
    async def start(self) -> None:
        """Start (or, when external, check) the service and wait until it is healthy; idempotent."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the service cleanly, keeping its data; a no-op for external services."""

    @abstractmethod
    async def status(self) -> ServiceStatus: ...

    @abstractmethod
    async def provision(self) -> None:
        """Create what the pipeline needs on the service (schema, topics)."""


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
