"""Log files of supervised processes: one rotating file per process, plus its last lines in memory.

`<logs>/<name>.log` is the current file; at `max_bytes` it becomes `<name>.log.1`, the previous `.1`
becomes `.2` and so on, keeping `backups` old files. `tail_file()` reads the last lines of a log from
disk (across a rotation), for a UI that starts after the lines were written.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import IO

DEFAULT_MAX_BYTES = 5 * 1024 * 1024
DEFAULT_BACKUPS = 3
DEFAULT_KEEP_LINES = 500


def rotated_paths(path: Path, backups: int) -> list[Path]:
    """The current file then its backups, newest first: `x.log`, `x.log.1`, ..., `x.log.N`."""
    return [path] + [path.with_name(f"{path.name}.{index}") for index in range(1, backups + 1)]


class RotatingLog:
    """Append-only text log with size-based rotation; `tail(n)` answers from memory."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 keep_lines: int = DEFAULT_KEEP_LINES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        if backups < 0:
            raise ValueError("backups must be >= 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._handle: IO[bytes] | None = None
        self._size = 0

    def _open(self) -> IO[bytes]:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
            self._size = self._handle.tell()
        return self._handle

    def _rotate(self) -> None:
        self.close()
        paths = rotated_paths(self.path, self.backups)
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            paths[-1].unlink(missing_ok=True)
            for newer, older in zip(reversed(paths[:-1]), reversed(paths[1:]), strict=True):
                if newer.exists():
                    os.replace(newer, older)

    def write(self, line: str) -> None:
        """Append one line (a trailing newline is added) and remember it for `tail()`."""
        line = line.rstrip("\r\n")
        self._lines.append(line)
        data = (line + "\n").encode("utf-8", errors="replace")
        handle = self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
            handle = self._open()
        handle.write(data)
        handle.flush()
        self._size += len(data)

    def tail(self, lines: int = 50) -> list[str]:
        """The last `lines` lines written through this object (newest last)."""
        if lines <= 0:
            return []
        return list(self._lines)[-lines:]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _last_lines(path: Path, lines: int, block: int = 8192) -> list[str]:
    """The last `lines` lines of one file, reading backwards in blocks (files may be large)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            position = handle.tell()
            data = b""
            while position > 0 and data.count(b"\n") <= lines:
                step = min(block, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    result = text.splitlines()
    return result[-lines:] if lines > 0 else []


def tail_file(path: Path, lines: int = 50, backups: int = DEFAULT_BACKUPS) -> list[str]:
    """The last `lines` lines of a rotating log on disk, continuing into its backups when needed."""
    collected: list[str] = []
    for candidate in rotated_paths(Path(path), backups):
        if len(collected) >= lines:
            break
        collected = _last_lines(candidate, lines - len(collected)) + collected
    return collected[-lines:] if lines > 0 else []
