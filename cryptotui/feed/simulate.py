"""A synthetic market that looks like Binance spot: trades, aggTrades that really aggregate them, bookTickers.

Prices are integers in units of 1e-8 (the 8 decimals Binance prints) so they always sit exactly on the
symbol's tick size and format without floating-point noise. Content (ids, prices, quantities, sides) is
drawn from one seeded RNG and so is deterministic for a seed; timing (burst periods, the milliseconds in
`T`/`E`, and therefore where one aggTrade ends and the next begins) follows the wall clock.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptotui.feed.source import (
    DECIMALS_SCALE,
    Emit,
    Event,
    FeedSource,
    MarketHistory,
    format_decimal,
    parse_speed,
    stream_name,
)

__all__ = ["DEFAULT_SYMBOLS", "SimulatedMarket", "SymbolSpec", "symbol_spec"]

DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "BNBUSDT")

#: Seconds between two generated batches when paced: rate * TICK_S messages go out together.
TICK_S = 0.01
#: Batch size when running at speed `max`.
MAX_SPEED_BATCH = 1000
#: A stalled event loop must not produce a flood afterwards: catch up at most this much time.
MAX_CATCH_UP_S = 1.0


def _e8(value: float) -> int:
    return round(value * DECIMALS_SCALE)


@dataclass(frozen=True)
class SymbolSpec:
    """Static description of a symbol: price level, tick and lot sizes, activity and id ranges."""

    symbol: str
    price_e8: int  # starting price
    tick_e8: int  # price tick size
    lot_e8: int  # quantity step
    typical_qty_e8: int  # median size of one fill
    weight: float  # relative share of the messages
    first_trade_id: int
    first_agg_id: int
    first_update_id: int


# Levels and ids close to Binance's in 2025 (ids are in the billions on busy symbols).
_KNOWN: dict[str, tuple[float, float, float, float, float, int, int, int]] = {
    # symbol: (price, tick, lot, typical qty, weight, trade id, agg id, book update id)
    "BTCUSDT": (90_000.0, 0.01, 0.00001, 0.002, 5.0, 5_300_000_000, 3_600_000_000, 75_000_000_000),
    "ETHUSDT": (3_000.0, 0.01, 0.0001, 0.05, 3.0, 3_000_000_000, 2_300_000_000, 52_000_000_000),
    "BNBUSDT": (900.0, 0.01, 0.001, 0.2, 1.0, 1_200_000_000, 950_000_000, 21_000_000_000),
    "SOLUSDT": (200.0, 0.01, 0.001, 1.0, 2.0, 1_400_000_000, 1_000_000_000, 30_000_000_000),
    "XRPUSDT": (2.5, 0.0001, 0.1, 200.0, 1.5, 900_000_000, 700_000_000, 18_000_000_000),
    "DOGEUSDT": (0.2, 0.00001, 1.0, 1_000.0, 1.0, 1_000_000_000, 750_000_000, 17_000_000_000),
    "ADAUSDT": (0.8, 0.0001, 0.1, 500.0, 0.8, 600_000_000, 500_000_000, 12_000_000_000),
}


def symbol_spec(symbol: str) -> SymbolSpec:
    """The spec of a known symbol, or a stable made-up one (price 1..1000, tick 0.01) for any other."""
    symbol = symbol.upper()
    known = _KNOWN.get(symbol)
    if known is not None:
        price, tick, lot, qty, weight, trade_id, agg_id, update_id = known
        return SymbolSpec(symbol, _e8(price), _e8(tick), _e8(lot), _e8(qty), weight, trade_id, agg_id, update_id)
    # crc32 rather than hash(): the level must not change between runs (PYTHONHASHSEED).
    digest = zlib.crc32(symbol.encode())
    price = 1 + digest % 1000
    return SymbolSpec(
        symbol=symbol,
        price_e8=_e8(price),
        tick_e8=_e8(0.01),
        lot_e8=_e8(0.001),
        typical_qty_e8=max(_e8(0.001), _e8(round(200 / price, 3))),
        weight=0.5,
        first_trade_id=100_000_000 + digest % 400_000_000,
        first_agg_id=80_000_000 + digest % 300_000_000,
        first_update_id=5_000_000_000 + digest % 4_000_000_000,
    )


class _Book:
    """Mutable state of one symbol: best bid/ask, next ids and the aggTrade being built."""

    __slots__ = (
        "agg_first",
        "agg_last",
        "agg_maker",
        "agg_price",
        "agg_qty",
        "agg_time",
        "anchor",
        "ask",
        "ask_qty",
        "bid",
        "bid_qty",
        "lower",
        "next_agg_id",
        "next_trade_id",
        "next_update_id",
        "spec",
        "step_ticks",
        "streams",
    )

    def __init__(self, spec: SymbolSpec, rng: random.Random) -> None:
        self.spec = spec
        tick = spec.tick_e8
        self.anchor = spec.price_e8 // tick * tick
        self.bid = self.anchor
        self.ask = self.bid + tick
        self.bid_qty = spec.typical_qty_e8
        self.ask_qty = spec.typical_qty_e8
        # Per-update moves of ~5e-6 of the price keep a demo chart lively (BTC: ~0.45 USD, 45 ticks).
        self.step_ticks = max(1, round(spec.price_e8 * 5e-6 / tick))
        self.next_trade_id = spec.first_trade_id + rng.randrange(1_000_000)
        self.next_agg_id = spec.first_agg_id + rng.randrange(1_000_000)
        self.next_update_id = spec.first_update_id + rng.randrange(10_000_000)
        self.lower = spec.symbol.lower()
        self.streams = (
            stream_name(spec.symbol, "trade"),
            stream_name(spec.symbol, "aggTrade"),
            stream_name(spec.symbol, "bookTicker"),
        )
        self.agg_price = -1  # no aggTrade pending
        self.agg_maker = False
        self.agg_time = 0
        self.agg_qty = 0
        self.agg_first = 0
        self.agg_last = 0


class SimulatedMarket(FeedSource):
    """A random-walk market per symbol, paced at `rate` messages per second over all its streams.

    `rate` is the base rate; with `bursts` on, the market now and then runs several times faster for a
    few seconds, as real markets do. `speed` multiplies the rate; `speed="max"` (or math.inf) ignores
    pacing and produces as fast as the consumers take it.
    """

    def __init__(
        self,
        symbols: Iterable[str] = DEFAULT_SYMBOLS,
        rate: float = 2000.0,
        seed: int | None = None,
        *,
        speed: float | str = 1.0,
        bursts: bool = True,
        history_size: int = 200_000,
    ) -> None:
        names = [symbol.upper() for symbol in symbols]
        if not names:
            raise ValueError("at least one symbol is needed")
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.speed = parse_speed(speed)
        self.bursts = bursts
        self.seed = seed
        self.history = MarketHistory(history_size)
        self._rng = random.Random(seed)
        # Timing randomness (bursts, E-T delays) has its own RNG so content stays the same for a seed.
        self._timing_rng = random.Random(None if seed is None else seed ^ 0x5EED)
        self._books = [_Book(symbol_spec(name), self._rng) for name in dict.fromkeys(names)]
        self._weights = list(self._cumulative([book.spec.weight for book in self._books]))
        self._last_ms = 0
        self._burst_until = 0.0
        self._burst_factor = 1.0
        self.messages = 0

    # --- FeedSource -----------------------------------------------------------------------------------

    @property
    def symbols(self) -> Sequence[str]:
        return [book.spec.symbol for book in self._books]

    @property
    def paced(self) -> bool:
        return math.isfinite(self.speed)

    async def run(self, emit: Emit) -> None:
        if self.paced:
            await self._run_paced(emit)
        else:
            await self._run_unpaced(emit)

    # --- generation -----------------------------------------------------------------------------------

    def generate(self, count: int, now_ms: int | None = None) -> list[Event]:
        """At least `count` events (a taker order is never cut in half), all timed at one millisecond.

        Every aggTrade still open is closed at the end: a batch's millisecond is strictly later than the
        previous batch's, so no trade of a later batch could have joined it anyway.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ms = max(now_ms, self._last_ms + 1)
        self._last_ms = ms
        out: list[Event] = []
        rng = self._rng
        books = self._books
        weights = self._weights
        while len(out) < count:
            book = books[0] if len(books) == 1 else rng.choices(books, cum_weights=weights)[0]
            if rng.random() < 0.55:
                self._move_quotes(book, rng)
            else:
                self._taker_order(book, rng, ms, out)
            out.append(self._book_ticker(book))
        for book in books:
            self._close_agg(book, out)
        self.messages += len(out)
        return out

    def _move_quotes(self, book: _Book, rng: random.Random) -> None:
        """Random walk of the best bid, pulled gently back toward the symbol's level; a new spread."""
        tick = book.spec.tick_e8
        deviation = (book.bid - book.anchor) / book.anchor
        up_probability = min(0.9, max(0.1, 0.5 - deviation * 20))
        step = rng.randint(0, book.step_ticks) * tick
        book.bid = book.bid + step if rng.random() < up_probability else max(tick, book.bid - step)
        book.ask = book.bid + tick * (1 if rng.random() < 0.7 else rng.randint(2, 5))
        book.bid_qty = self._quantity(book, rng) * rng.randint(1, 20)
        book.ask_qty = self._quantity(book, rng) * rng.randint(1, 20)

    def _taker_order(self, book: _Book, rng: random.Random, ms: int, out: list[Event]) -> None:
        """A market order eating 1-3 price levels, each filled by one or more resting orders."""
        tick = book.spec.tick_e8
        buyer_is_maker = rng.random() < 0.5  # the taker sells into the bid
        draw = rng.random()
        levels = 1 if draw < 0.85 else (2 if draw < 0.97 else 3)
        direction = -tick if buyer_is_maker else tick
        price = book.bid if buyer_is_maker else book.ask
        for _ in range(levels):
            fills = 1
            while fills < 6 and rng.random() < 0.45:
                fills += 1
            for _ in range(fills):
                self._trade(book, price, self._quantity(book, rng), ms, buyer_is_maker, out)
            price += direction
            if price <= 0:
                break
        # The levels taken are gone: the touched side of the book moves past the last fill.
        last = price - direction
        spread = tick * (1 if rng.random() < 0.7 else 2)
        if buyer_is_maker:
            book.bid = max(tick, last - tick)
            book.ask = min(book.ask, book.bid + spread)
        else:
            book.ask = last + tick
            book.bid = max(book.bid, book.ask - spread)

    def _quantity(self, book: _Book, rng: random.Random) -> int:
        """A log-normal fill size around the symbol's typical size, on its lot step, at least one lot."""
        lot = book.spec.lot_e8
        size = book.spec.typical_qty_e8 * rng.lognormvariate(0.0, 1.2)
        return max(lot, int(size) // lot * lot)

    def _trade(self, book: _Book, price: int, qty: int, ms: int, buyer_is_maker: bool, out: list[Event]) -> None:
        trade_id = book.next_trade_id
        book.next_trade_id = trade_id + 1
        price_text = format_decimal(price)
        qty_text = format_decimal(qty)
        maker_text = "true" if buyer_is_maker else "false"
        symbol = book.spec.symbol
        event_ms = ms + (1 if self._timing_rng.random() < 0.2 else 0)
        out.append(
            Event(
                book.streams[0],
                f'{{"e":"trade","E":{event_ms},"s":"{symbol}","t":{trade_id},"p":"{price_text}",'
                f'"q":"{qty_text}","T":{ms},"m":{maker_text},"M":true}}',
            )
        )
        self.history.add_trade_e8(symbol, trade_id, price, qty, ms, buyer_is_maker)
        # Binance aggregates consecutive trades with the same price, taker side and millisecond.
        if book.agg_price == price and book.agg_maker == buyer_is_maker and book.agg_time == ms:
            book.agg_qty += qty
            book.agg_last = trade_id
            return
        self._close_agg(book, out)
        book.agg_price = price
        book.agg_maker = buyer_is_maker
        book.agg_time = ms
        book.agg_qty = qty
        book.agg_first = trade_id
        book.agg_last = trade_id

    def _close_agg(self, book: _Book, out: list[Event]) -> None:
        if book.agg_price < 0:
            return
        agg_id = book.next_agg_id
        book.next_agg_id = agg_id + 1
        price_text = format_decimal(book.agg_price)
        qty_text = format_decimal(book.agg_qty)
        maker = book.agg_maker
        ms = book.agg_time
        symbol = book.spec.symbol
        out.append(
            Event(
                book.streams[1],
                f'{{"e":"aggTrade","E":{ms},"s":"{symbol}","a":{agg_id},"p":"{price_text}","q":"{qty_text}",'
                f'"f":{book.agg_first},"l":{book.agg_last},"T":{ms},"m":{"true" if maker else "false"},"M":true}}',
            )
        )
        self.history.add_agg_trade_e8(
            symbol, agg_id, book.agg_price, book.agg_qty, book.agg_first, book.agg_last, ms, maker
        )
        book.agg_price = -1

    def _book_ticker(self, book: _Book) -> Event:
        update_id = book.next_update_id + 1 + self._rng.randrange(3)
        book.next_update_id = update_id
        return Event(
            book.streams[2],
            f'{{"u":{update_id},"s":"{book.spec.symbol}","b":"{format_decimal(book.bid)}",'
            f'"B":"{format_decimal(book.bid_qty)}","a":"{format_decimal(book.ask)}",'
            f'"A":"{format_decimal(book.ask_qty)}"}}',
        )

    # --- pacing ---------------------------------------------------------------------------------------

    def current_rate(self, now: float) -> float:
        """Messages per second wanted at loop time `now`, bursts included (starts/ends bursts)."""
        if self.bursts and now >= self._burst_until:
            self._burst_factor = 1.0
            # About one burst every 30 s, lasting 0.5-3 s at 3-8 times the base rate.
            if self._timing_rng.random() < TICK_S / 30.0:
                self._burst_until = now + self._timing_rng.uniform(0.5, 3.0)
                self._burst_factor = self._timing_rng.uniform(3.0, 8.0)
        return self.rate * self.speed * self._burst_factor

    async def _run_paced(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        next_tick = last + TICK_S
        owed = 0.0  # messages due but not yet generated (negative: generated ahead)
        while True:
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            next_tick = max(next_tick + TICK_S, now)
            owed += self.current_rate(now) * min(now - last, MAX_CATCH_UP_S)
            last = now
            if owed >= 1:
                batch = self.generate(int(owed))
                owed -= len(batch)
                await emit(batch)

    async def _run_unpaced(self, emit: Emit) -> None:
        while True:
            await emit(self.generate(MAX_SPEED_BATCH))
            # Let connections and timers run between batches even when no consumer ever blocks.
            await asyncio.sleep(0)

    @staticmethod
    def _cumulative(weights: list[float]) -> Iterable[float]:
        total = 0.0
        for weight in weights:
            total += weight
            yield total
