"""Progress of the streaming queries: one `spark_progress` row per micro-batch, and status lines.

A `StreamingQueryListener` receives Spark's progress events (asynchronously, on the listener bus). Each
event becomes a row in `spark_progress` (with the batch's end offsets, which the lag stage reads as the
consumer group `spark`) and a status line on stdout, `@@cryptotui-spark {json}`, which the spark stage
(`cryptotui stage run spark`) turns into its heartbeat counters. Writing never fails the query: a
database that is down costs progress rows, not metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pyspark.sql.streaming import StreamingQueryListener

from spark.kafka_source import normalize, offsets_behind

log = logging.getLogger(__name__)

STATUS_PREFIX = "@@cryptotui-spark "
NO_WATERMARK = datetime(1970, 1, 1, tzinfo=UTC)

INSERT_PROGRESS = """
INSERT INTO spark_progress (time, query, batch_id, num_input_rows, input_rows_per_second,
                            processed_rows_per_second, batch_duration_ms, watermark, offsets_behind,
                            end_offsets)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb)
"""

_print_lock = threading.Lock()


def emit_status(event: dict[str, Any]) -> None:
    """One status line for the stage process (stdout is the channel; logs go to stderr)."""
    line = STATUS_PREFIX + json.dumps(event, default=str, separators=(",", ":"))
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def parse_status(line: str) -> dict[str, Any] | None:
    """The event of a status line, or None for any other line."""
    if not line.startswith(STATUS_PREFIX):
        return None
    try:
        event = json.loads(line[len(STATUS_PREFIX) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def parse_time(text: str | None) -> datetime | None:
    """Spark's ISO-8601 instants ("2024-05-01T12:00:00.000Z") as aware UTC datetimes."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _offsets(value: Any) -> dict[str, dict[str, int]] | None:
    """A source offset from the progress JSON: an object, or a JSON string of one (Python sources)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    try:
        return normalize(value)
    except (TypeError, ValueError, AttributeError):
        return None


def progress_record(progress: dict[str, Any]) -> dict[str, Any]:
    """The interesting figures of one StreamingQueryProgress (as parsed from its JSON)."""
    sources = progress.get("sources") or []
    end: dict[str, dict[str, int]] = {}
    behind: int | None = None
    for source in sources:
        source_end = _offsets(source.get("endOffset"))
        source_latest = _offsets(source.get("latestOffset"))
        if source_end:
            end.update(source_end)
            if source_latest is not None:
                behind = (behind or 0) + offsets_behind(source_end, source_latest)
    watermark = parse_time((progress.get("eventTime") or {}).get("watermark"))
    if watermark == NO_WATERMARK:
        watermark = None  # Spark reports the epoch before the first event
    operators = progress.get("stateOperators") or []
    return {
        "time": parse_time(progress.get("timestamp")) or datetime.now(UTC),
        "query": progress.get("name") or str(progress.get("id")),
        "batch_id": int(progress.get("batchId", -1)),
        "num_input_rows": int(progress.get("numInputRows") or 0),
        "input_rows_per_second": _float(progress.get("inputRowsPerSecond")),
        "processed_rows_per_second": _float(progress.get("processedRowsPerSecond")),
        "batch_duration_ms": (progress.get("durationMs") or {}).get("triggerExecution"),
        "watermark": watermark,
        "offsets_behind": behind,
        "end_offsets": end or None,
        "state_rows": sum(int(op.get("numRowsTotal") or 0) for op in operators),
        # Counted by the state store after partial aggregation: at most (not exactly) the late events.
        "late_rows_dropped": sum(int(op.get("numRowsDroppedByWatermark") or 0) for op in operators),
    }


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


class ProgressListener(StreamingQueryListener):
    """Writes `spark_progress` rows and emits status lines; `write` is None to skip the database."""

    def __init__(
        self,
        write: Callable[[dict[str, Any]], None] | None,
        emit: Callable[[dict[str, Any]], None] = emit_status,
    ) -> None:
        self._write = write
        self._emit = emit
        self._running: set[str] = set()
        self._changed = threading.Condition()

    def wait_all_terminated(self, timeout: float) -> bool:
        """Wait until every started query's terminated event arrived (so its last progress row is written).

        Spark's listener bus delivers a query's events in order, the terminated event last.
        """
        with self._changed:
            return self._changed.wait_for(lambda: not self._running, timeout)

    def onQueryStarted(self, event: Any) -> None:
        with self._changed:
            self._running.add(str(event.id))
        self._emit({"event": "started", "query": event.name, "id": str(event.id)})

    def onQueryProgress(self, event: Any) -> None:
        try:
            record = progress_record(json.loads(event.progress.json))
        except Exception:  # a malformed event must not break the listener bus
            log.exception("cannot read a progress event")
            return
        if self._write is not None:
            try:
                self._write(record)
            except Exception as error:
                log.warning(
                    "cannot write spark_progress for %s batch %s: %s", record["query"], record["batch_id"], error
                )
        self._emit({"event": "progress", **record})

    def onQueryIdle(self, event: Any) -> None:
        self._emit({"event": "idle", "id": str(event.id)})

    def onQueryTerminated(self, event: Any) -> None:
        self._emit({"event": "terminated", "id": str(event.id), "exception": event.exception})
        with self._changed:
            self._running.discard(str(event.id))
            self._changed.notify_all()


async def insert_progress(pool: Any, record: dict[str, Any]) -> None:
    end = record["end_offsets"]
    await pool.execute(
        INSERT_PROGRESS,
        record["time"],
        record["query"],
        record["batch_id"],
        record["num_input_rows"],
        record["input_rows_per_second"],
        record["processed_rows_per_second"],
        record["batch_duration_ms"],
        record["watermark"],
        record["offsets_behind"],
        json.dumps(end) if end is not None else None,
    )
