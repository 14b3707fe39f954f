"""Binance messages (Kafka values) -> staging rows, exactly, or a reason why a message cannot be stored.

A market message is the Binance `data` object plus `"recv_ns"` (docs/contracts.md). Mapping is strict
so that what is stored reads back exactly as Binance sent it:
- prices and quantities: canonical, non-negative decimal strings (`"67012.34000000"`), passed on as
  text and cast to `numeric` by the database, which keeps their scale: they read back equal;
- ids: JSON integers within bigint; flags: JSON booleans;
- event and trade times: integer milliseconds, `recv_ns`: integer nanoseconds, within the timestamps
  both Python and TimescaleDB hold (years 1-9999).
Anything else raises `MappingError` with a reason for the dead-letter topic.

The sink COPYs staging rows (text, bigint and boolean columns only: cheap to encode) into a temporary
table and converts them in the INSERT ... SELECT (`TableMapping.insert_sql`): integer milliseconds and
microseconds become timestamptz with exact integer arithmetic, decimal text becomes numeric.

Each mapper has a fast path (the common, valid message: inline checks) and falls back to the field by
field validators, which are authoritative: they accept the same messages and name what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

BIGINT_MIN: Final = -(2**63)
BIGINT_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
# Timestamps Python and the database both hold: years 1-9999 (TimescaleDB rejects the first hours of
# year 1, whose chunk would start before it, so the range starts on its second day).
MIN_US: Final = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // _US
MAX_US: Final = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _EPOCH) // _US
MIN_MS: Final = -(-MIN_US // 1000)
MAX_MS: Final = MAX_US // 1000
MIN_NS: Final = MIN_US * 1000
MAX_NS: Final = MAX_US * 1000 + 999
# PostgreSQL numeric: at most 131072 digits before the decimal point and 16383 after.
NUMERIC_INT_DIGITS: Final = 131072
NUMERIC_FRAC_DIGITS: Final = 16383
_DECIMAL_RE: Final = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_FAST_DECIMAL: Final = re.compile(r"(?:0|[1-9][0-9]{0,30})(?:\.[0-9]{1,30})?").fullmatch
_FAST_SYMBOL: Final = re.compile(r"[A-Z0-9]{1,32}").fullmatch
SYMBOL_MAX_LEN: Final = 64
_decode_json = json.JSONDecoder().raw_decode

Row = tuple[Any, ...]


class MappingError(ValueError):
    """The message cannot be stored; `reason` is the text sent to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- field validators (the slow, authoritative path) --------------------------------------------
def _describe(value: Any) -> str:
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _field(data: dict[str, Any], key: str, label: str) -> Any:
    try:
        return data[key]
    except KeyError:
        raise MappingError(f"missing field {key!r} ({label})") from None


def decimal_string(data: dict[str, Any], key: str, label: str) -> str:
    """A canonical non-negative decimal string (numeric keeps its digits and scale)."""
    value = _field(data, key, label)
    if type(value) is not str:
        raise MappingError(f"field {key!r} ({label}): expected a decimal string, got {_describe(value)}")
    match = _DECIMAL_RE.fullmatch(value)
    if match is None:
        raise MappingError(f"field {key!r} ({label}): {_describe(value)} is not a plain non-negative decimal")
    integer, fraction = match.groups()
    if len(integer) > NUMERIC_INT_DIGITS or (fraction is not None and len(fraction) > NUMERIC_FRAC_DIGITS):
        raise MappingError(f"field {key!r} ({label}): too many digits for numeric")
    return value


def bigint(data: dict[str, Any], key: str, label: str) -> int:
    value = _field(data, key, label)
    if type(value) is not int:
        raise MappingError(f"field {key!r} ({label}): expected an integer, got {_describe(value)}")
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise MappingError(f"field {key!r} ({label}): {value} is out of range for bigint")
    return value


def boolean(data: dict[str, Any], key: str, label: str) -> bool:
    value = _field(data, key, label)
    if type(value) is not bool:
        raise MappingError(f"field {key!r} ({label}): expected true or false, got {_describe(value)}")
    return value


def millis(data: dict[str, Any], key: str, label: str) -> int:
    """Integer milliseconds since the epoch, within the timestamp range."""
    value = _field(data, key, label)
    if type(value) is not int:
        raise MappingError(f"field {key!r} ({label}): expected integer milliseconds, got {_describe(value)}")
    if not MIN_MS <= value <= MAX_MS:
        raise MappingError(f"field {key!r} ({label}): {value} ms is out of range for a timestamp")
    return value


def recv_nanos(data: dict[str, Any]) -> int:
    """The receive time stamped by ingest, integer nanoseconds, within the timestamp range."""
    value = _field(data, "recv_ns", "receive time")
    if type(value) is not int:
        raise MappingError(f"field 'recv_ns' (receive time): expected integer nanoseconds, got {_describe(value)}")
    if not MIN_NS <= value <= MAX_NS:
        raise MappingError(f"field 'recv_ns' (receive time): {value} ns is out of range for a timestamp")
    return value


def symbol(data: dict[str, Any]) -> str:
    value = _field(data, "s", "symbol")
    if type(value) is not str:
        raise MappingError(f"field 's' (symbol): expected a string, got {_describe(value)}")
    if not value or len(value) > SYMBOL_MAX_LEN or not value.isprintable() or value.strip() != value:
        raise MappingError(f"field 's' (symbol): {_describe(value)} is not a symbol")
    return value


def event_type(data: dict[str, Any], expected: str, required: bool) -> None:
    if "e" not in data:
        if required:
            raise MappingError(f"missing field 'e' (event type, expected {expected!r})")
        return
    if data["e"] != expected:
        raise MappingError(f"field 'e' (event type): expected {expected!r}, got {_describe(data['e'])}")


# --- the slow path per stream type: data -> (staging row, recv_ns) ------------------------------
def check_trade(data: dict[str, Any]) -> tuple[Row, int]:
    event_type(data, "trade", required=True)
    recv_ns = recv_nanos(data)
    row = (
        symbol(data),
        bigint(data, "t", "trade id"),
        millis(data, "T", "trade time"),
        millis(data, "E", "event time"),
        decimal_string(data, "p", "price"),
        decimal_string(data, "q", "quantity"),
        boolean(data, "m", "buyer is maker"),
        recv_ns // 1000,
    )
    return row, recv_ns


def check_agg_trade(data: dict[str, Any]) -> tuple[Row, int]:
    event_type(data, "aggTrade", required=True)
    recv_ns = recv_nanos(data)
    row = (
        symbol(data),
        bigint(data, "a", "aggregate trade id"),
        millis(data, "T", "trade time"),
        millis(data, "E", "event time"),
        decimal_string(data, "p", "price"),
        decimal_string(data, "q", "quantity"),
        bigint(data, "f", "first trade id"),
        bigint(data, "l", "last trade id"),
        boolean(data, "m", "buyer is maker"),
        recv_ns // 1000,
    )
    return row, recv_ns


def check_book_ticker(data: dict[str, Any]) -> tuple[Row, int]:
    # Spot bookTicker has no "e"; accept the futures-style "e":"bookTicker" too.
    event_type(data, "bookTicker", required=False)
    recv_ns = recv_nanos(data)
    row = (
        symbol(data),
        bigint(data, "u", "update id"),
        recv_ns // 1000,
        decimal_string(data, "b", "best bid price"),
        decimal_string(data, "B", "best bid quantity"),
        decimal_string(data, "a", "best ask price"),
        decimal_string(data, "A", "best ask quantity"),
    )
    return row, recv_ns


# --- the fast path: the same result for the common valid message --------------------------------
def map_trade(data: dict[str, Any]) -> tuple[Row, int]:
    try:
        s, t, tt, et, p, q, m, r = (data["s"], data["t"], data["T"], data["E"], data["p"], data["q"], data["m"],
                                    data["recv_ns"])
    except KeyError:
        return check_trade(data)
    if (
        data.get("e") == "trade" and type(s) is str and _FAST_SYMBOL(s) is not None
        and type(t) is int and BIGINT_MIN <= t <= BIGINT_MAX
        and type(tt) is int and MIN_MS <= tt <= MAX_MS and type(et) is int and MIN_MS <= et <= MAX_MS
        and type(p) is str and _FAST_DECIMAL(p) is not None and type(q) is str and _FAST_DECIMAL(q) is not None
        and type(m) is bool and type(r) is int and MIN_NS <= r <= MAX_NS
    ):
        return (s, t, tt, et, p, q, m, r // 1000), r
    return check_trade(data)


def map_agg_trade(data: dict[str, Any]) -> tuple[Row, int]:
    try:
        s, a, tt, et, p, q, f, last, m, r = (data["s"], data["a"], data["T"], data["E"], data["p"], data["q"],
                                             data["f"], data["l"], data["m"], data["recv_ns"])
    except KeyError:
        return check_agg_trade(data)
    if (
        data.get("e") == "aggTrade" and type(s) is str and _FAST_SYMBOL(s) is not None
        and type(a) is int and BIGINT_MIN <= a <= BIGINT_MAX
        and type(tt) is int and MIN_MS <= tt <= MAX_MS and type(et) is int and MIN_MS <= et <= MAX_MS
        and type(p) is str and _FAST_DECIMAL(p) is not None and type(q) is str and _FAST_DECIMAL(q) is not None
        and type(f) is int and BIGINT_MIN <= f <= BIGINT_MAX and type(last) is int and BIGINT_MIN <= last <= BIGINT_MAX
        and type(m) is bool and type(r) is int and MIN_NS <= r <= MAX_NS
    ):
        return (s, a, tt, et, p, q, f, last, m, r // 1000), r
    return check_agg_trade(data)


def map_book_ticker(data: dict[str, Any]) -> tuple[Row, int]:
    try:
        s, u, b, bq, a, aq, r = (data["s"], data["u"], data["b"], data["B"], data["a"], data["A"],
                                 data["recv_ns"])
    except KeyError:
        return check_book_ticker(data)
    if (
        data.get("e", "bookTicker") == "bookTicker" and type(s) is str and _FAST_SYMBOL(s) is not None
        and type(u) is int and BIGINT_MIN <= u <= BIGINT_MAX
        and type(b) is str and _FAST_DECIMAL(b) is not None and type(bq) is str and _FAST_DECIMAL(bq) is not None
        and type(a) is str and _FAST_DECIMAL(a) is not None and type(aq) is str and _FAST_DECIMAL(aq) is not None
        and type(r) is int and MIN_NS <= r <= MAX_NS
    ):
        return (s, u, r // 1000, b, bq, a, aq), r
    return check_book_ticker(data)


# --- tables ---------------------------------------------------------------------------------------
def _ms_to_timestamptz(column: str) -> str:
    # Integer arithmetic: whole seconds (exact in interval multiplication) plus the remainder.
    return (
        f"(timestamptz 'epoch' + ({column} / 1000) * interval '1 second'"
        f" + ({column} % 1000) * interval '1 millisecond')"
    )


def _us_to_timestamptz(column: str) -> str:
    return (
        f"(timestamptz 'epoch' + ({column} / 1000000) * interval '1 second'"
        f" + ({column} % 1000000) * interval '1 microsecond')"
    )


@dataclass(frozen=True)
class TableMapping:
    """Where one stream type is stored and how: staging columns (name, type, target, expression)."""

    stream: str
    table: str
    staging: tuple[tuple[str, str, str, str], ...]
    mapper: Callable[[dict[str, Any]], tuple[Row, int]]
    checker: Callable[[dict[str, Any]], tuple[Row, int]]

    @property
    def staging_table(self) -> str:
        return f"sink_stage_{self.table}"

    @property
    def staging_columns(self) -> tuple[str, ...]:
        return tuple(name for name, _, _, _ in self.staging)

    @property
    def columns(self) -> tuple[str, ...]:
        """The target table's columns, in staging order."""
        return tuple(target for _, _, target, _ in self.staging)

    @property
    def create_staging_sql(self) -> str:
        columns = ", ".join(f"{name} {type_}" for name, type_, _, _ in self.staging)
        return f'CREATE TEMP TABLE IF NOT EXISTS "{self.staging_table}" ({columns}) ON COMMIT DELETE ROWS'

    @property
    def insert_sql(self) -> str:
        targets = ", ".join(self.columns)
        expressions = ", ".join(expression for _, _, _, expression in self.staging)
        return (
            f'INSERT INTO "{self.table}" ({targets}) SELECT {expressions} FROM "{self.staging_table}"'
            " ON CONFLICT DO NOTHING"
        )


def _plain(name: str, type_: str) -> tuple[str, str, str, str]:
    return (name, type_, name, name)


def _ms(name: str, target: str) -> tuple[str, str, str, str]:
    return (name, "bigint", target, _ms_to_timestamptz(name))


def _numeric(name: str) -> tuple[str, str, str, str]:
    return (name, "text", name, f"{name}::numeric")


_RECV = ("recv_us", "bigint", "recv_time", _us_to_timestamptz("recv_us"))

MAPPINGS: Final[dict[str, TableMapping]] = {
    "trade": TableMapping(
        "trade",
        "trades",
        (
            _plain("symbol", "text"), _plain("trade_id", "bigint"), _ms("trade_ms", "trade_time"),
            _ms("event_ms", "event_time"), _numeric("price"), _numeric("qty"),
            _plain("is_buyer_maker", "boolean"), _RECV,
        ),
        map_trade,
        check_trade,
    ),
    "aggTrade": TableMapping(
        "aggTrade",
        "agg_trades",
        (
            _plain("symbol", "text"), _plain("agg_trade_id", "bigint"), _ms("trade_ms", "trade_time"),
            _ms("event_ms", "event_time"), _numeric("price"), _numeric("qty"),
            _plain("first_trade_id", "bigint"), _plain("last_trade_id", "bigint"),
            _plain("is_buyer_maker", "boolean"), _RECV,
        ),
        map_agg_trade,
        check_agg_trade,
    ),
    "bookTicker": TableMapping(
        "bookTicker",
        "book_ticker",
        (
            _plain("symbol", "text"), _plain("update_id", "bigint"), _RECV, _numeric("bid"),
            _numeric("bid_qty"), _numeric("ask"), _numeric("ask_qty"),
        ),
        map_book_ticker,
        check_book_ticker,
    ),
}
TABLES: Final[tuple[str, ...]] = tuple(mapping.table for mapping in MAPPINGS.values())


def decode(value: bytes | None) -> dict[str, Any]:
    """A Kafka value -> the JSON object it holds."""
    if value is None:
        raise MappingError("empty message value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise MappingError("value is not UTF-8 text") from None
    try:
        data, end = _decode_json(text)
        if end != len(text) and text[end:].strip():
            raise ValueError(f"extra data at character {end}")
    except ValueError:
        try:  # the standard entry point, for its error message (and leading whitespace)
            data = json.loads(text)
        except ValueError as error:
            raise MappingError(f"value is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise MappingError(f"value is not a JSON object but {type(data).__name__}")
    return data


def map_message(mapping: TableMapping, value: bytes | None) -> tuple[Row, int]:
    """A Kafka value of `mapping`'s topic -> (staging row, recv_ns), or MappingError."""
    return mapping.mapper(decode(value))


def dead_letter(
    value: bytes | None, reason: str, topic: str | None, partition: int | None, offset: int | None
) -> tuple[bytes | None, bytes]:
    """The (key, value) of a dead-letter message per docs/contracts.md, source "sink"."""
    raw = "" if value is None else value.decode("utf-8", errors="replace")
    recv_ns: int | None = None
    key: bytes | None = None
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        candidate = data.get("recv_ns")
        if type(candidate) is int:
            recv_ns = candidate
        sym = data.get("s")
        if type(sym) is str and sym:
            key = sym.encode("utf-8", errors="replace")
    body = {
        "raw": raw,
        "reason": reason,
        "source": "sink",
        "recv_ns": recv_ns,
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    return key, json.dumps(body, ensure_ascii=False).encode("utf-8")


def to_datetime_ms(ms: int) -> datetime:
    """What a stored millisecond time reads back as (for tests and tools)."""
    return _EPOCH + timedelta(milliseconds=ms)


def to_datetime_ns(ns: int) -> datetime:
    """What a stored receive time reads back as: microseconds, truncated."""
    return _EPOCH + timedelta(microseconds=ns // 1000)
