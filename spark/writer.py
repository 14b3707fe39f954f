"""foreachBatch sinks: idempotent upserts of the metric rows into TimescaleDB with asyncpg.

Every micro-batch (update output mode) carries the windows that changed, with their complete aggregates.
They are upserted on (symbol, window_start), so a batch replayed after a crash rewrites the same rows.
`volume_spike` depends on earlier windows, so it is recomputed in SQL from the stored rows after each
upsert, for every window of a touched symbol from the earliest touched window on: the stored value is
then a function of the stored volumes, whatever the batch boundaries were.

SQL takes parameters (arrays unnested server side: one round trip per batch), never formatted values.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from spark.metrics import SPREAD_COLUMNS, TRADE_COLUMNS, Thresholds, finish_spread, finish_trade

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)
T = TypeVar("T")

WRITE_ATTEMPTS = 5
RETRY_PAUSE_S = 2.0

UPSERT_TRADE_METRICS = """
INSERT INTO trade_metrics (symbol, window_start, window_end, trade_count, volume, quote_volume, vwap,
                           open, high, low, close, price_stddev, buy_volume, sell_volume,
                           volatility_alert, updated_at)
SELECT u.*, now()
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::numeric[], $6::numeric[],
            $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[], $11::numeric[],
            $12::double precision[], $13::numeric[], $14::numeric[], $15::boolean[]) AS u
ON CONFLICT (symbol, window_start) DO UPDATE SET
    window_end = EXCLUDED.window_end, trade_count = EXCLUDED.trade_count, volume = EXCLUDED.volume,
    quote_volume = EXCLUDED.quote_volume, vwap = EXCLUDED.vwap, open = EXCLUDED.open,
    high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    price_stddev = EXCLUDED.price_stddev, buy_volume = EXCLUDED.buy_volume,
    sell_volume = EXCLUDED.sell_volume, volatility_alert = EXCLUDED.volatility_alert,
    updated_at = EXCLUDED.updated_at
"""

# $1 symbols, $2 window starts of the batch; $3 = N previous windows; $4 = spike factor.
# For each touched symbol: every stored window from its earliest touched window on is rescored against
# the mean volume of the N stored windows before it; false while fewer than N exist.
UPDATE_VOLUME_SPIKES = """
WITH touched AS (
    SELECT symbol, min(window_start) AS since
    FROM unnest($1::text[], $2::timestamptz[]) AS u(symbol, window_start)
    GROUP BY symbol
), bounds AS (
    SELECT t.symbol, t.since,
           coalesce((SELECT min(p.window_start)
                     FROM (SELECT h.window_start FROM trade_metrics h
                           WHERE h.symbol = t.symbol AND h.window_start < t.since
                           ORDER BY h.window_start DESC LIMIT $3) p), t.since) AS lower_bound
    FROM touched t
), scored AS (
    SELECT m.symbol, m.window_start, b.since,
           -- volume > factor * mean, as volume * N > factor * sum: exact numeric arithmetic
           coalesce(count(*) OVER w = $3 AND m.volume * $3 > $4::numeric * sum(m.volume) OVER w, false) AS spike
    FROM trade_metrics m JOIN bounds b ON m.symbol = b.symbol AND m.window_start >= b.lower_bound
    WINDOW w AS (PARTITION BY m.symbol ORDER BY m.window_start ROWS BETWEEN $3 PRECEDING AND 1 PRECEDING)
)
UPDATE trade_metrics m SET volume_spike = s.spike
FROM scored s
WHERE m.symbol = s.symbol AND m.window_start = s.window_start AND s.window_start >= s.since
  AND m.volume_spike IS DISTINCT FROM s.spike
"""

UPSERT_SPREAD_METRICS = """
INSERT INTO spread_metrics (symbol, window_start, window_end, avg_spread, min_spread, max_spread,
                            avg_spread_bps, samples, spread_warning, updated_at)
SELECT u.*, now()
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::numeric[], $5::numeric[], $6::numeric[],
            $7::double precision[], $8::bigint[], $9::boolean[]) AS u
ON CONFLICT (symbol, window_start) DO UPDATE SET
    window_end = EXCLUDED.window_end, avg_spread = EXCLUDED.avg_spread, min_spread = EXCLUDED.min_spread,
    max_spread = EXCLUDED.max_spread, avg_spread_bps = EXCLUDED.avg_spread_bps,
    samples = EXCLUDED.samples, spread_warning = EXCLUDED.spread_warning, updated_at = EXCLUDED.updated_at
"""


class Database:
    """An asyncpg pool on a private event loop thread, for Spark's callback threads (foreachBatch,
    the listener) which are plain threads: `run(lambda pool: ...)` blocks until the coroutine is done."""

    def __init__(self, url: str, max_size: int = 3) -> None:
        self._url = url
        self._max_size = max_size
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="spark-db", daemon=True)
        self._thread.start()
        self._pool: asyncpg.Pool | None = None
        self._lock = threading.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._url, min_size=1, max_size=self._max_size, timeout=10)
        return self._pool

    def run(self, work: Callable[[asyncpg.Pool], Awaitable[T]], timeout: float = 60.0) -> T:
        async def call() -> T:
            return await work(await self._get_pool())

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def run_with_retries(self, what: str, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        """Retry on connection trouble (the database restarting); other errors fail at once."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self.run(work)
            except (
                OSError,
                asyncpg.InterfaceError,
                asyncpg.CannotConnectNowError,
                TimeoutError,
                asyncpg.exceptions.ConnectionDoesNotExistError,
            ) as error:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("%s failed (%s), retry %d/%d", what, error, attempt, WRITE_ATTEMPTS - 1)
                self._reset_pool()
                time.sleep(RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    def _reset_pool(self) -> None:
        async def reset() -> None:
            if self._pool is not None:
                pool, self._pool = self._pool, None
                pool.terminate()

        asyncio.run_coroutine_threadsafe(reset(), self._loop).result(10)

    def close(self) -> None:
        async def close_pool() -> None:
            if self._pool is not None:
                try:
                    await asyncio.wait_for(self._pool.close(), 3)
                except (TimeoutError, Exception):
                    self._pool.terminate()
                self._pool = None

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(close_pool(), self._loop).result(5)
            except Exception:  # closing is best effort
                log.debug("closing the pool failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def _columns(rows: list[dict[str, Any]], names: Iterable[str]) -> list[list[Any]]:
    return [[row[name] for row in rows] for name in names]


async def upsert_trade_metrics(
    pool: asyncpg.Pool, rows: list[dict[str, Any]], spike_windows: int, spike_factor: float
) -> None:
    if not rows:
        return
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(UPSERT_TRADE_METRICS, *_columns(rows, TRADE_COLUMNS))
        await conn.execute(
            UPDATE_VOLUME_SPIKES,
            [row["symbol"] for row in rows],
            [row["window_start"] for row in rows],
            spike_windows,
            Decimal(repr(float(spike_factor))),
        )


async def upsert_spread_metrics(pool: asyncpg.Pool, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    async with pool.acquire() as conn:
        await conn.execute(UPSERT_SPREAD_METRICS, *_columns(rows, SPREAD_COLUMNS))


class MetricsWriter:
    """The foreachBatch functions of the two queries; also counts what it wrote."""

    def __init__(self, db: Database, thresholds: Thresholds, spike_windows: int, spike_factor: float) -> None:
        self.db = db
        self.thresholds = thresholds
        self.spike_windows = spike_windows
        self.spike_factor = spike_factor
        self.rows_written = {"trade_metrics": 0, "spread_metrics": 0}
        self.rows_skipped = 0

    def _finish(self, df: DataFrame, finish: Callable[..., dict[str, Any] | None]) -> list[dict[str, Any]]:
        rows = []
        for row in df.collect():
            finished = finish(row.asDict(), self.thresholds)
            if finished is None:
                self.rows_skipped += 1
                log.error("skipping %s window %s: a sum overflowed", row["symbol"], row["window_start_us"])
            else:
                rows.append(finished)
        return rows

    def write_trades(self, df: DataFrame, batch_id: int) -> None:
        rows = self._finish(df, finish_trade)
        self.db.run_with_retries(
            f"trade_metrics batch {batch_id}",
            lambda pool: upsert_trade_metrics(pool, rows, self.spike_windows, self.spike_factor),
        )
        self.rows_written["trade_metrics"] += len(rows)

    def write_spreads(self, df: DataFrame, batch_id: int) -> None:
        rows = self._finish(df, finish_spread)
        self.db.run_with_retries(f"spread_metrics batch {batch_id}", lambda pool: upsert_spread_metrics(pool, rows))
        self.rows_written["spread_metrics"] += len(rows)
