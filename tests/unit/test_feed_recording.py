"""The recording format: writing, reading (plain, gzip, with and without receive times) and replaying."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cryptotui.feed.recording import RecordingSource, RecordingWriter, parse_line, read_recording
from cryptotui.feed.source import Event

T0_MS = 1_767_225_600_000


def trade(trade_id: int, ms: int, symbol: str = "BTCUSDT") -> dict:
    data = {"e": "trade", "E": ms, "s": symbol, "t": trade_id, "p": "90000.01000000", "q": "0.00100000", "T": ms,
            "m": False, "M": True}  # fmt: skip
    return {"stream": f"{symbol.lower()}@trade", "data": data}


def book(update_id: int, symbol: str = "BTCUSDT") -> dict:
    data = {"u": update_id, "s": symbol, "b": "90000.00000000", "B": "1.00000000", "a": "90000.01000000",
            "A": "2.00000000"}  # fmt: skip
    return {"stream": f"{symbol.lower()}@bookTicker", "data": data}


def messages(count: int = 10, spacing_ms: int = 100) -> list[dict]:
    out: list[dict] = []
    for index in range(count):
        out.append(trade(1000 + index, T0_MS + index * spacing_ms))
        out.append(book(5000 + index))
    return out


def write(path: Path, items: list[dict], timestamps: bool, spacing_ns: int = 50_000_000) -> None:
    with RecordingWriter(path, timestamps=timestamps) as writer:
        for index, message in enumerate(items):
            writer.write(message, received_ns=T0_MS * 1_000_000 + index * spacing_ns)


@pytest.mark.parametrize("name", ["rec.jsonl", "rec.jsonl.gz"])
@pytest.mark.parametrize("timestamps", [True, False])
def test_written_recordings_read_back_identical(tmp_path: Path, name: str, timestamps: bool) -> None:
    path = tmp_path / name
    items = messages()
    write(path, items, timestamps)
    read = list(read_recording(path))
    assert [json.loads(message.text) for message in read] == items
    assert [message.stream for message in read] == [item["stream"] for item in items]
    assert [message.data for message in read] == [item["data"] for item in items]
    if timestamps:
        assert read[1].received_ns == T0_MS * 1_000_000 + 50_000_000
    else:
        assert all(message.received_ns is None for message in read)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip


def test_lines_are_the_documented_format(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    with RecordingWriter(path) as writer:
        writer.write('{"stream":"btcusdt@trade","data":{"t":1}}', received_ns=123)
        writer.write({"stream": "btcusdt@trade", "data": {"t": 2}}, received_ns=124)
    assert path.read_text() == (
        '123 {"stream":"btcusdt@trade","data":{"t":1}}\n124 {"stream":"btcusdt@trade","data":{"t":2}}\n'
    )


def test_parse_line_accepts_spaced_json_and_rejects_garbage() -> None:
    message = parse_line('17 { "stream": "btcusdt@trade", "data": {"t": 5} }\n')
    assert message is not None
    assert (message.received_ns, message.stream, message.data) == (17, "btcusdt@trade", {"t": 5})
    assert parse_line("   \n") is None
    for bad in ("not json", '{"data":{}}', "12 [1,2]"):
        with pytest.raises(ValueError):
            parse_line(bad)


def test_bad_lines_and_cut_gzip_files_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text('{"stream":"a@trade","data":{}}\ngarbage\n{"stream":"b@trade","data":{}}\n')
    assert [message.stream for message in read_recording(path)] == ["a@trade", "b@trade"]
    with pytest.raises(ValueError, match=":2:"):
        list(read_recording(path, strict=True))
    cut = tmp_path / "cut.jsonl.gz"
    write(cut, messages(200), timestamps=True)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert 0 < len(list(read_recording(cut))) < 400


async def replay(path: Path, speed: float | str) -> tuple[list[Event], float, RecordingSource]:
    source = RecordingSource(path, speed=speed)
    received: list[Event] = []

    async def emit(batch: list[Event]) -> None:
        received.extend(batch)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(source.run(emit), 10)
    return received, loop.time() - started, source


async def test_replay_at_max_speed_emits_everything_and_fills_the_history(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl.gz"
    items = messages(1500)
    write(path, items, timestamps=True, spacing_ns=1_000_000_000)  # 50 minutes of recording
    received, elapsed, source = await replay(path, "max")
    assert elapsed < 5
    assert [json.loads(event.combined) for event in received] == items
    assert [json.loads(event.payload) for event in received] == [item["data"] for item in items]
    assert source.history.trade_ids("BTCUSDT") == list(range(1000, 2500))
    assert source.symbols == ["BTCUSDT"]
    assert source.finished.is_set()


@pytest.mark.parametrize("timestamps", [True, False])
async def test_replay_keeps_the_recorded_pace_scaled_by_speed(tmp_path: Path, timestamps: bool) -> None:
    # 1 s of recording either way: receive times 50 ms apart, or trade times 100 ms apart.
    path = tmp_path / "rec.jsonl"
    write(path, messages(11), timestamps=timestamps)
    received, elapsed, _ = await replay(path, 4)
    assert len(received) == 22
    assert 0.2 <= elapsed < 0.6


def test_missing_recording_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RecordingSource(tmp_path / "nope.jsonl")
