"""Per-message faults: ids kept off the WebSocket, malformed messages of every kind."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

import pytest

from cryptotui.feed.faults import MALFORMED_KINDS, Faults, MessageFaults, malform
from cryptotui.feed.simulate import SimulatedMarket
from cryptotui.feed.source import Event

TRADE = Event(
    "btcusdt@trade",
    '{"e":"trade","E":2,"s":"BTCUSDT","t":7,"p":"90000.01000000","q":"0.10000000","T":1,"m":false,"M":true}',
)
BOOK = Event("btcusdt@bookTicker", '{"u":9,"s":"BTCUSDT","b":"1.00000000","B":"2.00000000","a":"1.01000000","A":"3"}')


def test_exactly_n_per_1000_messages_are_malformed_and_spread_out() -> None:
    faults = MessageFaults(Faults(malformed_per_1000=20))
    batch = SimulatedMarket(seed=1).generate(5000)[:5000]
    out = faults.apply(batch)
    changed = [index for index, (before, after) in enumerate(zip(batch, out, strict=True)) if before is not after]
    assert len(changed) == faults.malformed == 100
    assert min(b - a for a, b in itertools.pairwise(changed)) >= 49
    assert set(faults.malformed_by_kind) == set(MALFORMED_KINDS)


def test_every_malformed_kind_is_broken_as_announced() -> None:
    assert not _is_json(malform(TRADE, "not_json").payload)
    assert not _is_json(malform(TRADE, "not_json").combined)
    for variant in range(4):
        data = json.loads(malform(TRADE, "missing_field", variant).payload)
        assert len(data) == 8
    assert isinstance(json.loads(malform(TRADE, "wrong_type", 0).payload)["p"], float)
    assert isinstance(json.loads(malform(TRADE, "wrong_type", 1).payload)["t"], str)
    for variant in range(2):
        assert Decimal(json.loads(malform(TRADE, "bad_price", variant).payload)["p"]) <= 0
    unknown = malform(TRADE, "unknown_stream")
    assert json.loads(unknown.combined)["stream"] == "btcusdt@bogusStream"
    assert json.loads(unknown.payload)["e"] == "bogusEvent"
    assert unknown.stream == TRADE.stream  # still routed to the subscribers of the original stream
    for variant in range(2):
        data = json.loads(malform(BOOK, "crossed_book", variant).payload)
        assert Decimal(data["b"]) >= Decimal(data["a"])


def test_every_nth_trade_and_agg_trade_per_stream_is_skipped() -> None:
    faults = MessageFaults(Faults(skip_ids_every=4))
    batch = SimulatedMarket(["BTCUSDT", "ETHUSDT"], seed=2).generate(2000)
    out = faults.apply(batch)
    for stream in ("btcusdt@trade", "ethusdt@trade", "btcusdt@aggTrade"):
        before = [event for event in batch if event.stream == stream]
        after = [event for event in out if event.stream == stream]
        assert after == [event for index, event in enumerate(before, 1) if index % 4]
    books = [event for event in batch if event.stream.endswith("@bookTicker")]
    assert [event for event in out if event.stream.endswith("@bookTicker")] == books
    assert faults.skipped == len(batch) - len(out)


@pytest.mark.parametrize(
    "bad",
    [
        {"malformed_per_1000": 1001},
        {"skip_ids_every": 1},
        {"drop_every_s": 0},
        {"stall_for_s": 0},
        {"shutdown_after_s": -1},
    ],
)
def test_bad_fault_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        Faults(**bad)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
