"""The ingest stage: Binance WebSocket streams -> validated, timestamped messages in Kafka.

Modules: `stage` (IngestStage), `connection` (WebSocket client, rotation, watchdog, backoff),
`validate` (checks and DLQ reasons), `producer` (batched producing, memory buffer, spill file),
`gaps` (duplicates and id gaps), `backfill` (REST backfill of gaps). See docs/ingest.md.
"""

from cryptotui.stages.ingest.stage import IngestStage

__all__ = ["IngestStage"]
