"""The benchmark commands run and print the JSON keys the README promises.

Only their shape is checked here: speed targets are judged from the benchmarks' own figures on a quiet
machine, never by timed tests. The Spark and e2e benchmarks take minutes (a 1M-event backlog, a 60-s
steady phase) and are left to manual runs; their parts are covered by the Spark and daemon tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def bench(*args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "cryptotui", "bench", *args, "--json"], capture_output=True, text=True,
        timeout=280, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bench_stack_reports_start_times() -> None:
    result = bench("stack", "--runs", "1")
    assert 0 < result["from_stopped_s"] < result["first_run_s"]  # type: ignore[operator]


def test_bench_ingest_reports_rate_latency_and_ceiling() -> None:
    result = bench("ingest", "--latency-duration", "5")
    assert {"msgs_per_s", "ceiling_msgs_per_s", "p50_ms", "p99_ms", "rss_mb"} <= result.keys()
    assert result["msgs_per_s"] > 0 and result["dlq"] == 0  # type: ignore[operator]
    assert result["ingest_exit_code"] == 0


def test_bench_sink_reports_drain_copy_ratio_and_latency() -> None:
    result = bench("sink", "--messages", "20000", "--seconds", "5")
    assert {"rows_per_s", "copy_rows_per_s", "ratio", "p50_ms", "p99_ms"} <= result.keys()
    assert result["rows"] == 20000 and result["duplicates"] == 0
