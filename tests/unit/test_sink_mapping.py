"""Mapping Binance messages to rows: exact values, and one dead-letter reason for every kind of fault."""

from __future__ import annotations

import copy
import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from cryptotui.stages.sink_mapping import (
    BIGINT_MAX,
    BIGINT_MIN,
    MAPPINGS,
    MAX_MS,
    MAX_NS,
    MIN_MS,
    MIN_NS,
    MappingError,
    dead_letter,
    map_message,
    to_datetime_ms,
    to_datetime_ns,
)

RECV_NS = 1_732_406_400_123_456_789

TRADE = {"e": "trade", "E": 1732406400124, "s": "BTCUSDT", "t": 4321012345, "p": "98012.34000000",
         "q": "0.00150000", "T": 1732406400123, "m": True, "M": True, "recv_ns": RECV_NS}
AGG = {"e": "aggTrade", "E": 1732406400124, "s": "ETHUSDT", "a": 987654321, "p": "3401.10000000",
       "q": "1.25000000", "f": 100, "l": 105, "T": 1732406400123, "m": False, "M": True, "recv_ns": RECV_NS}
BOOK = {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000",
        "A": "40.66000000", "recv_ns": RECV_NS}
SAMPLES = {"trade": TRADE, "aggTrade": AGG, "bookTicker": BOOK}


def encode(data: Any) -> bytes:
    return json.dumps(data).encode()


def mapped(stream: str, data: Any) -> tuple[tuple[Any, ...], int]:
    return map_message(MAPPINGS[stream], encode(data))


def reason(stream: str, value: bytes | None) -> str:
    with pytest.raises(MappingError) as caught:
        map_message(MAPPINGS[stream], value)
    return caught.value.reason


def changed(stream: str, **fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(SAMPLES[stream])
    data.update(fields)
    return data


def without(stream: str, key: str) -> dict[str, Any]:
    data = copy.deepcopy(SAMPLES[stream])
    del data[key]
    return data


# --- valid messages: exact staging rows ---------------------------------------------------------------
def test_trade_maps_to_exact_staging_row() -> None:
    row, recv_ns = mapped("trade", TRADE)
    assert row == ("BTCUSDT", 4321012345, 1732406400123, 1732406400124, "98012.34000000", "0.00150000", True,
                   RECV_NS // 1000)
    assert recv_ns == RECV_NS
    assert MAPPINGS["trade"].columns == ("symbol", "trade_id", "trade_time", "event_time", "price", "qty",
                                         "is_buyer_maker", "recv_time")


def test_agg_trade_maps_to_exact_staging_row() -> None:
    row, _ = mapped("aggTrade", AGG)
    assert row == ("ETHUSDT", 987654321, 1732406400123, 1732406400124, "3401.10000000", "1.25000000", 100, 105,
                   False, RECV_NS // 1000)


def test_book_ticker_maps_without_event_time() -> None:
    row, _ = mapped("bookTicker", BOOK)
    assert row == ("BNBUSDT", 400900217, RECV_NS // 1000, "25.35190000", "31.21000000", "25.36520000",
                   "40.66000000")
    # The futures-style event type is accepted too.
    assert mapped("bookTicker", changed("bookTicker", e="bookTicker"))[0] == row


def test_every_row_matches_its_staging_columns() -> None:
    for stream, mapping in MAPPINGS.items():
        row, _ = mapped(stream, SAMPLES[stream])
        assert len(row) == len(mapping.staging_columns) == len(mapping.columns)
        assert "ON CONFLICT DO NOTHING" in mapping.insert_sql
        assert mapping.staging_table in mapping.create_staging_sql


def test_decimal_strings_pass_untouched_and_unusual_but_valid_values_are_kept() -> None:
    long_fraction = "0." + "1" * 40  # beyond the fast path's pattern: the slow path accepts it
    data = changed("trade", p="0", q=long_fraction, s="1000SATSUSDT")
    row, _ = mapped("trade", data)
    assert row[4] == "0" and row[5] == long_fraction and row[0] == "1000SATSUSDT"
    # Non-ASCII symbols exist on Binance; extra unknown fields are ignored.
    row, _ = mapped("trade", changed("trade", s="币安人生USDT", X="extra"))
    assert row[0] == "币安人生USDT"


def test_boundaries_that_fit_are_accepted() -> None:
    for value in (BIGINT_MIN, BIGINT_MAX, 0):
        assert mapped("trade", changed("trade", t=value))[0][1] == value
    for value in (MIN_MS, MAX_MS):
        assert mapped("trade", changed("trade", T=value))[0][2] == value
    for value in (MIN_NS, MAX_NS):
        assert mapped("bookTicker", changed("bookTicker", recv_ns=value))[1] == value


def test_times_read_back_exactly() -> None:
    assert to_datetime_ms(1732406400123) == datetime(2024, 11, 24, 0, 0, 0, 123000, tzinfo=UTC)
    assert to_datetime_ns(RECV_NS) == datetime(2024, 11, 24, 0, 0, 0, 123456, tzinfo=UTC)


def test_whitespace_around_json_is_fine() -> None:
    row, _ = map_message(MAPPINGS["trade"], b"  " + encode(TRADE) + b"\n")
    assert row[1] == TRADE["t"]


# --- every reason for the dead-letter topic ---------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "empty message value"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"e": "trade", ', "not JSON"),
        (b'{"e": "trade"} {"x": 1}', "not JSON"),
        (b"[1, 2]", "not a JSON object but list"),
        (b"42", "not a JSON object but int"),
        (b'"text"', "not a JSON object but str"),
    ],
)
def test_undecodable_values(value: bytes | None, expected: str) -> None:
    assert expected in reason("trade", value)


@pytest.mark.parametrize(("stream", "key"), [(stream, key) for stream, data in SAMPLES.items() for key in data
                                             if key != "M"])
def test_every_missing_field_is_named(stream: str, key: str) -> None:
    assert reason(stream, encode(without(stream, key))).startswith(f"missing field {key!r}")


@pytest.mark.parametrize(
    ("stream", "fields", "expected"),
    [
        ("trade", {"e": "aggTrade"}, "expected 'trade', got str \"aggTrade\""),
        ("aggTrade", {"e": "trade"}, "expected 'aggTrade'"),
        ("bookTicker", {"e": "trade"}, "expected 'bookTicker'"),
        # prices and quantities: decimal strings only, exactly as Binance writes them
        ("trade", {"p": 98012.34}, "field 'p' (price): expected a decimal string, got float"),
        ("trade", {"p": 98012}, "expected a decimal string, got int"),
        ("trade", {"p": None}, "expected a decimal string, got NoneType"),
        ("trade", {"p": "abc"}, "is not a plain non-negative decimal"),
        ("trade", {"p": "-1.5"}, "is not a plain non-negative decimal"),
        ("trade", {"p": "01.5"}, "is not a plain non-negative decimal"),
        ("trade", {"p": "1e5"}, "is not a plain non-negative decimal"),
        ("trade", {"p": "1."}, "is not a plain non-negative decimal"),
        ("trade", {"p": ".5"}, "is not a plain non-negative decimal"),
        ("trade", {"p": ""}, "is not a plain non-negative decimal"),
        ("trade", {"p": "NaN"}, "is not a plain non-negative decimal"),
        ("trade", {"p": " 1.5"}, "is not a plain non-negative decimal"),
        ("trade", {"q": "0." + "1" * 16384}, "field 'q' (quantity): too many digits for numeric"),
        ("trade", {"q": "1" * 131073}, "too many digits for numeric"),
        ("bookTicker", {"B": [1]}, "field 'B' (best bid quantity): expected a decimal string, got list"),
        # ids: JSON integers within bigint
        ("trade", {"t": 1.0}, "field 't' (trade id): expected an integer, got float"),
        ("trade", {"t": "123"}, "expected an integer, got str"),
        ("trade", {"t": True}, "expected an integer, got bool"),
        ("trade", {"t": BIGINT_MAX + 1}, f"{BIGINT_MAX + 1} is out of range for bigint"),
        ("aggTrade", {"f": BIGINT_MIN - 1}, "field 'f' (first trade id)"),
        ("bookTicker", {"u": 10**30}, "out of range for bigint"),
        # times: integer milliseconds / nanoseconds within the timestamp range
        ("trade", {"T": "1732406400123"}, "field 'T' (trade time): expected integer milliseconds, got str"),
        ("trade", {"E": 1732406400123.5}, "field 'E' (event time): expected integer milliseconds, got float"),
        ("trade", {"T": MAX_MS + 1}, f"{MAX_MS + 1} ms is out of range for a timestamp"),
        ("trade", {"T": MIN_MS - 1}, "ms is out of range for a timestamp"),
        ("aggTrade", {"E": 10**20}, "out of range for a timestamp"),
        ("trade", {"recv_ns": "now"}, "field 'recv_ns' (receive time): expected integer nanoseconds, got str"),
        ("bookTicker", {"recv_ns": MAX_NS + 1}, "ns is out of range for a timestamp"),
        ("bookTicker", {"recv_ns": MIN_NS - 1}, "ns is out of range for a timestamp"),
        # flags
        ("trade", {"m": 1}, "field 'm' (buyer is maker): expected true or false, got int"),
        ("aggTrade", {"m": "true"}, "expected true or false, got str"),
        # symbols
        ("trade", {"s": 42}, "field 's' (symbol): expected a string, got int"),
        ("trade", {"s": ""}, "is not a symbol"),
        ("trade", {"s": "BTC\nUSDT"}, "is not a symbol"),
        ("trade", {"s": "BTC\u0000"}, "is not a symbol"),
        ("trade", {"s": " BTCUSDT"}, "is not a symbol"),
        ("trade", {"s": "X" * 65}, "is not a symbol"),
    ],
)
def test_faulty_fields_are_named_with_the_reason(stream: str, fields: dict[str, Any], expected: str) -> None:
    assert expected in reason(stream, encode(changed(stream, **fields)))


def test_trade_requires_its_event_type() -> None:
    assert reason("trade", encode(without("trade", "e"))) == "missing field 'e' (event type, expected 'trade')"


# --- the fast path agrees with the authoritative one ------------------------------------------------------
MUTATIONS: list[Any] = [None, 0, -1, 1.5, True, "", "1", "1.0", "-1", "x", [], {}, 2**63, -(2**63) - 1,
                        "0.00000001", "99999.99999999", "BTCUSDT", 10**13, MAX_MS + 1, "01", "1e3"]


def test_fast_and_slow_paths_agree_on_mutated_messages() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        stream = rng.choice(list(SAMPLES))
        mapping = MAPPINGS[stream]
        data = copy.deepcopy(SAMPLES[stream])
        for _ in range(rng.randint(0, 2)):
            key = rng.choice([*data.keys(), "e"])
            if rng.random() < 0.2:
                data.pop(key, None)
            else:
                data[key] = rng.choice(MUTATIONS)
        try:
            fast = mapping.mapper(data)
        except MappingError as error:
            fast = error.reason
        try:
            slow = mapping.checker(data)
        except MappingError as error:
            slow = error.reason
        assert fast == slow, data


# --- dead letters ---------------------------------------------------------------------------------------------
def test_dead_letter_follows_the_contract() -> None:
    value = encode(changed("trade", p=1.5))
    key, body = dead_letter(value, "field 'p' (price): expected a decimal string, got float 1.5",
                            "binance.trade", 2, 41)
    assert key == b"BTCUSDT"
    assert json.loads(body) == {
        "raw": value.decode(),
        "reason": "field 'p' (price): expected a decimal string, got float 1.5",
        "source": "sink",
        "recv_ns": RECV_NS,
        "topic": "binance.trade",
        "partition": 2,
        "offset": 41,
    }


def test_dead_letter_of_garbage_keeps_the_raw_text() -> None:
    key, body = dead_letter(b"\xffnot json", "value is not UTF-8 text", "binance.trade", 0, 7)
    document = json.loads(body)
    assert key is None and document["recv_ns"] is None
    assert document["raw"] == "\ufffdnot json" and document["offset"] == 7
    key, body = dead_letter(None, "empty message value", "binance.trade", 1, 8)
    assert key is None and json.loads(body)["raw"] == ""
