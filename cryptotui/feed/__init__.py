"""A local Binance-compatible market feed: WebSocket streams plus the REST trade endpoints.

The server (`server.py`) speaks Binance's spot market-stream protocol; what it sends comes from a
`FeedSource`: a synthetic market (`simulate.py`) or a recording (`recording.py`). Faults a client must
survive are injected by `faults.py`.

This module holds the vocabulary the parts share: stream names, the `Event` a source emits, the
`FeedSource` interface and the bounded trade history that answers the REST backfill endpoints. It only
imports the standard library, so importing the package stays cheap.
"""

from __future__ import annotations

import abc
import bisect
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
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


class _BoundedLog:
    """An append-only list of records sorted by their first field, keeping the newest `max_len`.

    A plain list trimmed in chunks gives O(1) appends (amortized) and O(log n) lookups by id, which a
    deque (O(n) indexing from the middle) would not.
    """

    __slots__ = ("_items", "_max_len", "_trim_at")

    def __init__(self, max_len: int) -> None:
        self._items: list[tuple] = []
        self._max_len = max_len
        self._trim_at = max_len + max(1, max_len // 8)

    def append(self, item: tuple) -> None:
        items = self._items
        items.append(item)
        if len(items) >= self._trim_at:
            del items[: len(items) - self._max_len]

    def items(self) -> list[tuple]:
        """The retained records, oldest first (trimmed to `max_len`)."""
        excess = len(self._items) - self._max_len
        return self._items[excess:] if excess > 0 else list(self._items)

    def from_key(self, key: int, limit: int) -> list[tuple]:
        """Up to `limit` records whose first field is >= `key`, oldest first."""
        items = self._items
        lowest = max(0, len(items) - self._max_len)
        start = max(lowest, bisect.bisect_left(items, key, lo=lowest, key=itemgetter(0)))
        return items[start : start + limit]

    def latest(self, limit: int) -> list[tuple]:
        retained = min(len(self._items), self._max_len)
        return self._items[len(self._items) - min(limit, retained) :]

    def where(self, field: int, low: int, high: int, limit: int) -> list[tuple]:
        """Up to `limit` records with `low <= record[field] <= high`; the field must not decrease."""
        items = self._items
        lowest = max(0, len(items) - self._max_len)
        start = bisect.bisect_left(items, low, lo=lowest, key=itemgetter(field))
        out: list[tuple] = []
        for item in items[start : start + limit]:
            if item[field] > high:
                break
            out.append(item)
        return out


class MarketHistory:
    """The last `max_per_symbol` trades and aggTrades of every symbol, for REST backfill and for tests.

    Sources record every trade they produce here, including those a fault keeps off the WebSocket: the
    history is what the market did, the WebSocket is what a client saw.
    """

    def __init__(self, max_per_symbol: int = 200_000) -> None:
        if max_per_symbol < 1:
            raise ValueError("max_per_symbol must be >= 1")
        self.max_per_symbol = max_per_symbol
        self._trades: dict[str, _BoundedLog] = {}
        self._aggs: dict[str, _BoundedLog] = {}

    def add_trade(self, symbol: str, trade: TradeRecord) -> None:
        log = self._trades.get(symbol)
        if log is None:
            log = self._trades[symbol] = _BoundedLog(self.max_per_symbol)
        log.append(trade)

    def add_agg_trade(self, symbol: str, agg: AggTradeRecord) -> None:
        log = self._aggs.get(symbol)
        if log is None:
            log = self._aggs[symbol] = _BoundedLog(self.max_per_symbol)
        log.append(agg)

    def symbols(self) -> set[str]:
        return set(self._trades) | set(self._aggs)

    def trades(self, symbol: str) -> list[TradeRecord]:
        """Every retained trade of `symbol`, oldest first."""
        log = self._trades.get(symbol)
        return log.items() if log else []  # type: ignore[return-value]

    def trade_ids(self, symbol: str) -> list[int]:
        return [trade.id for trade in self.trades(symbol)]

    def agg_trades(self, symbol: str) -> list[AggTradeRecord]:
        log = self._aggs.get(symbol)
        return log.items() if log else []  # type: ignore[return-value]

    def trades_from(self, symbol: str, from_id: int | None, limit: int) -> list[TradeRecord]:
        """Trades with id >= `from_id` (the newest ones when `from_id` is None), like historicalTrades."""
        log = self._trades.get(symbol)
        if log is None:
            return []
        found = log.latest(limit) if from_id is None else log.from_key(from_id, limit)
        return found  # type: ignore[return-value]

    def agg_trades_from(
        self,
        symbol: str,
        from_id: int | None = None,
        limit: int = 500,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[AggTradeRecord]:
        """AggTrades like GET /api/v3/aggTrades: by id, by time window, or the newest ones."""
        log = self._aggs.get(symbol)
        if log is None:
            return []
        if from_id is not None:
            found = log.from_key(from_id, limit)
            if end_ms is not None:
                found = [agg for agg in found if agg[5] <= end_ms]
            return found  # type: ignore[return-value]
        if start_ms is not None or end_ms is not None:
            low = start_ms if start_ms is not None else 0
            high = end_ms if end_ms is not None else 2**63
            return log.where(5, low, high, limit)  # type: ignore[return-value]
        return log.latest(limit)  # type: ignore[return-value]


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
