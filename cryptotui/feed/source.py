"""The vocabulary the feed's parts share: stream names, the `Event` a source emits, the `FeedSource`
interface and the bounded trade history that answers the REST backfill endpoints.

It imports only the standard library, so importing the feed package stays cheap.
"""

from __future__ import annotations

import abc
import bisect
import math
import re
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

__all__ = [
    "STREAM_KINDS",
    "AggTradeRecord",
    "Emit",
    "Event",
    "FeedSource",
    "MarketHistory",
    "TradeRecord",
    "format_decimal",
    "is_valid_stream",
    "parse_decimal",
    "parse_speed",
    "stream_kind",
    "stream_name",
]

#: Stream kinds this feed produces, spelled as in Binance stream names (case matters: `aggTrade`).
STREAM_KINDS: tuple[str, ...] = ("trade", "aggTrade", "bookTicker")

_STREAM_RE = re.compile(r"^[a-z0-9]{2,20}@(trade|aggTrade|bookTicker)$")

#: Scale of the integer fixed-point numbers used for prices and quantities (8 decimals, as Binance prints).
DECIMALS_SCALE = 100_000_000


def is_valid_stream(name: str) -> bool:
    """True for `<lowercase symbol>@trade|aggTrade|bookTicker`."""
    return _STREAM_RE.match(name) is not None


def stream_name(symbol: str, kind: str) -> str:
    """`stream_name("BTCUSDT", "trade")` -> `"btcusdt@trade"`."""
    return f"{symbol.lower()}@{kind}"


def stream_kind(stream: str) -> str:
    """`"btcusdt@aggTrade"` -> `"aggTrade"`."""
    return stream.rpartition("@")[2]


def format_decimal(value: int) -> str:
    """A fixed-point integer in units of 1e-8 as Binance prints it: 9012345000000 -> "90123.45000000"."""
    if value < 0:
        return "-" + format_decimal(-value)
    units, fraction = divmod(value, DECIMALS_SCALE)
    return f"{units}.{fraction:08d}"


def parse_speed(speed: float | str) -> float:
    """Replay speed from `1`, `10`, `"2.5"` or `"max"`: a positive float, math.inf for max."""
    if isinstance(speed, str):
        if speed.strip().lower() == "max":
            return math.inf
        try:
            speed = float(speed)
        except ValueError:
            raise ValueError(f"speed must be a number > 0 or 'max', got {speed!r}") from None
    if not speed > 0:
        raise ValueError(f"speed must be a number > 0 or 'max', got {speed!r}")
    return float(speed)


class Event:
    """One message of one stream, serialized once and shared by every connection that wants it.

    `payload` is the data object's JSON text (what a raw `/ws` connection receives) and `combined` the
    `{"stream":..,"data":..}` wrapper (what a combined connection receives). Fault injection may make
    either of them something else entirely, which is why both are stored rather than derived on send.
    """

    __slots__ = ("combined", "payload", "stream")

    def __init__(self, stream: str, payload: str, combined: str | None = None) -> None:
        self.stream = stream
        self.payload = payload
        self.combined = combined if combined is not None else f'{{"stream":"{stream}","data":{payload}}}'

    def __repr__(self) -> str:
        return f"Event({self.stream!r}, {self.payload!r})"


#: What a source calls with each batch of events; awaiting it applies the server's back-pressure.
Emit = Callable[[list[Event]], Awaitable[None]]


class TradeRecord(NamedTuple):
    """One trade as the REST endpoints return it (strings exactly as sent on the WebSocket)."""

    id: int
    price: str
    qty: str
    time: int
    is_buyer_maker: bool


class AggTradeRecord(NamedTuple):
    """One aggregate trade: `first_id`..`last_id` are the trade ids it covers."""

    id: int
    price: str
    qty: str
    first_id: int
    last_id: int
    time: int
    is_buyer_maker: bool


def parse_decimal(text: str) -> int:
    """A decimal string as a fixed-point integer in units of 1e-8: "90123.45" -> 9012345000000.

    Digits beyond the 8th decimal are cut (Binance never sends more). Raises ValueError.
    """
    match = _DECIMAL_RE.match(text)
    if match is None:
        raise ValueError(f"not a decimal: {text!r}")
    sign, units, fraction = match.groups()
    value = int(units) * DECIMALS_SCALE + int((fraction or "").ljust(8, "0")[:8])
    return -value if sign else value


_DECIMAL_RE = re.compile(r"^(-?)(\d+)(?:\.(\d*))?$")


class _Columns:
    """Rows of integers stored column-wise in `array('q')`, keeping the newest `max_len` rows.

    A row costs 8 bytes per field instead of ~250 bytes as a tuple of ints and strings: 200k trades
    of a symbol take ~8 MB. Trimming in chunks keeps appends O(1) amortized; the first column is the
    id, sorted, so lookups by id are a bisection.
    """

    __slots__ = ("_max_len", "_trim_at", "columns")

    def __init__(self, fields: int, max_len: int) -> None:
        self.columns = [array("q") for _ in range(fields)]
        self._max_len = max_len
        self._trim_at = max_len + max(1, max_len // 8)

    def __len__(self) -> int:
        return len(self.columns[0])

    def trim(self) -> None:
        excess = len(self.columns[0]) - self._max_len
        if excess > 0 and len(self.columns[0]) >= self._trim_at:
            for column in self.columns:
                del column[:excess]

    def first_index(self) -> int:
        """Index of the oldest row still retained (rows before it wait for the next trim)."""
        return max(0, len(self.columns[0]) - self._max_len)

    def rows(self, start: int, stop: int) -> list[tuple[int, ...]]:
        return list(zip(*(column[start:stop] for column in self.columns), strict=True))

    def index_of(self, field: int, value: int) -> int:
        """First retained row whose `field` is >= value (the field must not decrease)."""
        return bisect.bisect_left(self.columns[field], value, lo=self.first_index())


class MarketHistory:
    """The last `max_per_symbol` trades and aggTrades of every symbol, for REST backfill and for tests.

    Sources record every trade they produce here, including those a fault keeps off the WebSocket: the
    history is what the market did, the WebSocket is what a client saw. Prices and quantities are kept
    as 8-decimal fixed-point integers and printed back as Binance prints them.
    """

    def __init__(self, max_per_symbol: int = 200_000) -> None:
        if max_per_symbol < 1:
            raise ValueError("max_per_symbol must be >= 1")
        self.max_per_symbol = max_per_symbol
        self._trades: dict[str, _Columns] = {}
        self._aggs: dict[str, _Columns] = {}

    # --- recording ------------------------------------------------------------------------------------

    def add_trade_e8(self, symbol: str, trade_id: int, price: int, qty: int, time: int, buyer_maker: bool) -> None:
        """Record a trade whose price and quantity are already fixed-point integers (the fast path)."""
        table = self._trades.get(symbol)
        if table is None:
            table = self._trades[symbol] = _Columns(5, self.max_per_symbol)
        ids, prices, qtys, times, makers = table.columns
        ids.append(trade_id)
        prices.append(price)
        qtys.append(qty)
        times.append(time)
        makers.append(buyer_maker)
        table.trim()

    def add_agg_trade_e8(
        self, symbol: str, agg_id: int, price: int, qty: int, first_id: int, last_id: int, time: int, maker: bool
    ) -> None:
        table = self._aggs.get(symbol)
        if table is None:
            table = self._aggs[symbol] = _Columns(7, self.max_per_symbol)
        ids, prices, qtys, firsts, lasts, times, makers = table.columns
        ids.append(agg_id)
        prices.append(price)
        qtys.append(qty)
        firsts.append(first_id)
        lasts.append(last_id)
        times.append(time)
        makers.append(maker)
        table.trim()

    def add_trade(self, symbol: str, trade: TradeRecord) -> None:
        """Record a trade given with decimal strings. Raises ValueError for unparsable numbers."""
        self.add_trade_e8(
            symbol, trade.id, parse_decimal(trade.price), parse_decimal(trade.qty), trade.time, trade.is_buyer_maker
        )

    def add_agg_trade(self, symbol: str, agg: AggTradeRecord) -> None:
        self.add_agg_trade_e8(
            symbol,
            agg.id,
            parse_decimal(agg.price),
            parse_decimal(agg.qty),
            agg.first_id,
            agg.last_id,
            agg.time,
            agg.is_buyer_maker,
        )

    # --- queries --------------------------------------------------------------------------------------

    def symbols(self) -> set[str]:
        return set(self._trades) | set(self._aggs)

    def trades(self, symbol: str) -> list[TradeRecord]:
        """Every retained trade of `symbol`, oldest first."""
        table = self._trades.get(symbol)
        return self._trade_rows(table, table.first_index(), len(table)) if table else []

    def trade_ids(self, symbol: str) -> list[int]:
        table = self._trades.get(symbol)
        return table.columns[0][table.first_index() :].tolist() if table else []

    def agg_trades(self, symbol: str) -> list[AggTradeRecord]:
        table = self._aggs.get(symbol)
        return self._agg_rows(table, table.first_index(), len(table)) if table else []

    def trades_from(self, symbol: str, from_id: int | None, limit: int) -> list[TradeRecord]:
        """Trades with id >= `from_id` (the newest ones when `from_id` is None), like historicalTrades."""
        table = self._trades.get(symbol)
        if table is None:
            return []
        start = max(table.first_index(), len(table) - limit) if from_id is None else table.index_of(0, from_id)
        return self._trade_rows(table, start, start + limit)

    def agg_trades_from(
        self,
        symbol: str,
        from_id: int | None = None,
        limit: int = 500,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[AggTradeRecord]:
        """AggTrades like GET /api/v3/aggTrades: from an id, within a time window, or the newest ones."""
        table = self._aggs.get(symbol)
        if table is None:
            return []
        if from_id is not None:
            start = table.index_of(0, from_id)
        elif start_ms is not None:
            start = table.index_of(5, start_ms)
        elif end_ms is not None:
            start = table.first_index()
        else:
            start = max(table.first_index(), len(table) - limit)
        found = self._agg_rows(table, start, start + limit)
        if end_ms is not None:
            found = [agg for agg in found if agg.time <= end_ms]
        return found

    @staticmethod
    def _trade_rows(table: _Columns, start: int, stop: int) -> list[TradeRecord]:
        return [
            TradeRecord(trade_id, format_decimal(price), format_decimal(qty), time, bool(maker))
            for trade_id, price, qty, time, maker in table.rows(start, stop)
        ]

    @staticmethod
    def _agg_rows(table: _Columns, start: int, stop: int) -> list[AggTradeRecord]:
        return [
            AggTradeRecord(agg_id, format_decimal(price), format_decimal(qty), first, last, time, bool(maker))
            for agg_id, price, qty, first, last, time, maker in table.rows(start, stop)
        ]


class FeedSource(abc.ABC):
    """Something that produces market events: a synthetic market or a recording."""

    history: MarketHistory

    @property
    @abc.abstractmethod
    def symbols(self) -> Sequence[str]:
        """Uppercase symbols this source knows about (REST answers -1121 for others)."""

    @property
    @abc.abstractmethod
    def paced(self) -> bool:
        """False when the source runs as fast as its consumers allow (speed `max`)."""

    @abc.abstractmethod
    async def run(self, emit: Emit) -> None:
        """Produce events until exhausted or cancelled, handing each batch to `emit` (and awaiting it)."""
