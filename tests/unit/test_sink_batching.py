"""The sink's batching, without services: batch sizes, due batches, backlog takes, order on retry."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition

from cryptotui.config import load_settings
from cryptotui.stages import sink
from cryptotui.stages.sink import SinkStage


@dataclass
class Record:
    offset: int
    value: bytes | None


def trade(trade_id: int) -> bytes:
    return json.dumps({"e": "trade", "E": 1, "s": "BTCUSDT", "t": trade_id, "p": "1.0", "q": "2.0", "T": 1,
                       "m": True, "M": True, "recv_ns": 1_700_000_000_000_000_000}).encode()


@pytest.fixture
def stage() -> SinkStage:
    stage = SinkStage(load_settings(sink_batch_size=3, sink_batch_timeout_s=2.0))
    stage._ready |= {TopicPartition(stage.settings.topic_trade, p) for p in range(3)}
    return stage


def test_messages_split_into_batches_of_the_configured_size(stage: SinkStage) -> None:
    tp = TopicPartition(stage.settings.topic_trade, 0)
    stage._add(tp, [Record(offset, trade(offset)) for offset in range(7)])
    batches = stage._buffers["trades"]
    assert [batch.count for batch in batches] == [3, 3, 1]
    assert [batch.offsets[tp] for batch in batches] == [3, 6, 7]
    assert stage.counters["messages"]["trades"] == 7


def test_unmappable_messages_are_dead_letters_that_still_advance_the_offset(stage: SinkStage) -> None:
    tp = TopicPartition(stage.settings.topic_trade, 1)
    stage._add(tp, [Record(10, trade(1)), Record(11, b"not json"), Record(12, None)])
    batch = stage._buffers["trades"][0]
    assert len(batch.rows) == 1 and batch.count == 3
    assert [(dead.offset, dead.reason[:12]) for dead in batch.dead] == [(11, "value is not"), (12, "empty messag")]
    assert batch.offsets[tp] == 13


def test_records_of_a_partition_not_yet_positioned_are_ignored(stage: SinkStage) -> None:
    tp = TopicPartition(stage.settings.topic_trade, 0)
    stage._ready.clear()
    stage._add(tp, [Record(0, trade(0))])
    assert stage._buffers["trades"] == []


def test_a_write_is_due_when_a_batch_is_full_or_old(stage: SinkStage) -> None:
    tp = TopicPartition(stage.settings.topic_trade, 0)
    now = time.monotonic()
    assert not stage._flush_due(now)
    stage._add(tp, [Record(0, trade(0))])
    assert not stage._flush_due(now)
    assert stage._flush_due(time.monotonic() + 2.0)  # the partial batch reached the timeout
    stage._add(tp, [Record(1, trade(1)), Record(2, trade(2))])
    assert stage._flush_due(time.monotonic())  # full


def test_a_write_takes_every_table_and_at_most_the_backlog_limit(stage: SinkStage, monkeypatch) -> None:
    monkeypatch.setattr(sink, "BACKLOG_BATCHES", 2)
    tp = TopicPartition(stage.settings.topic_trade, 0)
    stage._add(tp, [Record(offset, trade(offset)) for offset in range(10)])  # 4 batches
    book = TopicPartition(stage.settings.topic_bookticker, 0)
    stage._ready.add(book)
    stage._add(book, [Record(0, json.dumps({"u": 1, "s": "BTCUSDT", "b": "1", "B": "1", "a": "2", "A": "1",
                                            "recv_ns": 1}).encode())])
    taken = stage._take(limit=sink.BACKLOG_BATCHES)
    assert [batch.offsets[tp] for batch in taken["trades"]] == [3, 6]
    assert len(taken["book_ticker"]) == 1  # a partial batch rides along
    assert [batch.offsets[tp] for batch in stage._buffers["trades"]] == [9, 10]
    stage._put_back(taken)  # a failed write: the same batches again, first, in order
    assert [batch.offsets[tp] for batch in stage._buffers["trades"]] == [3, 6, 9, 10]
    assert stage._take(limit=None)["trades"][-1].offsets[tp] == 10
