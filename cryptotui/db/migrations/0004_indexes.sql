-- Read paths of the TUI and Grafana: newest rows of one symbol.
CREATE INDEX IF NOT EXISTS trades_symbol_time ON trades (symbol, trade_time DESC);
CREATE INDEX IF NOT EXISTS agg_trades_symbol_time ON agg_trades (symbol, trade_time DESC);
CREATE INDEX IF NOT EXISTS book_ticker_symbol_time ON book_ticker (symbol, recv_time DESC);
CREATE INDEX IF NOT EXISTS trade_metrics_window ON trade_metrics (window_start DESC);
CREATE INDEX IF NOT EXISTS spread_metrics_window ON spread_metrics (window_start DESC);
