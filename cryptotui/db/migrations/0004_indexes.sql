-- Read paths of the TUI and Grafana across symbols: newest windows first. (The raw tables need no extra
-- index: their primary keys start with (symbol, time), which also serves "newest rows of one symbol".)
CREATE INDEX IF NOT EXISTS trade_metrics_window ON trade_metrics (window_start DESC);
CREATE INDEX IF NOT EXISTS spread_metrics_window ON spread_metrics (window_start DESC);
