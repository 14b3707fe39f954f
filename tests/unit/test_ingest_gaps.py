"""Gap tracking: duplicates dropped, gaps found after a grace period, filled late, backfilled or given up."""

from __future__ import annotations

import pytest

from cryptotui.stages.ingest.gaps import RESET_SPAN, GapBook, IdSequence, RecentIds


def sequence(grace_s: float = 1.0) -> tuple[IdSequence, GapBook]:
    book = GapBook(grace_s=grace_s)
    return IdSequence("trade", "BTCUSDT", book), book


def test_consecutive_ids_are_accepted_and_repeats_dropped() -> None:
    seq, book = sequence()
    assert [seq.accept(i) for i in (100, 101, 102)] == [True, True, True]
    assert [seq.accept(i) for i in (101, 102, 50)] == [False, False, False]
    assert book.pending == [] and seq.missing == []


def test_a_jump_is_a_gap_once_its_grace_period_is_over() -> None:
    seq, book = sequence(grace_s=1.0)
    seq.accept(10)
    seq.accept(15)  # 11..14 missing
    assert len(book.pending) == 1
    gap = book.pending[0]
    assert (gap.first, gap.last, gap.size) == (11, 14, 4)
    assert book.due(now=gap.detected + 0.5) == []
    assert book.due(now=gap.detected + 1.0) == [gap]
    assert (book.gaps, book.gap_ids, book.pending_ids) == (1, 4, 4)
    assert seq.missing_between(0, 100) == [(11, 14)]


def test_late_arrivals_within_the_grace_period_are_no_gap() -> None:
    """A rotation: the new connection is ahead, the old one delivers the ids in between a little later."""
    seq, book = sequence()
    seq.accept(10)
    seq.accept(14)
    assert [seq.accept(i) for i in (11, 12, 13)] == [True, True, True]
    assert seq.accept(12) is False  # now a duplicate
    assert book.due(now=book.pending[0].detected + 5) == []
    assert book.gaps == 0 and book.gap_ids == 0


def test_partly_filled_gaps_count_only_what_is_missing_and_split() -> None:
    seq, book = sequence()
    seq.accept(1)
    seq.accept(10)  # 2..9
    seq.accept(5)
    assert seq.missing_between(0, 20) == [(2, 4), (6, 9)]
    gap = book.pending[0]
    book.due(now=gap.detected + 10)
    assert book.gap_ids == 7


def test_backfill_fills_only_missing_ids() -> None:
    seq, book = sequence()
    seq.accept(1)
    seq.accept(6)  # 2..5
    book.due(now=book.pending[0].detected + 10)
    assert seq.accept_backfill(3) is True
    assert seq.accept_backfill(3) is False  # already filled
    assert seq.accept_backfill(6) is False  # never missing
    assert seq.accept_backfill(7) is False  # beyond what was seen
    for i in (2, 4, 5):
        assert seq.accept_backfill(i)
    assert book.backfilled_ids == 4 and book.pending_ids == 0
    book.settle()
    assert book.open == []


def test_giving_up_counts_the_ids_as_unfilled() -> None:
    seq, book = sequence()
    seq.accept(1)
    seq.accept(11)  # 2..10
    book.due(now=book.pending[0].detected + 10)
    seq.accept_backfill(2)
    assert seq.give_up(2, 5) == 3  # 3, 4, 5
    assert seq.missing_between(0, 100) == [(6, 10)]
    assert book.unfilled_ids == 3 and book.pending_ids == 5


def test_a_restarted_source_is_recognised() -> None:
    seq, _ = sequence()
    seq.accept(1_000_000)
    assert not seq.looks_restarted(1_000_000 - RESET_SPAN + 1)
    assert seq.looks_restarted(5)
    seq.reset(5)
    assert seq.accept(6) is True


def test_book_ticker_ids_are_deduplicated_not_gap_checked() -> None:
    ids = RecentIds("bookTicker", "BTCUSDT", size=4)
    assert [ids.accept(u) for u in (10, 15, 30)] == [True, True, True]
    assert ids.accept(15) is False
    assert ids.accept(20) is True  # older than the last but never seen: the other connection's
    assert ids.accept(20) is False
    assert [ids.accept(u) for u in (31, 32)] == [True, True]  # 10 and 15 are forgotten now
    assert ids.accept(12) is False  # below everything remembered: too old
    ids.reset(3)
    assert ids.accept(4) is True


def test_a_resumed_sequence_finds_what_the_restart_missed_on_its_first_id() -> None:
    seq, book = sequence(grace_s=1.0)
    seq.resume(1000)  # the newest id an earlier run got into Kafka
    assert seq.accept(1051) is True  # the first live id after the restart
    [gap] = book.pending
    assert (gap.first, gap.last, gap.size, gap.after_restart) == (1001, 1050, 50, True)
    assert "while the stage was down" in gap.describe()
    assert book.due(now=gap.detected + 1.0) == [gap]
    assert (book.gaps, book.gap_ids, book.restart_gaps, book.restart_gap_ids) == (1, 50, 1, 50)
    assert seq.missing_between(0, 10_000) == [(1001, 1050)]
    # A later jump is an ordinary gap.
    seq.accept(1060)
    assert book.pending[-1].after_restart is False
    book.due(now=book.pending[-1].detected + 1.0)
    assert (book.gaps, book.restart_gaps) == (2, 1)


def test_ids_up_to_the_resumed_one_are_duplicates_and_the_next_one_is_no_gap() -> None:
    seq, book = sequence()
    seq.resume(1000)
    assert [seq.accept(i) for i in (1000, 999, 990)] == [False, False, False]
    assert seq.accept(1001) is True
    assert book.pending == [] and seq.missing == []
    assert seq.accept(1001) is False
    seq.accept(1005)
    assert book.pending[-1].after_restart is False  # something arrived since the restart: an ordinary gap


def test_backfill_after_a_resume_fills_only_the_restart_gap() -> None:
    seq, book = sequence()
    seq.resume(1000)
    seq.accept(1004)
    book.due(now=book.pending[0].detected + 10)
    assert seq.accept_backfill(1000) is False  # in Kafka already
    assert [seq.accept_backfill(i) for i in (1001, 1002, 1003)] == [True, True, True]
    assert book.backfilled_ids == 3 and book.pending_ids == 0


def test_a_resumed_sequence_still_recognises_a_restarted_source() -> None:
    seq, _ = sequence()
    seq.resume(5_000_000)
    assert seq.looks_restarted(5)
    seq.reset(5)
    assert seq.accept(6) is True
    seq.accept(10)
    assert seq.missing_between(0, 100) == [(7, 9)]


def test_resume_is_only_for_a_sequence_that_saw_nothing() -> None:
    seq, _ = sequence()
    seq.accept(1)
    with pytest.raises(RuntimeError):
        seq.resume(100)
