"""Checking Binance market messages and turning them into Kafka values, without re-serializing them.

A combined-stream message is `{"stream":"btcusdt@trade","data":{...}}`. The Kafka value is the `data`
object exactly as Binance sent it (its raw JSON text, so decimal strings and field order are untouched)
with `,"recv_ns":<int>` spliced in before its closing brace. The JSON text is parsed once: a regular
expression recognises the usual prefix and the standard library's C scanner parses `data` from there,
which also tells where `data` ends. Anything unusual (other key order, whitespace, bare events) goes
through `top_level_spans`, which finds the exact text of every top-level value.

Rejections raise `Invalid(code, detail)`; the code is one of `REASONS` and is what the DLQ reason starts
with (`"<code>: <detail>"`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "CHECKS",
    "REASONS",
    "Invalid",
    "check_agg_trade",
    "check_book_ticker",
    "check_trade",
    "decode_document",
    "event_id_field",
    "is_positive_decimal",
    "top_level_spans",
]

#: Every DLQ reason code of the ingest stage, with what it means (docs/ingest.md lists them too).
REASONS: dict[str, str] = {
    "not_utf8": "the frame is not valid UTF-8 text",
    "not_json": "the text is not a JSON document",
    "not_object": "the JSON document (or its `data`) is not an object",
    "unexpected_message": "a JSON object that is neither a stream message nor a control reply",
    "unknown_stream": "a stream this connection did not subscribe to (or an unknown event type)",
    "missing_field": "a required field is absent",
    "wrong_type": "a field has the wrong JSON type (e.g. a number where Binance sends a string)",
    "not_positive": "a price or quantity is not a positive decimal string",
    "crossed_book": "bookTicker with bid >= ask",
    "symbol_mismatch": "`s` is not the symbol of the stream",
    "event_mismatch": "`e` is not the event type of the stream",
    "too_large": "the message is larger than the ingest stage accepts",
    "produce_failed": "the broker refused the message for good (the reason follows)",
    "internal_error": "the ingest stage failed on this message (a bug: see the log)",
}


class Invalid(Exception):
    """A message that cannot be used; `code` is a key of REASONS."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


# --- decimals -------------------------------------------------------------------------------------------

# Digits with an optional fraction, at least one non-zero digit (so > 0). Binance never sends signs,
# exponents or spaces in prices and quantities.
_POSITIVE_DECIMAL = re.compile(r"(?=[0-9.]*[1-9])[0-9]+(?:\.[0-9]+)?").fullmatch


def is_positive_decimal(value: Any) -> bool:
    """True for a decimal string greater than zero ("0.01000000"), False for anything else."""
    return type(value) is str and _POSITIVE_DECIMAL(value) is not None


def _below(bid: str, ask: str) -> bool:
    """bid < ask exactly. float() rounding is monotonic, so float(bid) < float(ask) proves it; only
    when the floats say otherwise are the exact decimals compared."""
    if float(bid) < float(ask):
        return True
    try:
        return Decimal(bid) < Decimal(ask)
    except InvalidOperation:  # pragma: no cover - the strings passed _POSITIVE_DECIMAL
        return False


# --- field checks ---------------------------------------------------------------------------------------

_INT = "integer"
_STR = "string"
_DEC = "decimal"
_BOOL = "boolean"

# Field specs: (name, kind, required). The order is the order of the diagnosis.
_TRADE_FIELDS = (("e", _STR, True), ("E", _INT, True), ("s", _STR, True), ("t", _INT, True), ("p", _DEC, True),
                 ("q", _DEC, True), ("T", _INT, True), ("m", _BOOL, True), ("M", _BOOL, False))
_AGG_FIELDS = (("e", _STR, True), ("E", _INT, True), ("s", _STR, True), ("a", _INT, True), ("p", _DEC, True),
               ("q", _DEC, True), ("f", _INT, True), ("l", _INT, True), ("T", _INT, True), ("m", _BOOL, True),
               ("M", _BOOL, False))
_BOOK_FIELDS = (("u", _INT, True), ("s", _STR, True), ("b", _DEC, True), ("B", _DEC, True), ("a", _DEC, True),
                ("A", _DEC, True), ("e", _STR, False), ("E", _INT, False), ("T", _INT, False))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _diagnose(data: dict[str, Any], fields: tuple[tuple[str, str, bool], ...], event: str | None,
              symbol: str) -> Invalid:
    """The first thing wrong with `data` (the slow path, run only once the fast check failed)."""
    for name, kind, required in fields:
        if name not in data:
            if required:
                return Invalid("missing_field", name)
            continue
        value = data[name]
        if kind == _DEC:
            if type(value) is not str:
                return Invalid("wrong_type", f"{name} is {_json_type(value)}, expected a decimal string")
            if _POSITIVE_DECIMAL(value) is None:
                return Invalid("not_positive", f"{name}={value!r}")
        elif kind == _INT and type(value) is not int:
            return Invalid("wrong_type", f"{name} is {_json_type(value)}, expected integer")
        elif kind == _STR and type(value) is not str:
            return Invalid("wrong_type", f"{name} is {_json_type(value)}, expected string")
        elif kind == _BOOL and type(value) is not bool:
            return Invalid("wrong_type", f"{name} is {_json_type(value)}, expected boolean")
    if "e" in data and data["e"] != (event or "bookTicker"):
        return Invalid("event_mismatch", f"e={data['e']!r} on a {event or 'bookTicker'} stream")
    if data["s"] != symbol:
        return Invalid("symbol_mismatch", f"s={data['s']!r} on a {symbol} stream")
    if event is None and not _below(data["b"], data["a"]):
        return Invalid("crossed_book", f"bid {data['b']} >= ask {data['a']}")
    return Invalid("internal_error", "the fast check and the diagnosis disagree")


def check_trade(data: dict[str, Any], symbol: str) -> int:
    """Validate a trade event; returns its trade id `t`, raises Invalid."""
    try:
        t = data["t"]
        if (
            data["e"] == "trade"
            and data["s"] == symbol
            and type(t) is int
            and type(data["E"]) is int
            and type(data["T"]) is int
            and type(data["m"]) is bool
            and type(data.get("M", False)) is bool
            and type(p := data["p"]) is str
            and _POSITIVE_DECIMAL(p) is not None
            and type(q := data["q"]) is str
            and _POSITIVE_DECIMAL(q) is not None
        ):
            return t
    except KeyError:
        pass
    raise _diagnose(data, _TRADE_FIELDS, "trade", symbol)


def check_agg_trade(data: dict[str, Any], symbol: str) -> int:
    """Validate an aggTrade event; returns its aggregate trade id `a`, raises Invalid."""
    try:
        a = data["a"]
        if (
            data["e"] == "aggTrade"
            and data["s"] == symbol
            and type(a) is int
            and type(data["E"]) is int
            and type(data["T"]) is int
            and type(data["f"]) is int
            and type(data["l"]) is int
            and type(data["m"]) is bool
            and type(data.get("M", False)) is bool
            and type(p := data["p"]) is str
            and _POSITIVE_DECIMAL(p) is not None
            and type(q := data["q"]) is str
            and _POSITIVE_DECIMAL(q) is not None
        ):
            return a
    except KeyError:
        pass
    raise _diagnose(data, _AGG_FIELDS, "aggTrade", symbol)


def check_book_ticker(data: dict[str, Any], symbol: str) -> int:
    """Validate a (spot) bookTicker; returns its order book update id `u`, raises Invalid.

    Spot bookTickers have no `e`/`E`; futures-style ones with `"e":"bookTicker"` are accepted too.
    """
    try:
        u = data["u"]
        if (
            data["s"] == symbol
            and type(u) is int
            and type(b := data["b"]) is str
            and _POSITIVE_DECIMAL(b) is not None
            and type(a := data["a"]) is str
            and _POSITIVE_DECIMAL(a) is not None
            and type(bq := data["B"]) is str
            and _POSITIVE_DECIMAL(bq) is not None
            and type(aq := data["A"]) is str
            and _POSITIVE_DECIMAL(aq) is not None
            and ("e" not in data or data["e"] == "bookTicker")
            and type(data.get("E", 0)) is int
            and type(data.get("T", 0)) is int
            and _below(b, a)
        ):
            return u
    except KeyError:
        pass
    raise _diagnose(data, _BOOK_FIELDS, None, symbol)


#: Stream type -> its check.
CHECKS: dict[str, Callable[[dict[str, Any], str], int]] = {
    "trade": check_trade,
    "aggTrade": check_agg_trade,
    "bookTicker": check_book_ticker,
}


def event_id_field(stream_type: str) -> str:
    """The field whose id identifies a message of this stream type (duplicates are dropped by it)."""
    return {"trade": "t", "aggTrade": "a", "bookTicker": "u"}[stream_type]


# --- JSON text ------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
scan_value = _DECODER.scan_once  # (text, index) -> (value, end); raises StopIteration
_scan_string = json.decoder.scanstring  # (text, index after the quote) -> (str, end)
_WS = re.compile(r"[ \t\n\r]*").match


def top_level_spans(text: str) -> dict[str, tuple[Any, int, int]]:
    """Parse a JSON object: {key: (value, start, end)} where text[start:end] is the value's exact text.

    Raises Invalid("not_json") for text that is not JSON and Invalid("not_object") for other JSON
    documents. Duplicate keys: the last one wins, as in json.loads.
    """
    try:
        i = _WS(text, 0).end()
        if i >= len(text) or text[i] != "{":
            json.loads(text)  # a valid non-object document, or not JSON: tell which
            raise Invalid("not_object", f"a JSON {_json_type(json.loads(text))}")
        spans: dict[str, tuple[Any, int, int]] = {}
        i = _WS(text, i + 1).end()
        if text[i] == "}":
            end = i + 1
        else:
            while True:
                if text[i] != '"':
                    raise ValueError("expected a key")
                key, i = _scan_string(text, i + 1)
                i = _WS(text, i).end()
                if text[i] != ":":
                    raise ValueError("expected ':'")
                start = _WS(text, i + 1).end()
                value, end = scan_value(text, start)
                spans[key] = (value, start, end)
                i = _WS(text, end).end()
                if text[i] == ",":
                    i = _WS(text, i + 1).end()
                    continue
                if text[i] != "}":
                    raise ValueError("expected ',' or '}'")
                end = i + 1
                break
        if _WS(text, end).end() != len(text):
            raise ValueError("extra data after the object")
        return spans
    except (ValueError, IndexError, StopIteration, RecursionError):
        raise Invalid("not_json") from None


def decode_document(text: str) -> Any:
    """json.loads that raises Invalid("not_json")."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise Invalid("not_json") from None
