"""Connection rules: backoff with jitter, stream splitting, the URL, the attempt limiter."""

from __future__ import annotations

import pytest

from cryptotui.stages.ingest.connection import (
    MAX_URL_CHARS,
    AttemptLimiter,
    Backoff,
    split_streams,
    stream_path,
)


def test_backoff_doubles_from_1_s_up_to_60_s_with_jitter() -> None:
    low = Backoff(rng=lambda: 0.0)
    assert [low.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    high = Backoff(rng=lambda: 0.999)
    delays = [high.next_delay() for _ in range(8)]
    assert all(low_ <= d <= min(60, low_ * 1.25) for low_, d in zip([1, 2, 4, 8, 16, 32, 60, 60], delays, strict=True))
    assert delays[-1] == 60


def test_backoff_reset_starts_again_at_1_s() -> None:
    backoff = Backoff(rng=lambda: 0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1


def test_real_jitter_spreads_delays() -> None:
    delays = {round(Backoff().next_delay(), 6) for _ in range(20)}
    assert len(delays) > 10 and all(1 <= d <= 1.25 for d in delays)


@pytest.mark.parametrize(("count", "sizes"), [(9, [9]), (1024, [1024]), (1025, [513, 512]), (3000, [1000] * 3)])
def test_streams_are_split_evenly_at_most_1024_per_connection(count: int, sizes: list[int]) -> None:
    streams = [f"s{i}usdt@trade" for i in range(count)]
    groups = split_streams(streams)
    assert [len(group) for group in groups] == sizes
    assert [s for group in groups for s in group] == streams


def test_stream_path_subscribes_what_does_not_fit_in_the_url() -> None:
    few = ["btcusdt@trade", "btcusdt@aggTrade"]
    assert stream_path(few) == ("/stream?streams=btcusdt@trade/btcusdt@aggTrade", [])
    many = [f"sym{i:05d}usdt@bookTicker" for i in range(1024)]
    path, rest = stream_path(many)
    assert len(path) <= MAX_URL_CHARS
    assert path.removeprefix("/stream?streams=").split("/") + rest == many


async def test_attempt_limiter_allows_the_limit_then_waits() -> None:
    limiter = AttemptLimiter(limit=3, window_s=0.3)
    loop_time = __import__("time").monotonic
    started = loop_time()
    for _ in range(4):
        await limiter.acquire()
    assert loop_time() - started >= 0.25
