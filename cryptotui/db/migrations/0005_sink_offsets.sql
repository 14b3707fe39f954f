-- The sink's Kafka positions, written in the same transaction as the rows they cover: the database, not
-- the broker, is the source of truth for what was stored, so a crash at any moment (or a broker that
-- loses its committed offsets) never skips nor doubles a message. next_offset = last stored offset + 1.
CREATE TABLE IF NOT EXISTS sink_offsets (
    group_id     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    next_offset  bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
