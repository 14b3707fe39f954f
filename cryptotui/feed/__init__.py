"""A local Binance-compatible market feed: WebSocket streams plus the REST trade endpoints.

The server (`server.py`) speaks Binance's spot market-stream protocol; what it sends comes from a
`FeedSource` (`source.py`): a synthetic market (`simulate.py`) or a recording (`recording.py`). Faults a
client must survive are injected by `faults.py`.
"""

from cryptotui.feed.source import (
    STREAM_KINDS,
    AggTradeRecord,
    Emit,
    Event,
    FeedSource,
    MarketHistory,
    TradeRecord,
    format_decimal,
    is_valid_stream,
    parse_decimal,
    parse_speed,
    stream_kind,
    stream_name,
)

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
