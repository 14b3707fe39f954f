"""The spill file: exact round trip, order, a cut last line, segments, one process per directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptotui.stages.ingest.producer import LatencyHistogram, SpillLocked, SpillStore

RECORDS = [
    ("t.trade", "BTCUSDT", '{"e":"trade","p":"90000.12000000","recv_ns":1}', 1700000000000),
    ("t.dlq", None, '{"raw":"line1\\nline2 \\u00e9 \\t","reason":"not_json"}', 1700000000001),
    ("t.book", "ETHUSDT", '{"u":1,"s":"ETHUSDT","x":"ünï\\"cödé\\n"}', 1700000000002),
]


def read_all(store: SpillStore) -> list[tuple[str, str | None, str, int]]:
    out = []
    while (chunk := store.read_records(2)) is not None:
        out.extend(tuple(record) for record in chunk[1])
    return out


def test_round_trip_is_exact_and_in_order(tmp_path: Path) -> None:
    store = SpillStore(tmp_path)
    for record in RECORDS:
        store.append(*record)
    assert store.pending == 3
    assert read_all(store) == RECORDS
    assert store.pending == 0 and store.caught_up()
    store.close()


def test_a_spill_left_behind_is_found_at_start(tmp_path: Path) -> None:
    first = SpillStore(tmp_path)
    for record in RECORDS:
        first.append(*record)
    first.close()
    second = SpillStore(tmp_path)
    assert second.recovered == 3 and second.pending == 3
    second.append("t.trade", "BNBUSDT", "{}", 5)  # a new segment, after the old one
    assert read_all(second) == [*RECORDS, ("t.trade", "BNBUSDT", "{}", 5)]
    second.close()


def test_a_cut_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    store = SpillStore(tmp_path)
    store.append(*RECORDS[0])
    store.close()
    segment = next(tmp_path.glob("ingest-*.spill"))
    with segment.open("a") as handle:
        handle.write('["t.trade","BTCUSDT","{\\"e\\":')  # the process died mid-write
    store = SpillStore(tmp_path)
    assert read_all(store) == [RECORDS[0]]
    assert store.corrupt == 1
    store.close()


def test_finished_segments_are_reported_for_deletion(tmp_path: Path) -> None:
    store = SpillStore(tmp_path)
    store.append(*RECORDS[0])
    store.close_writer()
    store.append(*RECORDS[1])
    assert read_all(store) == RECORDS[:2]
    assert len(store.segments_done) == 1  # the closed one; the one being written stays open
    store.finish_reading_writer_segment()
    assert len(store.segments_done) == 2
    for seq in store.segments_done:
        store.delete(seq)
    assert list(tmp_path.glob("ingest-*.spill")) == []
    store.close()


def test_two_processes_cannot_share_a_spill_directory(tmp_path: Path) -> None:
    store = SpillStore(tmp_path)
    with pytest.raises(SpillLocked):
        SpillStore(tmp_path)
    store.close()
    SpillStore(tmp_path).close()


def test_latency_histogram_quantiles() -> None:
    histogram = LatencyHistogram()
    for ms in [1.0] * 50 + [10.0] * 49 + [200.0]:
        histogram.add(ms)
    assert histogram.quantile(0.5) == pytest.approx(1.0, rel=0.07)
    assert histogram.quantile(0.99) == pytest.approx(10.0, rel=0.07)
    assert histogram.quantile(1.0) == pytest.approx(200.0, rel=0.07)
    assert histogram.max_ms == 200.0
    assert LatencyHistogram.quantile_of({}, 0.5) is None
