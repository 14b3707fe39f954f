-- Metrics computed by the Spark job; one row per symbol and window, rewritten while the window is open.
CREATE TABLE IF NOT EXISTS trade_metrics (
    symbol            text             NOT NULL,
    window_start      timestamptz      NOT NULL,
    window_end        timestamptz      NOT NULL,
    trade_count       bigint           NOT NULL,
    volume            numeric          NOT NULL,
    quote_volume      numeric          NOT NULL,
    vwap              numeric,
    open              numeric,
    high              numeric,
    low               numeric,
    close             numeric,
    price_stddev      double precision,
    buy_volume        numeric          NOT NULL,
    sell_volume       numeric          NOT NULL,
    volatility_alert  boolean          NOT NULL DEFAULT false,
    volume_spike      boolean          NOT NULL DEFAULT false,
    updated_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, window_start)
);

CREATE TABLE IF NOT EXISTS spread_metrics (
    symbol          text             NOT NULL,
    window_start    timestamptz      NOT NULL,
    window_end      timestamptz      NOT NULL,
    avg_spread      numeric          NOT NULL,
    min_spread      numeric          NOT NULL,
    max_spread      numeric          NOT NULL,
    avg_spread_bps  double precision NOT NULL,
    samples         bigint           NOT NULL,
    spread_warning  boolean          NOT NULL DEFAULT false,
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, window_start)
);
