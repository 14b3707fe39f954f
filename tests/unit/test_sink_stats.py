"""The sink's commit latency window: buckets, percentiles, expiry."""

from __future__ import annotations

from cryptotui.stages.sink_stats import LatencyWindow, bucket_ms

MS = 1_000_000


def test_buckets_are_fine_below_a_second_and_coarser_above() -> None:
    assert bucket_ms(0) == 1
    assert bucket_ms(999) == 1000
    assert bucket_ms(1000) == 1010
    assert bucket_ms(9999) == 10_000
    assert bucket_ms(12_345) == 13_000


def test_percentiles_are_upper_bucket_edges() -> None:
    window = LatencyWindow()
    committed = 10_000 * MS
    # 98 rows at 10 ms, one at 500 ms, one at 2.5 s.
    recv = [committed - 10 * MS] * 98 + [committed - 500 * MS, committed - 2500 * MS]
    largest = window.add(committed, recv, now=100.0)
    assert largest == 2500
    summary = window.summary(now=100.0)
    assert summary == {"rows": 100, "p50_ms": 11, "p99_ms": 501, "max_ms": 2510}


def test_clock_ahead_counts_as_zero_and_old_seconds_expire() -> None:
    window = LatencyWindow(window_s=60)
    window.add(5 * MS, [6 * MS], now=0.0)  # received "after" the commit: another clock
    assert window.summary(now=1.0)["p50_ms"] == 1
    window.add(100 * MS, [0], now=30.0)
    assert window.summary(now=59.0)["rows"] == 2
    assert window.summary(now=61.0)["rows"] == 1
    assert window.summary(now=200.0) == {"rows": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
