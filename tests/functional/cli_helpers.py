"""Running the real `cryptotui` command as a subprocess, with exactly the given settings."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from cryptotui.config import Settings, child_env


def cryptotui(settings: Settings, *args: str, extra_env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = child_env(settings)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "cryptotui", *args], env=env, capture_output=True, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )


def stack_states(settings: Settings, extra_env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    result = cryptotui(settings, "stack", "status", "--json", extra_env=extra_env)
    assert result.returncode == 0, result.stderr
    return {service["name"]: service for service in json.loads(result.stdout)["services"]}
