"""Kafka consumer helpers for the sink (and any stage that keeps a consumer fetching).

noida-db (the embedded broker) answers a fetch at once when a partition has no new data instead of
holding it for `fetch.wait.max.ms`, so a client that keeps fetching spins: an idle aiokafka consumer
then burns ~60% of a core (librdkafka ~40%). `throttle_empty_fetches` restores the wait on the client
side: after a fetch that brought nothing, the next fetch to that broker waits `backoff_s`. Against a
real Kafka broker empty fetches are rare (the broker waits), so the throttle costs nothing there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer

log = logging.getLogger(__name__)

EMPTY_FETCH_BACKOFF_S = 0.05


def throttle_empty_fetches(consumer: AIOKafkaConsumer, backoff_s: float = EMPTY_FETCH_BACKOFF_S) -> bool:
    """Wrap the started consumer's fetch request (aiokafka internals): False when not possible."""
    fetcher = getattr(consumer, "_fetcher", None)
    original = getattr(fetcher, "_proc_fetch_request", None)
    if fetcher is None or original is None or getattr(original, "_throttled", False):
        log.debug("cannot throttle empty fetches on this aiokafka version")
        return False

    async def fetch(*args: Any, **kwargs: Any) -> Any:
        got_data = await original(*args, **kwargs)
        if not got_data:
            # Still "in flight" for this broker while sleeping: no new fetch is sent meanwhile.
            try:
                await asyncio.sleep(backoff_s)
            except asyncio.CancelledError:
                return got_data  # like the original: the fetcher cancels its requests when closing
        return got_data

    fetch._throttled = True  # type: ignore[attr-defined]
    fetcher._proc_fetch_request = fetch
    return True
