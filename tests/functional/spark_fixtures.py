"""What the Spark tests share: one SparkSession, a known event set, and an independent model.

The model recomputes every metric in plain Python with `decimal` from the events themselves (no code of
`spark/` is used), applying Spark's watermark rule, so a test compares the job's rows with it.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from confluent_kafka import Producer

from cryptotui.config import Settings
from cryptotui.services.kafka import bootstrap_servers

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
T0 = 1_709_251_200_000  # 2024-03-01T00:00:00Z, ms
TRADE_WINDOW_MS = 60_000
SPREAD_WINDOW_MS = 30_000
HIGH = Context(prec=60)


def ms_to_datetime(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


# --- events -----------------------------------------------------------------------------------------
@dataclass
class Trade:
    symbol: str
    trade_id: int
    time_ms: int
    price: str
    qty: str
    buyer_maker: bool
    recv_ns: int

    def value(self) -> bytes:
        return json.dumps(
            {"e": "trade", "E": self.time_ms + 3, "s": self.symbol, "t": self.trade_id, "p": self.price,
             "q": self.qty, "T": self.time_ms, "m": self.buyer_maker, "M": True, "recv_ns": self.recv_ns}
        ).encode()


@dataclass
class Book:
    symbol: str
    update_id: int
    bid: str
    ask: str
    recv_ns: int

    @property
    def time_ms(self) -> int:
        return self.recv_ns // 1_000_000

    def value(self) -> bytes:
        return json.dumps(
            {"u": self.update_id, "s": self.symbol, "b": self.bid, "B": "1.50000000", "a": self.ask,
             "A": "2.00000000", "recv_ns": self.recv_ns}
        ).encode()


@dataclass
class EventSet:
    """Per symbol, the records in the order they are produced (Kafka order, not event-time order)."""

    trades: dict[str, list[Trade]] = field(default_factory=lambda: {s: [] for s in SYMBOLS})
    books: dict[str, list[Book]] = field(default_factory=lambda: {s: [] for s in SYMBOLS})
    garbage: list[bytes] = field(default_factory=list)

    def all_trades(self) -> list[Trade]:
        return [trade for symbol in SYMBOLS for trade in self.trades[symbol]]

    def all_books(self) -> list[Book]:
        return [book for symbol in SYMBOLS for book in self.books[symbol]]


def _fmt(value: Decimal, places: int) -> str:
    return f"{value:.{places}f}"


def make_events(seed: int = 7, minutes: int = 12) -> EventSet:
    """Phase-1 events: three symbols, `minutes` minutes, uniform rates, bounded disorder (< watermark).

    Includes: ties in trade time at window edges (open/close decided by trade id), trades on the first
    and last millisecond of windows, a volatile BTC minute, a high-volume BTC minute (volume_spike),
    locked books (spread 0), out-of-order records (up to 8 s) and unparsable records.
    """
    rng = random.Random(seed)
    events = EventSet()
    rates = {"BTCUSDT": 6, "ETHUSDT": 4, "BNBUSDT": 3}  # trades per second
    prices = {"BTCUSDT": Decimal("62000.00"), "ETHUSDT": Decimal("3400.00"), "BNBUSDT": Decimal("410.000")}
    steps = {"BTCUSDT": Decimal("0.01"), "ETHUSDT": Decimal("0.01"), "BNBUSDT": Decimal("0.001")}
    end_ms = T0 + minutes * 60_000 + 7_321  # not on a window edge
    for symbol in SYMBOLS:
        trades: list[Trade] = []
        step = steps[symbol]
        price = prices[symbol]
        time_ms = T0 + rng.randint(0, 300)
        while time_ms < end_ms:
            minute = (time_ms - T0) // 60_000
            move = rng.randint(-40, 40) * step
            if symbol == "BTCUSDT" and minute == 5:
                move = rng.randint(-9000, 9000) * step  # volatile minute
            price = max(price + move, step * 1000)
            qty = Decimal(rng.randint(1, 400_000)) / Decimal(10**8)
            if symbol == "BTCUSDT" and minute == 8:
                qty *= 9  # volume spike
            trades.append(Trade(symbol, 0, time_ms, _fmt(price, 2 if step == Decimal("0.01") else 3),
                                _fmt(qty, 8), rng.random() < 0.5, 0))
            time_ms += rng.randint(1, 2000 // rates[symbol])
        # Ties at window edges: several trades on the first and the last millisecond of minutes 3 and 7.
        for edge in (T0 + 3 * 60_000, T0 + 4 * 60_000 - 1, T0 + 7 * 60_000, T0 + 8 * 60_000 - 1):
            for _ in range(3):
                tie_price = price + rng.randint(-100, 100) * step
                trades.append(Trade(symbol, 0, edge, _fmt(tie_price, 2 if step == Decimal("0.01") else 3),
                                    _fmt(Decimal(rng.randint(1, 10**6)) / Decimal(10**8), 8),
                                    rng.random() < 0.5, 0))
        trades.sort(key=lambda trade: trade.time_ms)  # stable: ties keep insertion order
        for index, trade in enumerate(trades):
            trade.trade_id = 1_000_000 + index
        # Kafka order: receive time = trade time + delay (0-2.5 s, 1 % of them 4-8 s late).
        for trade in trades:
            delay = rng.randint(4000, 8000) if rng.random() < 0.01 else rng.randint(0, 2500)
            trade.recv_ns = (trade.time_ms + delay) * 1_000_000 + rng.randint(0, 999_999)
        # Tied trades reach Kafka in reverse id order, so only the (time, id) ordering gets open/close right.
        trades.sort(key=lambda trade: (trade.recv_ns, -trade.trade_id))
        events.trades[symbol] = trades

        books: list[Book] = []
        mid = prices[symbol]
        recv_ms = T0 + rng.randint(0, 300)
        update_id = 5_000_000
        while recv_ms < end_ms:
            mid = max(mid + rng.randint(-20, 20) * step, step * 1000)
            minute = (recv_ms - T0) // 60_000
            half = rng.choice([1, 1, 1, 2]) * step
            if minute in (4, 10):
                half = rng.randint(5, 15) * step  # wide spreads: spread_warning
            elif minute == 2 and rng.random() < 0.2:
                half = Decimal(0)  # a locked book (spread 0): spread_warning too
            bid, ask = mid - half, mid + half + (step if half and rng.random() < 0.3 else 0)
            update_id += rng.randint(1, 5)
            places = 2 if step == Decimal("0.01") else 3
            books.append(Book(symbol, update_id, _fmt(bid, places) + "000000"[: 8 - places],
                              _fmt(ask, places), recv_ms * 1_000_000 + rng.randint(0, 999_999)))
            recv_ms += rng.randint(1, 600)
        # A few records out of order in receive time (up to 3 s).
        for _ in range(len(books) // 50):
            i = rng.randrange(len(books))
            j = min(len(books) - 1, i + rng.randint(1, 5))
            books[i], books[j] = books[j], books[i]
        events.books[symbol] = books
    events.garbage = [b"not json", json.dumps({"e": "trade", "s": "BTCUSDT", "t": 1, "p": "abc", "q": "1",
                                               "T": T0 + 1000, "m": True, "recv_ns": 1}).encode(),
                      json.dumps({"e": "trade", "s": "ETHUSDT", "t": 2, "p": "1", "q": "1", "m": False}).encode()]
    return events


def late_events(events: EventSet, watermark_s: float, seed: int = 11) -> tuple[EventSet, int, int]:
    """Phase-2 events, produced after phase 1 was processed: per symbol, trades/books inside the
    watermark (kept) and in windows that ended before it (dropped). Returns (events, trades dropped,
    books dropped)."""
    rng = random.Random(seed)
    late = EventSet()
    delay_ms = round(watermark_s * 1000)
    trade_mark = max(t.time_ms for t in events.all_trades()) - delay_ms
    book_mark = max(b.time_ms for b in events.all_books()) - delay_ms
    assert trade_mark % TRADE_WINDOW_MS and book_mark % SPREAD_WINDOW_MS, "watermark on a window edge"
    next_id = max(t.trade_id for t in events.all_trades()) + 1
    dropped_trades = dropped_books = 0
    for symbol in SYMBOLS:
        reference = events.trades[symbol][-1]
        for kept in (True, False):
            for _ in range(4):
                if kept:
                    time_ms = trade_mark + rng.randint(500, delay_ms - 500)
                else:
                    closed_end = trade_mark - trade_mark % TRADE_WINDOW_MS  # window ended before the mark
                    time_ms = closed_end - rng.randint(1, 3 * TRADE_WINDOW_MS)
                    dropped_trades += 1
                price = Decimal(reference.price) * Decimal("1.001")
                late.trades[symbol].append(Trade(symbol, next_id, time_ms, _fmt(price, 2), "0.12345678",
                                                 rng.random() < 0.5, (trade_mark + delay_ms) * 1_000_000))
                next_id += 1
        book = events.books[symbol][-1]
        for kept in (True, False):
            for _ in range(4):
                if kept:
                    recv_ms = book_mark + rng.randint(500, delay_ms - 500)
                else:
                    closed_end = book_mark - book_mark % SPREAD_WINDOW_MS
                    recv_ms = closed_end - rng.randint(1, 2 * SPREAD_WINDOW_MS)
                    dropped_books += 1
                late.books[symbol].append(Book(symbol, book.update_id + 1000, book.bid, book.ask,
                                               recv_ms * 1_000_000 + 123))
    return late, dropped_trades, dropped_books


def produce(settings: Settings, events: EventSet) -> dict[str, dict[str, int]]:
    """Produce the events (symbol i -> partition i, key = symbol); returns the end offsets per topic."""
    producer = Producer({"bootstrap.servers": bootstrap_servers(settings), "linger.ms": 5})
    for index, symbol in enumerate(SYMBOLS):
        for trade in events.trades[symbol]:
            producer.produce(settings.topic_trade, key=symbol.encode(), value=trade.value(), partition=index)
        for book in events.books[symbol]:
            producer.produce(settings.topic_bookticker, key=symbol.encode(), value=book.value(), partition=index)
        producer.poll(0)
    for number, garbage in enumerate(events.garbage):
        producer.produce(settings.topic_trade, key=b"BTCUSDT", value=garbage, partition=number % len(SYMBOLS))
    assert producer.flush(30) == 0
    return end_offsets(settings)


def end_offsets(settings: Settings) -> dict[str, dict[str, int]]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap_servers(settings), "group.id": "test-offsets"})
    try:
        return {
            topic: {str(p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(len(SYMBOLS))}
            for topic in (settings.topic_trade, settings.topic_bookticker)
        }
    finally:
        consumer.close()


# --- the independent model ------------------------------------------------------------------------
def accepted(phase1: list[Any], phase2: list[Any], watermark_s: float, window_ms: int) -> list[Any]:
    """Spark's rule: after phase 1, the watermark is max(event time) - delay; a phase-2 record whose
    window ended at or before it is dropped. (Phase 1 itself is ordered well within the watermark.)"""
    mark = max(event.time_ms for event in phase1) - round(watermark_s * 1000)
    kept = [e for e in phase2 if e.time_ms - e.time_ms % window_ms + window_ms > mark]
    return phase1 + kept


def expected_trade_metrics(trades: list[Trade], settings: Settings) -> dict[tuple[str, datetime], dict[str, Any]]:
    windows: dict[tuple[str, int], list[Trade]] = defaultdict(list)
    for trade in trades:
        windows[(trade.symbol, trade.time_ms - trade.time_ms % TRADE_WINDOW_MS)].append(trade)
    result: dict[tuple[str, datetime], dict[str, Any]] = {}
    for (symbol, start), group in sorted(windows.items()):
        prices = [Decimal(t.price) for t in group]
        qtys = [Decimal(t.qty) for t in group]
        n = len(group)
        volume = sum(qtys, Decimal(0))
        quote = sum((p * q for p, q in zip(prices, qtys, strict=True)), Decimal(0))
        mean = HIGH.divide(sum(prices, Decimal(0)), Decimal(n))
        variance = HIGH.divide(sum((HIGH.power(p - mean, 2) for p in prices), Decimal(0)), Decimal(n))
        stddev = variance.sqrt(HIGH)
        vwap = HIGH.divide(quote, volume)
        ordered = sorted(group, key=lambda t: (t.time_ms, t.trade_id))
        threshold = settings.volatility_threshold(symbol)
        limit = Decimal(str(threshold)) if threshold is not None else (
            Decimal(str(settings.volatility_default_bps)) / 10_000 * vwap)
        result[(symbol, ms_to_datetime(start))] = {
            "window_end": ms_to_datetime(start + TRADE_WINDOW_MS),
            "trade_count": n,
            "volume": volume,
            "quote_volume": quote,
            "vwap": vwap,
            "open": Decimal(ordered[0].price),
            "close": Decimal(ordered[-1].price),
            "high": max(prices),
            "low": min(prices),
            "price_stddev": stddev,
            "buy_volume": sum((Decimal(t.qty) for t in group if not t.buyer_maker), Decimal(0)),
            "sell_volume": sum((Decimal(t.qty) for t in group if t.buyer_maker), Decimal(0)),
            "volatility_alert": stddev > limit,
        }
    # volume_spike: against the mean volume of the N previous windows of the symbol, once N exist.
    n_prev, factor = settings.volume_spike_windows, Decimal(str(settings.volume_spike_factor))
    for symbol in SYMBOLS:
        keys = sorted(key for key in result if key[0] == symbol)
        for index, key in enumerate(keys):
            previous = [result[k]["volume"] for k in keys[max(0, index - n_prev) : index]]
            result[key]["volume_spike"] = len(previous) == n_prev and result[key]["volume"] > factor * (
                HIGH.divide(sum(previous, Decimal(0)), Decimal(n_prev)))
    return result


def expected_spread_metrics(books: list[Book], settings: Settings) -> dict[tuple[str, datetime], dict[str, Any]]:
    windows: dict[tuple[str, int], list[Book]] = defaultdict(list)
    for book in books:
        windows[(book.symbol, book.time_ms - book.time_ms % SPREAD_WINDOW_MS)].append(book)
    result = {}
    for (symbol, start), group in sorted(windows.items()):
        spreads = [Decimal(b.ask) - Decimal(b.bid) for b in group]
        bps = [HIGH.divide(s * 10_000, (Decimal(b.ask) + Decimal(b.bid)) / 2) for s, b in zip(spreads, group,
                                                                                               strict=True)]
        avg = HIGH.divide(sum(spreads, Decimal(0)), Decimal(len(group)))
        result[(symbol, ms_to_datetime(start))] = {
            "window_end": ms_to_datetime(start + SPREAD_WINDOW_MS),
            "avg_spread": avg,
            "min_spread": min(spreads),
            "max_spread": max(spreads),
            "avg_spread_bps": HIGH.divide(sum(bps, Decimal(0)), Decimal(len(group))),
            "samples": len(group),
            "spread_warning": avg > Decimal(str(settings.spread_warning_factor)) * min(spreads),
        }
    return result


EXACT_COLUMNS = {"trade_count", "volume", "quote_volume", "open", "close", "high", "low", "buy_volume",
                 "sell_volume", "min_spread", "max_spread", "samples", "volatility_alert", "volume_spike",
                 "spread_warning", "window_end"}


def relative_difference(actual: Any, expected: Any) -> float:
    actual, expected = Decimal(str(actual)), Decimal(str(expected))
    if actual == expected:
        return 0.0
    return float(abs(actual - expected) / max(abs(expected), abs(actual)))


def compare(actual: dict[tuple[str, datetime], dict[str, Any]],
            expected: dict[tuple[str, datetime], dict[str, Any]]) -> list[str]:
    """Differences between stored rows and the model: sums, counts, prices and flags exactly,
    derived values (vwap, averages, stddev) within a relative 1e-9."""
    problems = []
    if set(actual) != set(expected):
        problems.append(f"windows differ: missing {sorted(set(expected) - set(actual))[:5]}, "
                        f"unexpected {sorted(set(actual) - set(expected))[:5]}")
    for key in sorted(set(actual) & set(expected)):
        for column, want in expected[key].items():
            got = actual[key][column]
            if column in EXACT_COLUMNS or isinstance(want, bool) or not isinstance(want, (int, float, Decimal)):
                if got != want:
                    problems.append(f"{key} {column}: {got!r} != {want!r}")
            elif relative_difference(got, want) > 1e-9:
                problems.append(f"{key} {column}: {got!r} vs {want!r} (rel {relative_difference(got, want):.2e})")
    return problems


async def stored(conn: asyncpg.Connection, table: str) -> dict[tuple[str, datetime], dict[str, Any]]:
    assert table in ("trade_metrics", "spread_metrics")
    rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY symbol, window_start")  # table is one of two fixed names
    return {(row["symbol"], row["window_start"]): {k: v for k, v in dict(row).items() if k != "updated_at"}
            for row in rows}


# --- one Spark session for the test run -----------------------------------------------------------
class SparkHolder:
    """The shared SparkSession, started on first use; `shutdown()` ends its JVM (a test that runs the
    job in child processes calls it first, so two Spark JVMs never run at once)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._spark: Any = None

    def get(self) -> Any:
        if self._spark is None:
            from spark.job import build_session

            self._spark = build_session(self.settings)
        return self._spark

    def shutdown(self) -> None:
        if self._spark is None:
            return
        from pyspark import SparkContext

        with contextlib.suppress(Exception):
            self._spark.stop()
        # Kill the JVM rather than shutting the gateway down politely: closing py4j's callback server
        # blocks on its connection threads. They end when their sockets close with the JVM.
        gateway = SparkContext._gateway
        process = getattr(gateway, "proc", None)
        if process is not None:
            with contextlib.suppress(Exception):
                process.kill()
                process.wait(10)
        SparkContext._gateway = None
        SparkContext._jvm = None
        self._spark = None


def metric_settings(settings: Settings, checkpoint: Path, **overrides: Any) -> Settings:
    """The test's settings with the metric parameters the event set exercises."""
    values: dict[str, Any] = {
        "spark_checkpoint_dir": checkpoint,
        "spark_watermark_s": 10.0,
        "spark_max_rows_per_trigger": 4_000,
        "spark_trigger_s": 1.0,
        "volatility_thresholds": {"BTCUSDT": 60.0, "ETHUSDT": 0.5},  # BNBUSDT: relative (bps of vwap)
        "volatility_default_bps": 5.0,
        "volume_spike_windows": 3,
        "volume_spike_factor": 2.5,
        "spread_warning_factor": 3.0,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


@pytest.fixture(scope="session")
def spark_holder(stack: Any) -> Iterator[SparkHolder]:
    holder = SparkHolder(stack.settings.model_copy(update={"spark_driver_memory": "768m"}))
    yield holder
    holder.shutdown()
