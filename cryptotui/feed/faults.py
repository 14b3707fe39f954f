"""Fault injection: what a client of the feed must survive, on a schedule or on demand.

`Faults` is the configuration. Per-message faults (ids kept off the WebSocket, malformed messages) are
applied by `MessageFaults` to each batch a source emits; timed faults (dropped connections, a stall, a
server shutdown) are scheduled by the server, which owns the connections.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cryptotui.feed.source import Event, stream_kind

__all__ = ["MALFORMED_KINDS", "Faults", "MessageFaults", "malform"]

#: Kinds of malformed messages, injected in turn (those that make sense for the stream).
MALFORMED_KINDS: tuple[str, ...] = (
    "not_json",  # truncated text
    "missing_field",  # a required field removed
    "wrong_type",  # a number where a string belongs or the reverse
    "bad_price",  # zero or negative price
    "unknown_stream",  # a stream (combined) or event type (raw) nobody subscribed to
    "crossed_book",  # bookTicker with bid >= ask
)

_TRADE_KINDS = MALFORMED_KINDS[:5]
_OTHER_KINDS = ("not_json", "unknown_stream")
_REQUIRED: dict[str, tuple[str, ...]] = {
    "trade": ("p", "t", "s", "q"),
    "aggTrade": ("p", "a", "f", "q"),
    "bookTicker": ("b", "u", "a", "s"),
}


@dataclass
class Faults:
    """Which faults to inject. Durations are seconds from server start; 0/None means off."""

    drop_every_s: float | None = None
    """Close every client connection this often."""
    drop_abrupt: bool = True
    """Drop connections like a network failure (TCP reset, no close frame) rather than with a close frame."""
    malformed_per_1000: int = 0
    """Replace this many of every 1000 messages with malformed ones of varied kinds."""
    skip_ids_every: int = 0
    """Keep every N-th trade (and aggTrade) of a symbol off the WebSocket; REST still has it."""
    stall_after_s: float | None = None
    """Stop sending data (connections stay open, pings go on) this long after start..."""
    stall_for_s: float = 5.0
    """...for this long."""
    shutdown_after_s: float | None = None
    """Send Binance's serverShutdown event this long after start, then close the connections."""
    shutdown_grace_s: float = 1.0
    """Time between the serverShutdown event and the close."""

    def __post_init__(self) -> None:
        if not 0 <= self.malformed_per_1000 <= 1000:
            raise ValueError("malformed_per_1000 must be within 0..1000")
        if self.skip_ids_every < 0 or self.skip_ids_every == 1:
            raise ValueError("skip_ids_every must be 0 (off) or >= 2")
        for name in ("drop_every_s", "stall_after_s", "shutdown_after_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.stall_for_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("stall_for_s must be > 0 and shutdown_grace_s >= 0")

    @property
    def alters_messages(self) -> bool:
        return self.malformed_per_1000 > 0 or self.skip_ids_every > 0


class MessageFaults:
    """Applies the per-message faults to batches, counting what it did."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.skipped = 0
        self.malformed = 0
        self.malformed_by_kind: Counter[str] = Counter()
        self._trade_counts: Counter[str] = Counter()
        self._seen = 0

    def apply(self, batch: list[Event]) -> list[Event]:
        every = self.faults.skip_ids_every
        per_1000 = self.faults.malformed_per_1000
        out: list[Event] = []
        for event in batch:
            if every and self._skip(event, every):
                continue
            seen = self._seen
            self._seen = seen + 1
            # Spread evenly: exactly per_1000 of every 1000 messages, never two bunched together.
            if per_1000 and (seen + 1) * per_1000 // 1000 > seen * per_1000 // 1000:
                event = self._malform(event)
            out.append(event)
        return out

    def _skip(self, event: Event, every: int) -> bool:
        if not event.stream.endswith(("@trade", "@aggTrade")):
            return False
        counts = self._trade_counts
        counts[event.stream] += 1
        if counts[event.stream] % every:
            return False
        self.skipped += 1
        return True

    def _malform(self, event: Event) -> Event:
        kinds = _kinds_for(stream_kind(event.stream))
        kind = kinds[self.malformed % len(kinds)]
        self.malformed += 1
        self.malformed_by_kind[kind] += 1
        return malform(event, kind, variant=self.malformed // len(kinds))


def _kinds_for(kind: str) -> tuple[str, ...]:
    if kind == "bookTicker":
        return MALFORMED_KINDS
    if kind in ("trade", "aggTrade"):
        return _TRADE_KINDS
    return _OTHER_KINDS


def malform(event: Event, kind: str, variant: int = 0) -> Event:
    """A broken copy of `event`; `variant` picks among the ways to break it (field, sign...)."""
    if kind == "not_json":
        # A message cut short, as a broken proxy or a bug might send.
        text = event.payload[: max(1, len(event.payload) // 2)]
        return Event(event.stream, text, text)
    try:
        data: dict[str, Any] = json.loads(event.payload)
    except json.JSONDecodeError:
        return event  # already broken (replayed from a recording)
    stream = event.stream
    if kind == "unknown_stream":
        symbol = stream.partition("@")[0]
        data["e"] = "bogusEvent"
        stream = f"{symbol}@bogusStream"
    elif kind == "missing_field":
        fields = _REQUIRED.get(stream_kind(event.stream), ("s",))
        data.pop(fields[variant % len(fields)], None)
    elif kind == "wrong_type":
        _mistype(data, variant)
    elif kind == "bad_price":
        field = "b" if "b" in data and "p" not in data else "p"
        data[field] = "0.00000000" if variant % 2 else "-" + str(data.get(field, "1.00000000")).lstrip("-")
    elif kind == "crossed_book" and "b" in data and "a" in data:
        data["b"], data["a"] = (data["a"], data["b"]) if variant % 2 else (data["a"], data["a"])
    payload = json.dumps(data, separators=(",", ":"))
    return Event(event.stream, payload, f'{{"stream":"{stream}","data":{payload}}}')


def _mistype(data: dict[str, Any], variant: int) -> None:
    """Put a JSON number where Binance sends a decimal string, or a string where it sends an integer."""
    price_field = "p" if "p" in data else "b"
    id_field = next((field for field in ("t", "a", "u") if field in data), None)
    if variant % 2 == 0 or id_field is None:
        try:
            data[price_field] = float(data[price_field])
        except (KeyError, TypeError, ValueError):
            data[price_field] = 0.5
    else:
        data[id_field] = str(data[id_field])
