-- What the pipeline reports about itself: the TUI, the daemon and Grafana read these.
CREATE TABLE IF NOT EXISTS kafka_lag (
    time              timestamptz NOT NULL,
    group_id          text        NOT NULL,
    topic             text        NOT NULL,
    partition         integer     NOT NULL,
    end_offset        bigint      NOT NULL,
    committed_offset  bigint,
    lag               bigint      NOT NULL,
    lag_seconds       double precision
);
CREATE INDEX IF NOT EXISTS kafka_lag_group_time ON kafka_lag (group_id, topic, partition, time DESC);

CREATE TABLE IF NOT EXISTS spark_progress (
    time                       timestamptz NOT NULL,
    query                      text        NOT NULL,
    batch_id                   bigint      NOT NULL,
    num_input_rows             bigint      NOT NULL,
    input_rows_per_second      double precision,
    processed_rows_per_second  double precision,
    batch_duration_ms          bigint,
    watermark                  timestamptz,
    offsets_behind             bigint
);
CREATE INDEX IF NOT EXISTS spark_progress_query_time ON spark_progress (query, time DESC);

CREATE TABLE IF NOT EXISTS stage_status (
    stage         text        PRIMARY KEY,
    pid           integer,
    state         text        NOT NULL,
    started_at    timestamptz,
    heartbeat_at  timestamptz,
    counters      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    last_error    text
);

CREATE TABLE IF NOT EXISTS alert_events (
    time         timestamptz      NOT NULL,
    rule         text             NOT NULL,
    symbol       text,
    state        text             NOT NULL,
    value        double precision,
    threshold    double precision,
    message      text,
    notified_at  timestamptz
);
CREATE INDEX IF NOT EXISTS alert_events_rule_time ON alert_events (rule, symbol, time DESC);
