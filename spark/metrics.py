"""The metrics: streaming window aggregations (Spark) and the finishing arithmetic (plain Python).

Spark keeps only exact, mergeable sums in its state (decimal sums, counts, min/max); the derived values
(VWAP, standard deviation, averages, flags) are computed from them in `finish_trade` /
`finish_spread` with Python's `decimal`, on the driver, when a batch is written. So every stored value
is a deterministic function of the window's events, whatever the micro-batch boundaries: a run restarted
from its checkpoint writes exactly what an uninterrupted run writes.

Definitions (docs/spark.md has the long form):

trade_metrics, per symbol and 1-minute tumbling window of the trade time `T` (trade topic only; aggTrades
summarise the same trades and are never counted):
- trade_count, volume = sum(qty), quote_volume = sum(price * qty), vwap = quote_volume / volume
- open / close: price of the first / last trade ordered by (trade time, trade id); high / low
- price_stddev: POPULATION standard deviation of the trade prices (divide by n, unweighted by qty;
  0 for a single trade): the window's trades are the whole population, not a sample of it
- buy_volume: qty of trades whose taker bought (m = false); sell_volume: qty where m = true (the buyer
  was the maker, so the taker sold)
- volatility_alert: price_stddev > the symbol's absolute threshold (volatility_thresholds), or for a
  symbol without one, > volatility_default_bps basis points of the window's vwap
- volume_spike (computed in SQL by the writer from the stored rows): volume > volume_spike_factor x
  the mean volume of the symbol's N = volume_spike_windows most recent stored windows before this one;
  false while fewer than N earlier windows are stored (no baseline yet)

spread_metrics, per symbol and 30-second tumbling window of the receive time `recv_ns` (bookTicker has
no event time):
- spread = ask - bid per update; avg_spread, min_spread, max_spread, samples
- avg_spread_bps = mean over the updates of spread / mid * 10 000, mid = (bid + ask) / 2
- spread_warning: avg_spread > spread_warning_factor x min_spread
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

TRADE_WINDOW = "1 minute"
SPREAD_WINDOW = "30 seconds"
# Prices and quantities: Binance sends at most 8 decimals. (28, 10) keeps 10 decimals and 18 integer
# digits, and the product price * qty then fits decimal(38, 20) exactly (with
# spark.sql.decimalOperations.allowPrecisionLoss=false): decimal(38, 18) for both factors could not hold
# their product exactly in Spark's 38 digits. Values that do not fit are dropped, not rounded.
PRICE_PRECISION, PRICE_SCALE = 28, 10
# Finishing arithmetic: enough digits that sums of squares and their differences are exact.
EXACT = decimal.Context(prec=100, rounding=decimal.ROUND_HALF_EVEN)
# Stored derived values (vwap, averages, stddev): 34 significant digits (IEEE decimal128).
STORED = decimal.Context(prec=34, rounding=decimal.ROUND_HALF_EVEN)
BPS = Decimal(10_000)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

TRADE_COLUMNS = (
    "symbol",
    "window_start",
    "window_end",
    "trade_count",
    "volume",
    "quote_volume",
    "vwap",
    "open",
    "high",
    "low",
    "close",
    "price_stddev",
    "buy_volume",
    "sell_volume",
    "volatility_alert",
)
SPREAD_COLUMNS = (
    "symbol",
    "window_start",
    "window_end",
    "avg_spread",
    "min_spread",
    "max_spread",
    "avg_spread_bps",
    "samples",
    "spread_warning",
)


# --- Spark side ------------------------------------------------------------------------------------
def _price_type() -> Any:
    from pyspark.sql.types import DecimalType

    return DecimalType(PRICE_PRECISION, PRICE_SCALE)


def _decimal(column: str) -> Any:
    """A Binance decimal string as decimal(28, 10); null when it is not a number or does not fit."""
    from pyspark.sql import functions as F

    return F.expr(f"try_cast(`{column}` AS DECIMAL({PRICE_PRECISION}, {PRICE_SCALE}))")


def trade_value_schema() -> Any:
    from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("e", StringType()),
            StructField("s", StringType()),
            StructField("t", LongType()),
            StructField("p", StringType()),
            StructField("q", StringType()),
            StructField("T", LongType()),
            StructField("m", BooleanType()),
            StructField("recv_ns", LongType()),
        ]
    )


def book_value_schema() -> Any:
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    return StructType(
        [
            StructField("u", LongType()),
            StructField("s", StringType()),
            StructField("b", StringType()),
            StructField("a", StringType()),
            StructField("recv_ns", LongType()),
        ]
    )


def _parsed(raw: DataFrame, schema: Any) -> DataFrame:
    from pyspark.sql import functions as F

    # PERMISSIVE: a value that is not JSON gives nulls, and the row is dropped below (ingest already
    # sends such messages to the dead-letter topic; this only keeps one bad record from failing the job).
    return raw.select(F.from_json(F.col("value").cast("string"), schema, {"mode": "PERMISSIVE"}).alias("v")).select(
        "v.*"
    )


def trades(raw: DataFrame) -> DataFrame:
    """Valid trades: symbol, trade_id, trade_ms, event_time, price, qty, buyer_maker, notional, price_sq."""
    from pyspark.sql import functions as F

    v = _parsed(raw, trade_value_schema())
    rows = v.select(
        F.col("s").alias("symbol"),
        F.col("t").alias("trade_id"),
        F.col("T").alias("trade_ms"),
        F.timestamp_millis(F.col("T")).alias("event_time"),
        _decimal("p").alias("price"),
        _decimal("q").alias("qty"),
        F.col("m").alias("buyer_maker"),
        F.col("e").alias("event"),
    ).where(
        (F.col("event").isNull() | (F.col("event") == "trade"))
        & F.col("symbol").isNotNull()
        & F.col("trade_id").isNotNull()
        & F.col("trade_ms").isNotNull()
        & F.col("price").isNotNull()
        & F.col("qty").isNotNull()
        & F.col("buyer_maker").isNotNull()
    )
    # try_multiply: an absurd product becomes null (row dropped) instead of failing the query forever.
    rows = rows.withColumn("notional", F.try_multiply("price", "qty")).withColumn(
        "price_sq", F.try_multiply("price", "price")
    )
    return rows.where(F.col("notional").isNotNull() & F.col("price_sq").isNotNull()).drop("event")


def trade_aggregates(raw: DataFrame, watermark_s: float) -> DataFrame:
    """Per symbol and 1-minute window of trade time: the exact sums the finishing step needs."""
    from pyspark.sql import functions as F

    zero = F.lit(0).cast(_price_type())
    t = trades(raw).withWatermark("event_time", f"{round(watermark_s * 1000)} milliseconds")
    ordered = F.struct("trade_ms", "trade_id", "price")
    aggregated = t.groupBy(F.col("symbol"), F.window("event_time", TRADE_WINDOW).alias("window")).agg(
        F.count(F.lit(1)).alias("trade_count"),
        F.try_sum("qty").alias("volume"),
        F.try_sum("notional").alias("quote_volume"),
        F.try_sum("price").alias("sum_price"),
        F.try_sum("price_sq").alias("sum_price_sq"),
        F.min(ordered).alias("first"),
        F.max(ordered).alias("last"),
        F.max("price").alias("high"),
        F.min("price").alias("low"),
        F.try_sum(F.when(~F.col("buyer_maker"), F.col("qty")).otherwise(zero)).alias("buy_volume"),
        F.try_sum(F.when(F.col("buyer_maker"), F.col("qty")).otherwise(zero)).alias("sell_volume"),
    )
    return aggregated.select(
        "symbol",
        # Epoch microseconds: collect() would turn timestamps into the driver's local time.
        F.unix_micros(F.col("window.start")).alias("window_start_us"),
        F.unix_micros(F.col("window.end")).alias("window_end_us"),
        "trade_count",
        "volume",
        "quote_volume",
        "sum_price",
        "sum_price_sq",
        F.col("first.price").alias("open"),
        "high",
        "low",
        F.col("last.price").alias("close"),
        "buy_volume",
        "sell_volume",
    )


def book_tickers(raw: DataFrame) -> DataFrame:
    """Valid bookTicker updates: symbol, recv_time, bid, ask, spread, spread_bps (per update, exact decimal)."""
    from pyspark.sql import functions as F

    v = _parsed(raw, book_value_schema())
    rows = v.select(
        F.col("s").alias("symbol"),
        F.timestamp_micros(F.floor(F.col("recv_ns") / 1000)).alias("recv_time"),
        _decimal("b").alias("bid"),
        _decimal("a").alias("ask"),
    ).where(F.col("symbol").isNotNull() & F.col("recv_time").isNotNull() & (F.col("bid") > 0) & (F.col("ask") > 0))
    rows = rows.withColumn("spread", F.col("ask") - F.col("bid"))
    # spread / mid * 10 000 = spread * 20 000 / (bid + ask), a decimal rounded at 20 places.
    return rows.withColumn(
        "spread_bps", F.try_divide(F.col("spread") * F.lit(20_000), F.col("bid") + F.col("ask"))
    ).where(F.col("spread_bps").isNotNull())


def spread_aggregates(raw: DataFrame, watermark_s: float) -> DataFrame:
    """Per symbol and 30-second window of receive time: samples, spread sum/min/max, sum of bps."""
    from pyspark.sql import functions as F

    b = book_tickers(raw).withWatermark("recv_time", f"{round(watermark_s * 1000)} milliseconds")
    aggregated = b.groupBy(F.col("symbol"), F.window("recv_time", SPREAD_WINDOW).alias("window")).agg(
        F.count(F.lit(1)).alias("samples"),
        F.try_sum("spread").alias("sum_spread"),
        F.min("spread").alias("min_spread"),
        F.max("spread").alias("max_spread"),
        F.try_sum("spread_bps").alias("sum_spread_bps"),
    )
    return aggregated.select(
        "symbol",
        # Epoch microseconds: collect() would turn timestamps into the driver's local time.
        F.unix_micros(F.col("window.start")).alias("window_start_us"),
        F.unix_micros(F.col("window.end")).alias("window_end_us"),
        "samples",
        "sum_spread",
        "min_spread",
        "max_spread",
        "sum_spread_bps",
    )


# --- finishing arithmetic (driver side, plain Python) ----------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """What the flags compare against (from Settings; plain values so the job needs no pydantic here)."""

    volatility: Mapping[str, float]
    volatility_default_bps: float
    spread_warning_factor: float

    def volatility_limit(self, symbol: str, vwap: Decimal | None) -> Decimal | None:
        """The stddev above which volatility_alert is set: absolute per symbol, else bps of the vwap."""
        absolute = self.volatility.get(symbol)
        if absolute is not None:
            return Decimal(repr(float(absolute)))
        if vwap is None:
            return None
        return EXACT.multiply(EXACT.divide(Decimal(repr(float(self.volatility_default_bps))), BPS), vwap)


def population_stddev(count: int, sum_price: Decimal, sum_price_sq: Decimal) -> Decimal:
    """sqrt((sum p^2 - (sum p)^2 / n) / n), exact until the square root (34 significant digits)."""
    if count <= 1:
        return Decimal(0)
    n = Decimal(count)
    variance = EXACT.divide(EXACT.subtract(sum_price_sq, EXACT.divide(EXACT.multiply(sum_price, sum_price), n)), n)
    if variance <= 0:
        return Decimal(0)
    return variance.sqrt(STORED)


def _plain(value: Decimal | None) -> Decimal | None:
    """Trailing zeros removed (numeric keeps the scale it is given), never in exponent form for PG."""
    if value is None:
        return None
    normalized = Decimal(value).normalize(EXACT)
    return normalized if normalized.as_tuple().exponent <= 0 else normalized.quantize(Decimal(1))


def finish_trade(row: Mapping[str, Any], thresholds: Thresholds) -> dict[str, Any] | None:
    """The trade_metrics row of one aggregate (None when a sum overflowed: the window is skipped)."""
    volume: Decimal | None = row["volume"]
    quote_volume: Decimal | None = row["quote_volume"]
    needed = ("volume", "quote_volume", "sum_price", "sum_price_sq", "buy_volume", "sell_volume")
    if any(row[name] is None for name in needed):
        return None
    vwap = STORED.divide(quote_volume, volume) if volume else None
    stddev = population_stddev(int(row["trade_count"]), row["sum_price"], row["sum_price_sq"])
    limit = thresholds.volatility_limit(row["symbol"], vwap)
    return {
        "symbol": row["symbol"],
        "window_start": utc_from_micros(row["window_start_us"]),
        "window_end": utc_from_micros(row["window_end_us"]),
        "trade_count": int(row["trade_count"]),
        "volume": _plain(volume),
        "quote_volume": _plain(quote_volume),
        "vwap": _plain(vwap),
        "open": _plain(row["open"]),
        "high": _plain(row["high"]),
        "low": _plain(row["low"]),
        "close": _plain(row["close"]),
        "price_stddev": float(stddev),
        "buy_volume": _plain(row["buy_volume"]),
        "sell_volume": _plain(row["sell_volume"]),
        "volatility_alert": limit is not None and stddev > limit,
    }


def finish_spread(row: Mapping[str, Any], thresholds: Thresholds) -> dict[str, Any] | None:
    """The spread_metrics row of one aggregate (None when a sum overflowed)."""
    samples = int(row["samples"])
    if samples == 0 or row["sum_spread"] is None or row["sum_spread_bps"] is None:
        return None
    avg_spread = STORED.divide(row["sum_spread"], Decimal(samples))
    avg_bps = STORED.divide(row["sum_spread_bps"], Decimal(samples))
    factor = Decimal(repr(float(thresholds.spread_warning_factor)))
    return {
        "symbol": row["symbol"],
        "window_start": utc_from_micros(row["window_start_us"]),
        "window_end": utc_from_micros(row["window_end_us"]),
        "avg_spread": _plain(avg_spread),
        "min_spread": _plain(row["min_spread"]),
        "max_spread": _plain(row["max_spread"]),
        "avg_spread_bps": float(avg_bps),
        "samples": samples,
        "spread_warning": avg_spread > EXACT.multiply(factor, row["min_spread"]),
    }


def utc_from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(micros))
