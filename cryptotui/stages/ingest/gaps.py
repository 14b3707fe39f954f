"""Message ids per (stream type, symbol): duplicates dropped, gaps found, counted and handed to backfill.

Trade ids (`t`) and aggregate trade ids (`a`) are consecutive per symbol, so a jump is a gap. While two
connections overlap (a rotation) ids may arrive out of order: a gap first waits `grace_s` for late
arrivals (`GapBook.due`), and only what is still missing then is a real gap (logged, counted, backfilled).
bookTicker update ids (`u`) are increasing but not consecutive, so they are only de-duplicated, against
the last `RECENT_IDS` ids accepted.

After a restart `IdSequence.resume(last)` continues from the newest id an earlier run produced (read back
from Kafka by `resume`): the first id then reveals what was missed while the stage was down, as a gap
marked `after_restart`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["RECENT_IDS", "RESET_SPAN", "Gap", "GapBook", "IdSequence", "RecentIds"]

log = logging.getLogger("cryptotui.stages.ingest")

#: bookTicker update ids remembered per symbol to recognise duplicates.
RECENT_IDS = 4096
#: An id this far below the last one on a single connection means the source restarted its sequence
#: (a restarted simulator, a replayed recording): the tracker starts over instead of dropping everything.
RESET_SPAN = 10_000
#: Gaps logged one by one per check; more are summed up in one line.
LOG_GAPS = 10
_UNSET = -(1 << 62)


@dataclass(eq=False)
class Gap:
    """Ids `first`..`last` of one symbol's trade or aggTrade stream that did not arrive in order."""

    kind: str
    symbol: str
    first: int
    last: int
    detected: float = field(default_factory=time.monotonic)
    confirmed: bool = False
    late: int = 0  # ids that arrived on a WebSocket after all (rotation overlap, reordering)
    backfilled: int = 0
    unfilled: int = 0  # given up: backfill off, REST had nothing, too large, shutdown
    after_restart: bool = False  # found on the first id after `IdSequence.resume`: missed while the stage was down

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def remaining(self) -> int:
        return self.size - self.late - self.backfilled - self.unfilled

    def describe(self) -> str:
        since = " while the stage was down" if self.after_restart else ""
        return f"{self.symbol} {self.kind} ids {self.first}..{self.last} ({self.size} missing{since})"


class GapBook:
    """All gaps of the stage and their totals (the status counters)."""

    def __init__(self, grace_s: float = 2.5) -> None:
        self.grace_s = grace_s
        self.pending: list[Gap] = []  # found, waiting for their grace period
        self.open: list[Gap] = []  # confirmed and not settled yet (backfill in progress)
        self.gaps = 0
        self.gap_ids = 0
        self.backfilled_ids = 0
        self.unfilled_ids = 0
        self.late_ids = 0
        self.restart_gaps = 0  # of `gaps`, found on the first id after a restart
        self.restart_gap_ids = 0

    def found(self, gap: Gap) -> None:
        self.pending.append(gap)

    def due(self, now: float | None = None) -> list[Gap]:
        """Gaps whose grace period is over and that still miss ids: counted, logged and returned."""
        now = time.monotonic() if now is None else now
        ready = [gap for gap in self.pending if now - gap.detected >= self.grace_s]
        if not ready:
            return []
        self.pending = [gap for gap in self.pending if now - gap.detected < self.grace_s]
        confirmed = []
        for gap in ready:
            if gap.remaining <= 0:
                continue  # everything arrived late: reordering, not a gap
            gap.confirmed = True
            self.gaps += 1
            self.gap_ids += gap.remaining
            if gap.after_restart:
                self.restart_gaps += 1
                self.restart_gap_ids += gap.remaining
            self.open.append(gap)
            confirmed.append(gap)
        for gap in confirmed[:LOG_GAPS]:
            log.warning("gap: %s", gap.describe())
        if len(confirmed) > LOG_GAPS:
            log.warning("... and %d more gaps (%d ids)", len(confirmed) - LOG_GAPS,
                        sum(gap.size for gap in confirmed[LOG_GAPS:]))
        return confirmed

    def settle(self) -> None:
        """Forget confirmed gaps that have nothing missing any more."""
        if self.open:
            self.open = [gap for gap in self.open if gap.remaining > 0]

    @property
    def pending_ids(self) -> int:
        """Confirmed missing ids still waiting for backfill."""
        return sum(gap.remaining for gap in self.open if gap.confirmed)


class _Range:
    __slots__ = ("gap", "hi", "lo")

    def __init__(self, lo: int, hi: int, gap: Gap) -> None:
        self.lo = lo
        self.hi = hi
        self.gap = gap


class IdSequence:
    """Consecutive ids of one (trade|aggTrade, symbol): `accept(id)` says whether to produce the message."""

    __slots__ = ("book", "kind", "last", "missing", "resumed", "symbol")

    def __init__(self, kind: str, symbol: str, book: GapBook) -> None:
        self.kind = kind
        self.symbol = symbol
        self.book = book
        self.last = _UNSET
        self.resumed = _UNSET  # the id `resume` started from
        self.missing: list[_Range] = []  # sorted, disjoint

    def resume(self, last_id: int) -> None:
        """Continue after `last_id`, the newest id an earlier run produced, before any id arrived: the first
        id above `last_id + 1` is a gap (`after_restart`), ids up to `last_id` are duplicates."""
        if self.last != _UNSET:
            raise RuntimeError(f"{self.symbol} {self.kind}: resume() after ids arrived")
        self.last = self.resumed = last_id

    def accept(self, i: int) -> bool:
        """True for a new id (produce it), False for a duplicate. Records gaps."""
        last = self.last
        if i == last + 1:
            self.last = i
            return True
        if last == _UNSET:
            self.last = i
            return True
        if i > last:
            # Still at the resumed id: nothing arrived since the restart, so this is what the restart missed.
            gap = Gap(self.kind, self.symbol, last + 1, i - 1, after_restart=last == self.resumed)
            self.missing.append(_Range(last + 1, i - 1, gap))
            self.book.found(gap)
            self.last = i
            return True
        return self._fill(i, backfill=False)

    def accept_backfill(self, i: int) -> bool:
        """True when a backfilled id is still missing (it fills its gap), False otherwise."""
        return self.last != _UNSET and i <= self.last and self._fill(i, backfill=True)

    def _fill(self, i: int, backfill: bool) -> bool:
        index = next((n for n, span in enumerate(self.missing) if span.lo <= i <= span.hi), -1)
        if index < 0:
            return False
        span = self.missing[index]
        gap = span.gap
        if backfill:
            gap.backfilled += 1
            self.book.backfilled_ids += 1
        else:
            gap.late += 1
            if gap.confirmed:
                self.book.late_ids += 1
        if span.lo == span.hi:
            del self.missing[index]
        elif i == span.lo:
            span.lo += 1
        elif i == span.hi:
            span.hi -= 1
        else:
            self.missing.insert(index + 1, _Range(i + 1, span.hi, gap))
            span.hi = i - 1
        return True

    def is_missing(self, i: int) -> bool:
        return any(span.lo <= i <= span.hi for span in self.missing)

    def missing_between(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The missing id ranges within lo..hi."""
        return [(max(lo, s.lo), min(hi, s.hi)) for s in self.missing if s.lo <= hi and s.hi >= lo]

    def give_up(self, lo: int, hi: int) -> int:
        """Stop waiting for ids lo..hi (counted as unfilled); returns how many were still missing."""
        dropped = 0
        kept: list[_Range] = []
        for span in self.missing:
            if span.hi < lo or span.lo > hi:
                kept.append(span)
                continue
            cut_lo, cut_hi = max(lo, span.lo), min(hi, span.hi)
            count = cut_hi - cut_lo + 1
            span.gap.unfilled += count
            if span.gap.confirmed:
                self.book.unfilled_ids += count
            dropped += count
            if span.lo < cut_lo:
                kept.append(_Range(span.lo, cut_lo - 1, span.gap))
            if cut_hi < span.hi:
                kept.append(_Range(cut_hi + 1, span.hi, span.gap))
        self.missing = kept
        return dropped

    def looks_restarted(self, i: int) -> bool:
        """An id far below the last one: the source started a new sequence."""
        return self.last != _UNSET and i < self.last - RESET_SPAN

    def reset(self, i: int) -> None:
        """Start over at id i (the source restarted); gaps still open are given up."""
        if self.missing:
            self.give_up(self.missing[0].lo, self.missing[-1].hi)
        log.warning("%s %s ids restarted at %d (last was %d)", self.symbol, self.kind, i, self.last)
        self.last = i
        self.resumed = _UNSET


class RecentIds:
    """Increasing, not consecutive ids (bookTicker `u`): duplicates are dropped, nothing else."""

    __slots__ = ("floor", "kind", "last", "order", "seen", "size", "symbol")

    def __init__(self, kind: str, symbol: str, size: int = RECENT_IDS) -> None:
        self.kind = kind
        self.symbol = symbol
        self.size = size
        self.last = _UNSET
        self.floor = _UNSET  # ids at or below this are older than everything remembered
        self.seen: set[int] = set()
        self.order: deque[int] = deque()

    def accept(self, u: int) -> bool:
        if u > self.last:
            self.last = u
        elif u <= self.floor or u in self.seen:
            return False
        self.seen.add(u)
        order = self.order
        order.append(u)
        if len(order) > self.size:
            old = order.popleft()
            self.seen.discard(old)
            if old > self.floor:
                self.floor = old
        return True

    def looks_restarted(self, u: int) -> bool:
        return self.last != _UNSET and u < self.last - RESET_SPAN

    def reset(self, u: int) -> None:
        log.warning("%s %s ids restarted at %d (last was %d)", self.symbol, self.kind, u, self.last)
        self.last = self.floor = _UNSET
        self.seen.clear()
        self.order.clear()
        self.accept(u)
