-- The Kafka offsets each Spark batch ended at, {"topic": {"partition": next offset}}: the lag stage
-- reports Spark's lag from them under group id `spark` (Spark keeps its offsets in its checkpoint,
-- not in a Kafka consumer group). One query covers some topics: take, per topic, the newest row
-- that mentions it.
ALTER TABLE spark_progress ADD COLUMN IF NOT EXISTS end_offsets jsonb;
