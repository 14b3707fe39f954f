"""What the supervisor tells its listeners (the daemon's log, later the TUI): small immutable events.

Every event has a wall-clock `time`, a `kind` (snake_case of the class name) and `to_json()` for a log
line. `name` is a stage (`sink`, `ingest`, ...) or a supervised service (`feed`); `role` says which.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

Role = Literal["stage", "service"]
_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(frozen=True)
class SupervisorEvent:
    """Base of every event."""

    time: float = field(default_factory=time.time, kw_only=True)
    LEVEL: ClassVar[str] = "info"

    @property
    def level(self) -> str:
        """Log level of this event: debug, info, warning or error."""
        return self.LEVEL

    @property
    def kind(self) -> str:
        return _CAMEL_RE.sub("_", type(self).__name__).lower()

    def message(self) -> str:
        """One human sentence for a log line."""
        return self.kind.replace("_", " ")

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True)
class StackStep(SupervisorEvent):
    """A step while bringing the stack up or down (`starting postgres at 127.0.0.1:54320`)."""

    step: str

    def message(self) -> str:
        return self.step


@dataclass(frozen=True)
class ServiceStateChanged(SupervisorEvent):
    """A service (postgres, kafka, grafana, feed) changed state (`running`, `crashed`, ...)."""

    name: str
    state: str
    previous: str | None = None
    detail: str | None = None

    def message(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"service {self.name}: {self.previous or '-'} -> {self.state}{extra}"


@dataclass(frozen=True)
class StateChanged(SupervisorEvent):
    """A supervised process changed state: stopped, starting, running, stopping, backoff, failed."""

    name: str
    role: Role
    state: str
    previous: str

    def message(self) -> str:
        return f"{self.role} {self.name}: {self.previous} -> {self.state}"


@dataclass(frozen=True)
class ProcessStarted(SupervisorEvent):
    name: str
    role: Role
    pid: int
    restarts: int

    def message(self) -> str:
        return f"{self.role} {self.name} started (pid {self.pid}, restarts {self.restarts})"


@dataclass(frozen=True)
class ProcessExited(SupervisorEvent):
    """A supervised process ended; `expected` is False for a crash (it was not asked to stop)."""

    name: str
    role: Role
    pid: int
    returncode: int
    expected: bool
    uptime_s: float
    last_error: str | None = None

    @property
    def level(self) -> str:
        return "info" if self.expected else "error"

    def message(self) -> str:
        how = "stopped" if self.expected else "crashed"
        why = f": {self.last_error}" if self.last_error and not self.expected else ""
        return (f"{self.role} {self.name} {how} (pid {self.pid}, exit {self.returncode}, "
                f"up {self.uptime_s:.1f} s){why}")


@dataclass(frozen=True)
class RestartScheduled(SupervisorEvent):
    name: str
    role: Role
    delay_s: float
    restarts: int
    LEVEL: ClassVar[str] = "warning"

    def message(self) -> str:
        return f"{self.role} {self.name}: restart #{self.restarts} in {self.delay_s:.1f} s"


@dataclass(frozen=True)
class ProcessHung(SupervisorEvent):
    """No heartbeat in `stage_status` for too long: the process is killed and restarted."""

    name: str
    role: Role
    pid: int
    heartbeat_age_s: float | None
    LEVEL: ClassVar[str] = "warning"

    def message(self) -> str:
        age = "never" if self.heartbeat_age_s is None else f"{self.heartbeat_age_s:.1f} s ago"
        return f"{self.role} {self.name} (pid {self.pid}) is hung: last heartbeat {age}; killing it"


@dataclass(frozen=True)
class LogLine(SupervisorEvent):
    """One line a supervised process wrote (stdout and stderr together)."""

    name: str
    line: str
    LEVEL: ClassVar[str] = "debug"

    def message(self) -> str:
        return f"{self.name}: {self.line}"


@dataclass(frozen=True)
class SupervisorError(SupervisorEvent):
    """Something the supervisor could not do (a start that failed, a database it cannot reach)."""

    error: str
    name: str | None = None
    LEVEL: ClassVar[str] = "error"

    def message(self) -> str:
        return f"{self.name}: {self.error}" if self.name else self.error


@dataclass(frozen=True)
class SupervisorStarted(SupervisorEvent):
    stages: tuple[str, ...]
    source: str

    def message(self) -> str:
        return f"pipeline running: source {self.source}, stages {', '.join(self.stages)}"


@dataclass(frozen=True)
class SupervisorStopped(SupervisorEvent):
    stack_stopped: bool

    def message(self) -> str:
        return "pipeline stopped" + (" (stack stopped)" if self.stack_stopped else " (stack kept running)")
