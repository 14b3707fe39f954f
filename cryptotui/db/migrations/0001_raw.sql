-- Raw market data exactly as Binance sent it: prices and quantities are numeric with the scale of the
-- original decimal strings. Deduplication keys include the time column so they stay valid on hypertables.
CREATE TABLE IF NOT EXISTS trades (
    symbol          text        NOT NULL,
    trade_id        bigint      NOT NULL,
    trade_time      timestamptz NOT NULL,
    event_time      timestamptz NOT NULL,
    price           numeric     NOT NULL,
    qty             numeric     NOT NULL,
    is_buyer_maker  boolean     NOT NULL,
    recv_time       timestamptz NOT NULL,
    PRIMARY KEY (symbol, trade_time, trade_id)
);

CREATE TABLE IF NOT EXISTS agg_trades (
    symbol          text        NOT NULL,
    agg_trade_id    bigint      NOT NULL,
    trade_time      timestamptz NOT NULL,
    event_time      timestamptz NOT NULL,
    price           numeric     NOT NULL,
    qty             numeric     NOT NULL,
    first_trade_id  bigint      NOT NULL,
    last_trade_id   bigint      NOT NULL,
    is_buyer_maker  boolean     NOT NULL,
    recv_time       timestamptz NOT NULL,
    PRIMARY KEY (symbol, trade_time, agg_trade_id)
);

-- bookTicker carries no event time: the receive time stamped by ingest is its time column.
CREATE TABLE IF NOT EXISTS book_ticker (
    symbol          text        NOT NULL,
    update_id       bigint      NOT NULL,
    recv_time       timestamptz NOT NULL,
    bid             numeric     NOT NULL,
    bid_qty         numeric     NOT NULL,
    ask             numeric     NOT NULL,
    ask_qty         numeric     NOT NULL,
    PRIMARY KEY (symbol, recv_time, update_id)
);
