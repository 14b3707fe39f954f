"""Commit latency of the sink: receive time (recv_ns, stamped by ingest) -> row committed.

Latencies are counted in fixed buckets per second of commit time and kept for a sliding window, so the
cost per row is one dict increment and percentiles never need to sort millions of values.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

NS_PER_MS = 1_000_000


def bucket_ms(latency_ms: int) -> int:
    """The upper edge of a latency's bucket: 1 ms steps below 1 s, 10 ms below 10 s, then 1 s."""
    if latency_ms < 1000:
        return latency_ms + 1
    if latency_ms < 10_000:
        return (latency_ms // 10 + 1) * 10
    return (latency_ms // 1000 + 1) * 1000


class LatencyWindow:
    """Per-row commit latencies of the last `window_s` seconds, as bucket counts."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._seconds: deque[tuple[int, Counter[int]]] = deque()
        self._max_ms = 0

    def add(self, committed_ns: int, recv_ns: Iterable[int], now: float | None = None) -> int:
        """Count the rows of one committed batch; returns the batch's largest latency in ms."""
        second = int(time.monotonic() if now is None else now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append((second, Counter()))
        counts = self._seconds[-1][1]
        largest = 0
        for ns in recv_ns:
            ms = (committed_ns - ns) // NS_PER_MS
            if ms < 0:
                ms = 0  # a receive clock ahead of ours: count as no delay
            if ms > largest:
                largest = ms
            counts[bucket_ms(ms)] += 1
        self._expire(second)
        return largest

    def _expire(self, second: int) -> None:
        while self._seconds and self._seconds[0][0] <= second - self.window_s:
            self._seconds.popleft()

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """{"rows", "p50_ms", "p99_ms", "max_ms"} over the window (bucket upper edges: conservative)."""
        self._expire(int(time.monotonic() if now is None else now))
        total: Counter[int] = Counter()
        for _, counts in self._seconds:
            total.update(counts)
        rows = sum(total.values())
        if not rows:
            return {"rows": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        edges = sorted(total)
        result: dict[str, Any] = {"rows": rows, "max_ms": edges[-1]}
        for name, fraction in (("p50_ms", 0.50), ("p99_ms", 0.99)):
            wanted = fraction * rows
            seen = 0
            for edge in edges:
                seen += total[edge]
                if seen >= wanted:
                    result[name] = edge
                    break
        return result
