"""The recording format: JSON lines of combined-stream messages, each optionally preceded by a receive time.

    1767225600123456789 {"stream":"btcusdt@trade","data":{"e":"trade",...}}
    {"stream":"btcusdt@bookTicker","data":{"u":...}}

The receive time is in nanoseconds since the epoch. Files ending in `.gz` are gzip-compressed.
`RecordingSource` replays such a file through the feed server, at the recorded pace or faster.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptotui.feed.source import (
    AggTradeRecord,
    Emit,
    Event,
    FeedSource,
    MarketHistory,
    TradeRecord,
    parse_speed,
    stream_kind,
)

__all__ = ["RecordedMessage", "RecordingSource", "RecordingWriter", "parse_line", "read_recording"]

_PREFIX = '{"stream":"'
_DATA_KEY = '","data":'
_EVENT_TIME_RE = re.compile(r'"[ET]":\s*(\d{10,16})')
#: Batch size at speed `max`.
MAX_SPEED_BATCH = 1000
#: When pacing, messages due within this many seconds go out together instead of sleeping for each.
PACE_GRANULARITY_S = 0.002


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One recorded message: `text` is the combined-stream JSON, `payload` its data object's JSON."""

    received_ns: int | None
    stream: str
    payload: str
    text: str

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.payload)

    def event_time_ns(self) -> int | None:
        """The data's event (E) or trade (T) time in ns, when it has one (bookTicker has none)."""
        match = _EVENT_TIME_RE.search(self.payload)
        return int(match.group(1)) * 1_000_000 if match else None


def parse_line(line: str) -> RecordedMessage | None:
    """One line of a recording, or None for a blank line. Raises ValueError when it is not one."""
    line = line.strip()
    if not line:
        return None
    received_ns: int | None = None
    if line[0].isdigit():
        stamp, _, line = line.partition(" ")
        received_ns = int(stamp)
        line = line.lstrip()
    stream_payload = _split_compact(line)
    if stream_payload is None:
        stream_payload = _split_any(line)
    stream, payload = stream_payload
    return RecordedMessage(received_ns, stream, payload, line)


def _split_compact(text: str) -> tuple[str, str] | None:
    """Fast path for `{"stream":"x","data":{...}}` exactly as Binance writes it: no JSON parsing."""
    if not (text.startswith(_PREFIX) and text.endswith("}")):
        return None
    end = text.find('"', len(_PREFIX))
    if end < 0 or not text.startswith(_DATA_KEY, end):
        return None
    payload = text[end + len(_DATA_KEY) : -1]
    if not payload.startswith("{"):
        return None
    return text[len(_PREFIX) : end], payload


def _split_any(text: str) -> tuple[str, str]:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("stream"), str) or "data" not in message:
        raise ValueError('not a combined-stream message {"stream":...,"data":...}')
    return message["stream"], json.dumps(message["data"], separators=(",", ":"))


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8", compresslevel=6)  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def read_recording(path: str | Path, *, strict: bool = False) -> Iterator[RecordedMessage]:
    """Messages of a recording in file order. Bad lines are skipped unless `strict` (ValueError).

    A gzip file cut short (a recorder killed mid-write) ends the iteration instead of failing.
    """
    path = Path(path)
    with _open_text(path, "r") as handle:
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                try:
                    message = parse_line(line)
                except ValueError as exc:
                    if strict:
                        raise ValueError(f"{path}:{number}: {exc}") from None
                    continue
                if message is not None:
                    yield message
        except (EOFError, zlib.error, gzip.BadGzipFile):
            if strict:
                raise
            return


class RecordingWriter:
    """Writes a recording: `write(message, received_ns)` per message; a context manager.

    With `timestamps` (the default) every line starts with the receive time, `time.time_ns()` unless
    given. Messages are the combined-stream JSON text (written as is) or a mapping (serialized).
    """

    def __init__(self, path: str | Path, *, timestamps: bool = True) -> None:
        self.path = Path(path)
        self.timestamps = timestamps
        self.count = 0
        self._handle: IO[str] | None = _open_text(self.path, "w")

    def write(self, message: str | Mapping[str, Any], received_ns: int | None = None) -> None:
        if self._handle is None:
            raise ValueError("recording is closed")
        text = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
        if "\n" in text:
            # A pretty-printed message would break the one-message-per-line format.
            text = json.dumps(json.loads(text), separators=(",", ":"))
        if self.timestamps:
            stamp = time.time_ns() if received_ns is None else received_ns
            self._handle.write(f"{stamp} {text}\n")
        else:
            self._handle.write(text + "\n")
        self.count += 1

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RecordingSource(FeedSource):
    """Replays a recording: `speed` 1 keeps the recorded pace, N is N times faster, "max" unpaced.

    The pace comes from the receive times, or from the data's E/T when a line has none. Every trade
    and aggTrade replayed goes into `history` so the REST endpoints can backfill them. The replay runs
    once; `finished` is set at the end.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float | str = 1.0,
        history_size: int = 200_000,
        symbols: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"recording not found: {self.path}")
        self.speed = parse_speed(speed)
        self.history = MarketHistory(history_size)
        self._symbols = [symbol.upper() for symbol in symbols]
        self.messages = 0
        self.finished = asyncio.Event()

    @property
    def symbols(self) -> Sequence[str]:
        return sorted(set(self._symbols) | self.history.symbols())

    @property
    def paced(self) -> bool:
        return self.speed != float("inf")

    async def run(self, emit: Emit) -> None:
        try:
            if self.paced:
                await self._run_paced(emit)
            else:
                await self._run_unpaced(emit)
        finally:
            self.finished.set()

    async def _run_unpaced(self, emit: Emit) -> None:
        batch: list[Event] = []
        for message in read_recording(self.path):
            batch.append(self._event(message))
            if len(batch) >= MAX_SPEED_BATCH:
                await emit(batch)
                batch = []
                await asyncio.sleep(0)
        if batch:
            await emit(batch)

    async def _run_paced(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        start_loop = loop.time()
        first_ns: int | None = None
        last_ns: int | None = None
        batch: list[Event] = []
        for message in read_recording(self.path):
            stamp = message.received_ns if message.received_ns is not None else message.event_time_ns()
            stamp = stamp if stamp is not None else last_ns
            if stamp is not None:
                last_ns = stamp
                if first_ns is None:
                    first_ns = stamp
                due = start_loop + (stamp - first_ns) / 1e9 / self.speed
                wait = due - loop.time()
                if wait > PACE_GRANULARITY_S:
                    if batch:
                        await emit(batch)
                        batch = []
                    await asyncio.sleep(wait)
            batch.append(self._event(message))
            if len(batch) >= MAX_SPEED_BATCH:
                await emit(batch)
                batch = []
        if batch:
            await emit(batch)

    def _event(self, message: RecordedMessage) -> Event:
        self.messages += 1
        kind = stream_kind(message.stream)
        if kind == "trade" or kind == "aggTrade":
            self._remember(kind, message)
        return Event(message.stream, message.payload, message.text)

    def _remember(self, kind: str, message: RecordedMessage) -> None:
        """Record a replayed trade for the REST endpoints; data that is not a valid trade is not kept."""
        try:
            data = message.data
            symbol = str(data["s"])
            if kind == "trade":
                self.history.add_trade(
                    symbol, TradeRecord(int(data["t"]), data["p"], data["q"], int(data["T"]), bool(data["m"]))
                )
            else:
                first, last = int(data["f"]), int(data["l"])
                self.history.add_agg_trade(
                    symbol,
                    AggTradeRecord(int(data["a"]), data["p"], data["q"], first, last, int(data["T"]), bool(data["m"])),
                )
        except (ValueError, KeyError, TypeError):
            return
