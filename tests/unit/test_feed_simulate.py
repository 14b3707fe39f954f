"""The synthetic market: Binance's formats, realistic levels, real aggregation, determinism, pacing."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest

from cryptotui.feed.simulate import SimulatedMarket, symbol_spec
from cryptotui.feed.source import Event

DECIMAL_RE = re.compile(r"^\d+\.\d{8}$")
TRADE_FIELDS = {"e": str, "E": int, "s": str, "t": int, "p": str, "q": str, "T": int, "m": bool, "M": bool}
AGG_FIELDS = {"e": str, "E": int, "s": str, "a": int, "p": str, "q": str, "f": int, "l": int, "T": int, "m": bool,
              "M": bool}  # fmt: skip
BOOK_FIELDS = {"u": int, "s": str, "b": str, "B": str, "a": str, "A": str}


def generate(market: SimulatedMarket, batches: int = 40, size: int = 250, start_ms: int = 1_767_225_600_000):
    """Events of several batches, a few milliseconds apart, grouped by stream kind."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for index in range(batches):
        for event in market.generate(size, now_ms=start_ms + index * 3):
            by_kind[event.stream.partition("@")[2]].append(json.loads(event.payload))
    return by_kind


def test_messages_have_binance_field_sets_and_types() -> None:
    by_kind = generate(SimulatedMarket(seed=1), batches=5)
    for kind, fields in (("trade", TRADE_FIELDS), ("aggTrade", AGG_FIELDS), ("bookTicker", BOOK_FIELDS)):
        assert by_kind[kind], kind
        for data in by_kind[kind]:
            assert data.keys() == fields.keys()
            for name, expected_type in fields.items():
                assert type(data[name]) is expected_type, (kind, name, data)
    for data in by_kind["trade"] + by_kind["aggTrade"]:
        assert DECIMAL_RE.match(data["p"]) and DECIMAL_RE.match(data["q"])
        assert Decimal(data["p"]) > 0 and Decimal(data["q"]) > 0
        assert data["E"] >= data["T"]
        assert data["M"] is True


def test_combined_text_wraps_the_payload() -> None:
    event = SimulatedMarket(seed=1).generate(1)[0]
    assert json.loads(event.combined) == {"stream": event.stream, "data": json.loads(event.payload)}


def test_prices_sit_on_the_tick_and_quantities_on_the_lot() -> None:
    market = SimulatedMarket(["BTCUSDT", "XRPUSDT", "FOOBARUSDT"], seed=3)
    by_kind = generate(market, batches=10)
    for data in by_kind["trade"] + by_kind["bookTicker"]:
        spec = symbol_spec(data["s"])
        for field in ("p", "b", "a"):
            if field in data:
                assert round(Decimal(data[field]) * 10**8) % spec.tick_e8 == 0, data
        for field in ("q",):
            if field in data:
                assert round(Decimal(data[field]) * 10**8) % spec.lot_e8 == 0, data


def test_price_levels_are_realistic() -> None:
    by_kind = generate(SimulatedMarket(["BTCUSDT", "ETHUSDT", "BNBUSDT", "NEWCOINUSDT"], seed=5), batches=20)
    prices: dict[str, list[Decimal]] = defaultdict(list)
    for data in by_kind["trade"]:
        prices[data["s"]].append(Decimal(data["p"]))
    assert min(prices["BTCUSDT"]) > 80_000 and max(prices["BTCUSDT"]) < 100_000
    assert min(prices["ETHUSDT"]) > 2_700 and max(prices["ETHUSDT"]) < 3_300
    assert min(prices["BNBUSDT"]) > 800 and max(prices["BNBUSDT"]) < 1_000
    assert min(prices["NEWCOINUSDT"]) > 0
    assert len(set(prices["BTCUSDT"])) > 20, "the price should move"


def test_trade_ids_are_consecutive_per_symbol_and_large() -> None:
    market = SimulatedMarket(seed=2)
    by_kind = generate(market)
    ids: dict[str, list[int]] = defaultdict(list)
    for data in by_kind["trade"]:
        ids[data["s"]].append(data["t"])
    for symbol, symbol_ids in ids.items():
        assert symbol_ids == list(range(symbol_ids[0], symbol_ids[0] + len(symbol_ids))), symbol
        assert symbol_ids[0] > 100_000_000
        assert market.history.trade_ids(symbol) == symbol_ids


def test_agg_trades_aggregate_the_trades_exactly() -> None:
    market = SimulatedMarket(seed=4)
    by_kind = generate(market, batches=60)
    trades: dict[str, list[dict[str, Any]]] = defaultdict(list)
    aggs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for data in by_kind["trade"]:
        trades[data["s"]].append(data)
    for data in by_kind["aggTrade"]:
        aggs[data["s"]].append(data)
    for symbol, symbol_trades in trades.items():
        by_id = {trade["t"]: trade for trade in symbol_trades}
        symbol_aggs = aggs[symbol]
        agg_ids = [agg["a"] for agg in symbol_aggs]
        assert agg_ids == list(range(agg_ids[0], agg_ids[0] + len(agg_ids)))
        # The aggTrades' [f, l] ranges tile the trade ids without a hole or an overlap.
        assert symbol_aggs[0]["f"] == symbol_trades[0]["t"]
        assert symbol_aggs[-1]["l"] == symbol_trades[-1]["t"]
        for before, after in itertools.pairwise(symbol_aggs):
            assert after["f"] == before["l"] + 1
        for agg in symbol_aggs:
            members = [by_id[trade_id] for trade_id in range(agg["f"], agg["l"] + 1)]
            assert sum(Decimal(trade["q"]) for trade in members) == Decimal(agg["q"])
            assert {(trade["p"], trade["m"], trade["T"]) for trade in members} == {(agg["p"], agg["m"], agg["T"])}
        # And they are maximal: consecutive trades with the same price, side and time share one aggTrade.
        agg_of = {trade_id: agg["a"] for agg in symbol_aggs for trade_id in range(agg["f"], agg["l"] + 1)}
        for before, after in itertools.pairwise(symbol_trades):
            same_key = (before["p"], before["m"], before["T"]) == (after["p"], after["m"], after["T"])
            assert (agg_of[before["t"]] == agg_of[after["t"]]) == same_key
    assert any(agg["l"] > agg["f"] for agg in by_kind["aggTrade"]), "some aggTrades should cover several trades"


def test_book_ticker_bid_is_below_ask_and_update_ids_increase() -> None:
    by_kind = generate(SimulatedMarket(["BTCUSDT", "DOGEUSDT"], seed=6), batches=30)
    last_update: dict[str, int] = {}
    for data in by_kind["bookTicker"]:
        assert Decimal(data["b"]) < Decimal(data["a"]), data
        assert Decimal(data["b"]) > 0 and Decimal(data["B"]) > 0 and Decimal(data["A"]) > 0
        assert data["u"] > last_update.get(data["s"], 0)
        last_update[data["s"]] = data["u"]


def test_same_seed_gives_the_same_market() -> None:
    def payloads(seed: int) -> list[str]:
        market = SimulatedMarket(seed=seed)
        return [event.payload for index in range(5) for event in market.generate(200, now_ms=1_000_000 + index)]

    assert payloads(11) == payloads(11)
    assert payloads(11) != payloads(12)


async def test_paced_market_sends_at_the_rate() -> None:
    market = SimulatedMarket(rate=4000, seed=1, bursts=False)
    received: list[Event] = []

    async def emit(batch: list[Event]) -> None:
        received.extend(batch)

    task = asyncio.create_task(market.run(emit))
    await asyncio.sleep(0.5)
    task.cancel()
    assert 1500 <= len(received) <= 2500


async def test_max_speed_market_is_unpaced() -> None:
    market = SimulatedMarket(rate=10, seed=1, speed="max")
    assert not market.paced
    received: list[Event] = []

    async def emit(batch: list[Event]) -> None:
        received.extend(batch)

    task = asyncio.create_task(market.run(emit))
    await asyncio.sleep(0.1)
    task.cancel()
    assert len(received) > 1000


def test_bursts_multiply_the_rate_now_and_then() -> None:
    market = SimulatedMarket(rate=100, seed=9)
    rates = [market.current_rate(tick * 0.01) for tick in range(100_000)]  # 1000 s of ticks
    assert min(rates) == 100
    assert 300 <= max(rates) <= 800
    bursting = sum(rate > 100 for rate in rates) / len(rates)
    assert 0.01 < bursting < 0.2
    assert {SimulatedMarket(rate=100, seed=9, bursts=False).current_rate(t) for t in range(100)} == {100.0}


@pytest.mark.parametrize("bad", [{"rate": 0}, {"speed": 0}, {"speed": "fast"}, {"symbols": []}])
def test_bad_arguments_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatedMarket(**bad)
