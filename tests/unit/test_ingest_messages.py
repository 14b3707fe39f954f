"""The ingest stage's message handling without network: exact values, keys, topics, DLQ, duplicates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cryptotui.config import load_settings
from cryptotui.stages.ingest.producer import LatencyHistogram
from cryptotui.stages.ingest.stage import IngestStage

TRADE = ('{"e":"trade","E":1700000000001,"s":"BTCUSDT","t":5300000001,"p":"90000.12000000","q":"0.00200000",'
         '"T":1700000000000,"m":true,"M":true}')
AGG = ('{"e":"aggTrade","E":1700000000001,"s":"ETHUSDT","a":7,"p":"3000.10000000","q":"1.00000000","f":1,"l":2,'
       '"T":1700000000000,"m":false,"M":true}')
BOOK = '{"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000","a":"25.36520000","A":"40.66000000"}'
RECV = 1_700_000_000_123_456_789


class FakeOut:
    last_error = None

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str | None, int]] = []
        self.latency = LatencyHistogram()

    def stats(self) -> dict[str, Any]:
        return {}

    def send(self, topic: str, value: str, key: str | None, ts_ms: int) -> None:
        self.sent.append((topic, value, key, ts_ms))

    def poll(self) -> None:
        pass


class FakeConn:
    name = "ws-test"

    def __init__(self) -> None:
        self.server_shutdown = False
        self.attention = asyncio.Event()


@pytest.fixture
def stage(tmp_path: Path) -> IngestStage:
    settings = load_settings(data_dir=tmp_path, symbols=["BTCUSDT", "ETHUSDT", "BNBUSDT"], topic_trade="tr",
                             topic_aggtrade="ag", topic_bookticker="bk", topic_dlq="dlq")
    stage = IngestStage(settings)
    stage.out = FakeOut()  # type: ignore[assignment]
    return stage


def feed(stage: IngestStage, *texts: str, conn: FakeConn | None = None) -> list[tuple[str, Any, str | None, int]]:
    out: FakeOut = stage.out  # type: ignore[assignment]
    start = len(out.sent)
    stage._on_messages(conn or FakeConn(), list(texts), RECV)  # type: ignore[arg-type]
    return [(topic, json.loads(value), key, ts) for topic, value, key, ts in out.sent[start:]]


def combined(stream: str, data: str) -> str:
    return f'{{"stream":"{stream}","data":{data}}}'


def test_each_stream_type_goes_to_its_topic_keyed_by_symbol_with_the_exact_text(stage: IngestStage) -> None:
    feed(stage, combined("btcusdt@trade", TRADE), combined("ethusdt@aggTrade", AGG),
         combined("bnbusdt@bookTicker", BOOK))
    sent = stage.out.sent  # type: ignore[union-attr]
    assert [(topic, key, ts) for topic, _, key, ts in sent] == [
        ("tr", "BTCUSDT", 1700000000123), ("ag", "ETHUSDT", 1700000000123), ("bk", "BNBUSDT", 1700000000123)]
    # The original text of `data`, byte for byte, with the receive time added.
    assert [value for _, value, _, _ in sent] == [
        TRADE[:-1] + f',"recv_ns":{RECV}}}', AGG[:-1] + f',"recv_ns":{RECV}}}', BOOK[:-1] + f',"recv_ns":{RECV}}}']


def test_other_layouts_keep_the_exact_data_text(stage: IngestStage) -> None:
    spaced = (' {"data" :  {"u":1, "s":"BNBUSDT","b":"1.0","B":"2","a":"1.10","A":"3"} ,'
              ' "stream": "bnbusdt@bookTicker"}\n')
    [(topic, value, key, _)] = feed(stage, spaced)
    assert (topic, key) == ("bk", "BNBUSDT")
    assert stage.out.sent[-1][1] == f'{{"u":1, "s":"BNBUSDT","b":"1.0","B":"2","a":"1.10","A":"3","recv_ns":{RECV}}}'
    assert value["b"] == "1.0"


def test_a_bare_event_is_taken_when_its_stream_is_subscribed(stage: IngestStage) -> None:
    [(topic, value, key, _)] = feed(stage, TRADE)
    assert (topic, key, value["t"], value["recv_ns"]) == ("tr", "BTCUSDT", 5300000001, RECV)


def test_a_recv_ns_already_present_is_replaced_not_duplicated(stage: IngestStage) -> None:
    data = TRADE[:-1] + ',"recv_ns":5}'
    feed(stage, combined("btcusdt@trade", data))
    value = stage.out.sent[-1][1]  # type: ignore[union-attr]
    assert value.count("recv_ns") == 1 and json.loads(value)["recv_ns"] == RECV


@pytest.mark.parametrize(
    ("text", "reason", "key"),
    [
        ('{"stream":"btcusdt@trade","data":{"e":"trade"', "not_json", None),
        ("hello", "not_json", None),
        ("[1,2,3]", "not_object: a JSON array", None),
        (combined("btcusdt@kline_1m", '{"s":"BTCUSDT"}'), "unknown_stream: 'btcusdt@kline_1m'", "BTCUSDT"),
        (combined("solusdt@trade", TRADE.replace("BTCUSDT", "SOLUSDT")), "unknown_stream: 'solusdt@trade'", "SOLUSDT"),
        (combined("btcusdt@trade", "[1]"), "not_object: data is not an object", "BTCUSDT"),
        (combined("btcusdt@trade", TRADE.replace('"t":5300000001,', "")), "missing_field: t", "BTCUSDT"),
        (combined("btcusdt@trade", TRADE.replace('"p":"90000.12000000"', '"p":90000.12')),
         "wrong_type: p is number, expected a decimal string", "BTCUSDT"),
        (combined("btcusdt@trade", TRADE.replace('"p":"90000.12000000"', '"p":"-1"')), "not_positive: p='-1'",
         "BTCUSDT"),
        (combined("bnbusdt@bookTicker", BOOK.replace('"a":"25.36520000"', '"a":"25.30000000"')),
         "crossed_book: bid 25.35190000 >= ask 25.30000000", "BNBUSDT"),
        (combined("btcusdt@trade", TRADE.replace('"s":"BTCUSDT"', '"s":"ETHUSDT"')),
         "symbol_mismatch: s='ETHUSDT' on a BTCUSDT stream", "BTCUSDT"),
        ('{"x":1}', "unexpected_message: neither a stream message nor a reply", None),
    ],
)
def test_bad_messages_go_to_the_dlq_with_their_reason(stage: IngestStage, text: str, reason: str,
                                                      key: str | None) -> None:
    good = combined("btcusdt@trade", TRADE)
    sent = feed(stage, text, good)
    assert len(sent) == 2, "the good message after the bad one must still flow"
    (topic, value, dlq_key, _), (good_topic, _, _, _) = sent
    assert (topic, good_topic) == ("dlq", "tr")
    assert value == {"raw": text, "reason": reason, "source": "ingest", "recv_ns": RECV, "topic": None,
                     "partition": None, "offset": None}
    assert dlq_key == key
    assert stage.dlq == 1 and stage.dlq_reasons[reason.partition(":")[0]] == 1


def test_invalid_utf8_goes_to_the_dlq(stage: IngestStage) -> None:
    stage._on_invalid(FakeConn(), b'{"a":"\xff"}', RECV)  # type: ignore[arg-type]
    topic, value, _, _ = stage.out.sent[-1]  # type: ignore[union-attr]
    assert topic == "dlq" and json.loads(value)["reason"] == "not_utf8"


def test_duplicates_are_dropped_by_id(stage: IngestStage) -> None:
    messages = [combined("btcusdt@trade", TRADE), combined("ethusdt@aggTrade", AGG),
                combined("bnbusdt@bookTicker", BOOK)]
    assert len(feed(stage, *messages)) == 3
    assert feed(stage, *messages) == []
    assert stage.duplicates == 3


def test_server_shutdown_asks_for_a_new_connection_and_is_not_dlqd(stage: IngestStage) -> None:
    for text in ('{"e":"serverShutdown","E":1700000000000}',
                 '{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1700000000000}}'):
        conn = FakeConn()
        assert feed(stage, text, conn=conn) == []
        assert conn.server_shutdown and conn.attention.is_set()
    assert stage.server_shutdowns == 2 and stage.dlq == 0


def test_control_replies_and_server_errors_are_not_market_data(stage: IngestStage) -> None:
    assert feed(stage, '{"result":null,"id":1}', '{"code":2,"msg":"Invalid request"}',
                '{"error":{"code":2,"msg":"x"},"id":3}') == []
    assert stage.dlq == 0 and stage.server_errors == 2


def test_status_counts_per_stream(stage: IngestStage) -> None:
    feed(stage, combined("btcusdt@trade", TRADE), "junk")
    status = stage.status()
    assert status["streams"]["btcusdt@trade"]["messages"] == 1
    assert status["received"] == 2 and status["messages"] == 1 and status["dlq"] == 1
    assert set(status["streams"]) == {f"{s}@{k}" for s in ("btcusdt", "ethusdt", "bnbusdt")
                                      for k in ("trade", "aggTrade", "bookTicker")}


def test_oversized_messages_go_to_the_dlq_cut(stage: IngestStage) -> None:
    huge = combined("btcusdt@trade", TRADE[:-1] + ',"x":"' + "y" * 600_000 + '"}')
    [(topic, value, _, _), (good_topic, _, _, _)] = feed(stage, huge, combined("btcusdt@trade", TRADE))
    assert (topic, good_topic) == ("dlq", "tr")
    assert value["reason"].startswith("too_large: ") and "raw text cut" in value["reason"]
    assert len(value["raw"]) == 256 * 1024


def test_a_bug_on_one_message_does_not_stop_the_others(stage: IngestStage) -> None:
    info = stage.streams["btcusdt@trade"]

    def broken(data: dict[str, Any], symbol: str) -> int:
        raise RuntimeError("boom")

    info.check = broken
    sent = feed(stage, combined("btcusdt@trade", TRADE), combined("ethusdt@aggTrade", AGG))
    assert [topic for topic, _, _, _ in sent] == ["dlq", "ag"]
    assert sent[0][1]["reason"] == "internal_error: RuntimeError: boom"
    assert stage.internal_errors == 1
