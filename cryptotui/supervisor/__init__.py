"""The supervisor: the stack, the feed server and the stages as child processes, restarts, logs, events.

`Supervisor` is a library first: the headless daemon (`cryptotui --daemon`) and the TUI drive the same
object through its methods (`start_all`, `stop_all`, `start`, `stop`, `restart`, `status`, `logs`) and
its event stream (`events()`, `subscribe()`).
"""

from cryptotui.supervisor.events import (
    LogLine,
    ProcessExited,
    ProcessHung,
    ProcessStarted,
    RestartScheduled,
    ServiceStateChanged,
    StackStep,
    StateChanged,
    SupervisorError,
    SupervisorEvent,
    SupervisorStarted,
    SupervisorStopped,
)
from cryptotui.supervisor.supervisor import (
    DEFAULT_STAGES,
    BackoffPolicy,
    ProcessStatus,
    Supervisor,
    SupervisorStartError,
    SupervisorStatus,
)

__all__ = [
    "DEFAULT_STAGES",
    "BackoffPolicy",
    "LogLine",
    "ProcessExited",
    "ProcessHung",
    "ProcessStarted",
    "ProcessStatus",
    "RestartScheduled",
    "ServiceStateChanged",
    "StackStep",
    "StateChanged",
    "Supervisor",
    "SupervisorError",
    "SupervisorEvent",
    "SupervisorStartError",
    "SupervisorStarted",
    "SupervisorStatus",
    "SupervisorStopped",
]
