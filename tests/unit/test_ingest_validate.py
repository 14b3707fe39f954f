"""Ingest validation: every DLQ reason, exact JSON spans, and the checks' fast path agreeing with the diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cryptotui.stages.ingest.validate import (
    REASONS,
    Invalid,
    check_agg_trade,
    check_book_ticker,
    check_trade,
    is_positive_decimal,
    top_level_spans,
)

TRADE = {"e": "trade", "E": 1700000000001, "s": "BTCUSDT", "t": 5300000001, "p": "90000.12000000",
         "q": "0.00200000", "T": 1700000000000, "m": True, "M": True}
AGG = {"e": "aggTrade", "E": 1700000000001, "s": "BTCUSDT", "a": 3600000001, "p": "90000.12000000",
       "q": "0.00200000", "f": 5300000001, "l": 5300000002, "T": 1700000000000, "m": False, "M": True}
BOOK = {"u": 75000000001, "s": "BTCUSDT", "b": "90000.11000000", "B": "1.50000000", "a": "90000.12000000",
        "A": "0.20000000"}
CHECK = {"trade": check_trade, "aggTrade": check_agg_trade, "bookTicker": check_book_ticker}
EVENTS = {"trade": TRADE, "aggTrade": AGG, "bookTicker": BOOK}


def reason_of(kind: str, changes: dict[str, object], drop: tuple[str, ...] = ()) -> str:
    data = {**EVENTS[kind], **changes}
    for name in drop:
        del data[name]
    with pytest.raises(Invalid) as caught:
        CHECK[kind](data, "BTCUSDT")
    return caught.value.reason


@pytest.mark.parametrize("kind", ["trade", "aggTrade", "bookTicker"])
def test_good_events_pass_and_return_their_id(kind: str) -> None:
    expected = {"trade": 5300000001, "aggTrade": 3600000001, "bookTicker": 75000000001}[kind]
    assert CHECK[kind](dict(EVENTS[kind]), "BTCUSDT") == expected


def test_optional_fields_may_be_absent() -> None:
    assert check_trade({k: v for k, v in TRADE.items() if k != "M"}, "BTCUSDT") == TRADE["t"]
    futures_style = {**BOOK, "e": "bookTicker", "E": 1, "T": 1}
    assert check_book_ticker(futures_style, "BTCUSDT") == BOOK["u"]


@pytest.mark.parametrize(
    ("kind", "changes", "drop", "expected"),
    [
        ("trade", {}, ("t",), "missing_field: t"),
        ("trade", {}, ("p",), "missing_field: p"),
        ("aggTrade", {}, ("f",), "missing_field: f"),
        ("bookTicker", {}, ("A",), "missing_field: A"),
        ("trade", {"t": "5300000001"}, (), "wrong_type: t is string, expected integer"),
        ("trade", {"t": True}, (), "wrong_type: t is boolean, expected integer"),
        ("trade", {"p": 90000.12}, (), "wrong_type: p is number, expected a decimal string"),
        ("trade", {"m": 1}, (), "wrong_type: m is integer, expected boolean"),
        ("trade", {"M": None}, (), "wrong_type: M is null, expected boolean"),
        ("aggTrade", {"l": 1.5}, (), "wrong_type: l is number, expected integer"),
        ("bookTicker", {"u": None}, (), "wrong_type: u is null, expected integer"),
        ("trade", {"s": 7}, (), "wrong_type: s is integer, expected string"),
        ("trade", {"p": "0.00000000"}, (), "not_positive: p='0.00000000'"),
        ("trade", {"p": "-1.5"}, (), "not_positive: p='-1.5'"),
        ("trade", {"q": "0"}, (), "not_positive: q='0'"),
        ("trade", {"p": "1e5"}, (), "not_positive: p='1e5'"),
        ("trade", {"p": ""}, (), "not_positive: p=''"),
        ("aggTrade", {"q": "abc"}, (), "not_positive: q='abc'"),
        ("bookTicker", {"B": "0.00000000"}, (), "not_positive: B='0.00000000'"),
        ("bookTicker", {"b": "90000.12000000"}, (), "crossed_book: bid 90000.12000000 >= ask 90000.12000000"),
        ("bookTicker", {"b": "90000.13"}, (), "crossed_book: bid 90000.13 >= ask 90000.12000000"),
        ("trade", {"s": "ETHUSDT"}, (), "symbol_mismatch: s='ETHUSDT' on a BTCUSDT stream"),
        ("bookTicker", {"s": "ETHUSDT"}, (), "symbol_mismatch: s='ETHUSDT' on a BTCUSDT stream"),
        ("trade", {"e": "aggTrade"}, (), "event_mismatch: e='aggTrade' on a trade stream"),
        ("bookTicker", {"e": "trade"}, (), "event_mismatch: e='trade' on a bookTicker stream"),
    ],
)
def test_each_problem_has_its_reason(kind: str, changes: dict[str, object], drop: tuple[str, ...],
                                     expected: str) -> None:
    reason = reason_of(kind, changes, drop)
    assert reason == expected
    assert reason.partition(":")[0] in REASONS


def test_bid_below_ask_is_exact_beyond_float_precision() -> None:
    # Equal as floats, different as decimals.
    bid, ask = "1.00000000000000001", "1.00000000000000002"
    assert float(bid) == float(ask)
    assert check_book_ticker({**BOOK, "b": bid, "a": ask}, "BTCUSDT") == BOOK["u"]
    with pytest.raises(Invalid, match="crossed_book"):
        check_book_ticker({**BOOK, "b": ask, "a": bid}, "BTCUSDT")


@pytest.mark.parametrize(("value", "ok"), [("1", True), ("0.1", True), ("10.00000000", True), ("0.00000001", True),
                                           ("0", False), ("0.0", False), ("-1", False), ("1.", False), (".5", False),
                                           (" 1", False), ("1e3", False), ("NaN", False), (1, False), (None, False)])
def test_positive_decimals(value: object, ok: bool) -> None:
    assert is_positive_decimal(value) is ok


def test_spans_are_the_exact_text_of_each_value() -> None:
    text = ' { "data" : {"p":"1.10", "x": [1, {"y": "}"}]} ,"stream":"btcusdt@trade" } '
    spans = top_level_spans(text)
    value, start, end = spans["data"]
    assert text[start:end] == '{"p":"1.10", "x": [1, {"y": "}"}]}'
    assert value == json.loads(text[start:end])
    assert spans["stream"][0] == "btcusdt@trade"


@pytest.mark.parametrize(("text", "code"), [("", "not_json"), ("{", "not_json"), ('{"a":1} x', "not_json"),
                                            ('{"a" 1}', "not_json"), ("[1,2]", "not_object"), ('"s"', "not_object"),
                                            ("nul", "not_json"), ("[" * 100000, "not_json")])
def test_span_parser_reports_what_is_wrong(text: str, code: str) -> None:
    with pytest.raises(Invalid) as caught:
        top_level_spans(text)
    assert caught.value.code == code


def test_every_reason_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "ingest.md").read_text(encoding="utf-8")
    missing = [code for code in REASONS if f"`{code}`" not in doc]
    assert not missing, f"docs/ingest.md does not explain: {missing}"
