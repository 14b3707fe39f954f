"""The one configuration object of cryptotui.

Values come from, highest priority first: explicit arguments, environment variables prefixed
`CRYPTOTUI_`, a `.env` file in the working directory, a TOML file (`CRYPTOTUI_CONFIG_FILE`, default
`<user config dir>/cryptotui/config.toml`), then the defaults below. Every field's description is the
documentation: `cryptotui config docs` prints them as the README's table.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cryptotui.paths import DataPaths, default_config_file, default_data_dir

ENV_PREFIX = "CRYPTOTUI_"
StreamType = Literal["trade", "aggTrade", "bookTicker"]
ALL_STREAM_TYPES: tuple[StreamType, ...] = ("trade", "aggTrade", "bookTicker")
_SYMBOL_RE = re.compile(r"^[A-Z0-9]{5,20}$")
_SPARK_MASTER_RE = re.compile(r"^(local(\[(\*|\d+)(,\d+)?\])?|spark://.+|k8s://.+|yarn)$")
_MEMORY_RE = re.compile(r"^\d+[kmgt]$", re.IGNORECASE)
_SPEED_RE = re.compile(r"^(max|\d+(\.\d+)?)$")
Port = Annotated[int, Field(ge=1, le=65535)]


class SettingsError(Exception):
    """A setting has a value that is not allowed; the message names the setting."""


def _split_list(value: Any) -> Any:
    """Lists come from env vars as JSON (`["a","b"]`) or comma separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _split_mapping(value: Any) -> Any:
    """Mappings come from env vars as JSON (`{"BTCUSDT": 50}`) or `BTCUSDT=50,ETHUSDT=3`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("expected KEY=VALUE pairs separated by commas, or a JSON object")
        return {key.strip(): val.strip() for key, val in pairs}
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- market feed -------------------------------------------------------------------------
    symbols: Annotated[list[str], NoDecode] = Field(
        default=["BTCUSDT", "ETHUSDT", "BNBUSDT"],
        description="Symbols to follow, comma separated (uppercase Binance spot symbols, e.g. BTCUSDT).",
    )
    streams: Annotated[list[StreamType], NoDecode] = Field(
        default=list(ALL_STREAM_TYPES),
        description="Stream types to subscribe to per symbol: trade, aggTrade, bookTicker.",
    )
    source: str = Field(
        default="binance",
        description="Where the market data comes from: `binance` (live), `sim` (built-in simulator) "
        "or `replay:PATH` (a recording).",
    )
    speed: str = Field(
        default="1", description="Pace of `sim`/`replay:` sources: `1` (real time), `N` (N times faster), `max`."
    )
    binance_ws_url: str = Field(
        default="wss://data-stream.binance.vision",
        description="Binance WebSocket base URL (scheme, host, port); the stream path is added. "
        "Also `wss://stream.binance.com:9443`.",
    )
    binance_rest_url: str = Field(
        default="https://data-api.binance.vision",
        description="Binance REST base URL used to backfill trade-id gaps.",
    )
    backfill: bool = Field(default=True, description="Backfill trade and aggTrade id gaps from the REST API.")
    watchdog_s: float = Field(
        default=30.0, gt=0, description="Reconnect when no message arrived for this many seconds."
    )
    connection_lifetime_s: float = Field(
        default=23 * 3600 + 30 * 60,
        gt=0,
        description="Replace a WebSocket connection after this long (Binance closes them at 24 h).",
    )
    ingest_buffer_messages: int = Field(
        default=100_000,
        ge=100,
        description="Messages held in memory while the broker is down before spilling to disk.",
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        description="Bootstrap address of an external Kafka cluster (host:port,...). "
        "Unset: the embedded broker is started.",
    )
    kafka_port: Port = Field(default=19092, description="Port of the embedded Kafka broker (127.0.0.1).")
    kafka_partitions: int = Field(default=3, ge=1, le=256, description="Partitions per topic when creating topics.")
    kafka_replication_factor: int = Field(default=1, ge=1, description="Replication factor when creating topics.")
    topic_trade: str = Field(default="binance.trade", description="Topic for trade events.")
    topic_aggtrade: str = Field(default="binance.aggtrade", description="Topic for aggTrade events.")
    topic_bookticker: str = Field(default="binance.bookticker", description="Topic for bookTicker events.")
    topic_dlq: str = Field(default="binance.dlq", description="Dead-letter topic for messages that cannot be used.")

    # --- database ----------------------------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL/TimescaleDB URL (postgresql://user:pass@host:port/db). "
        "Unset: the embedded PostgreSQL is started.",
    )
    postgres_port: Port = Field(default=54320, description="Port of the embedded PostgreSQL (127.0.0.1).")
    postgres_bindir: Path | None = Field(
        default=None,
        description="Directory with initdb/pg_ctl for the embedded server. Default: /usr/lib/postgresql/<17|16|15>/bin "
        "or the PATH.",
    )
    database_name: str = Field(default="cryptotui", description="Database name of the embedded PostgreSQL.")
    database_user: str = Field(default="cryptotui", description="User of the embedded PostgreSQL.")
    timescaledb: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Use TimescaleDB hypertables: `auto` (when the extension is available), `on` (required), "
        "`off` (plain tables).",
    )
    retention_raw_days: float = Field(default=7, gt=0, description="Keep raw market rows this many days.")
    retention_metrics_days: float = Field(
        default=90, gt=0, description="Keep metrics, lag, progress and alert rows this many days."
    )
    retention_interval_s: float = Field(default=3600, gt=0, description="How often the retention stage runs.")

    # --- stages ------------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the stack keeps its state (database, broker, logs, secrets). "
        "Default: the user data directory (/var/lib/cryptotui for root).",
    )
    heartbeat_s: float = Field(default=1.0, gt=0, description="Stage heartbeat interval (stage_status).")
    sink_batch_size: int = Field(default=500, ge=1, description="Sink: messages per table batch at most.")
    sink_batch_timeout_s: float = Field(
        default=2.0, gt=0, description="Sink: seconds before a partial batch is written."
    )
    sink_instance_id: str | None = Field(
        default=None,
        description="Sink: static group member id (Kafka group.instance.id). Default: cryptotui-sink-<hostname>; "
        "give each sink on one host its own.",
    )
    lag_interval_s: float = Field(default=5.0, gt=0, description="Lag stage: seconds between kafka_lag samples.")
    feed_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the feed server started for `sim`/`replay:` (0: a free port)."
    )
    feed_args: str = Field(
        default="",
        description="Extra options for that feed server, e.g. `--rate 500 --no-bursts` or fault injection "
        "(`--malformed-per-1000 5`); see `cryptotui feed serve --help`.",
    )
    stages: Annotated[list[str], NoDecode] = Field(
        default=["sink", "lag", "spark", "retention", "ingest"],
        description="Stages the supervisor runs (e.g. `sink,lag,ingest` without Spark).",
    )

    # --- Spark -------------------------------------------------------------------------------
    spark_master: str = Field(
        default="local[2]", description="Spark master URL: local[N], spark://host:port, k8s://..., yarn."
    )
    spark_driver_memory: str = Field(default="1g", description="Spark driver memory (e.g. 512m, 1g).")
    spark_executor_memory: str = Field(default="1g", description="Spark executor memory on a cluster.")
    spark_shuffle_partitions: int = Field(
        default=2, ge=1, description="spark.sql.shuffle.partitions (frozen into the checkpoint at first start)."
    )
    spark_ui: bool = Field(default=False, description="Start the Spark web UI (127.0.0.1:4040).")
    spark_trigger_s: float = Field(default=2.0, gt=0, description="Spark micro-batch trigger interval.")
    spark_watermark_s: float = Field(default=10.0, ge=0, description="Event-time watermark delay.")
    spark_max_rows_per_trigger: int = Field(
        default=200_000, ge=1, description="Most rows read per micro-batch, shared by partition backlog."
    )
    spark_source: Literal["python", "kafka"] = Field(
        default="python",
        description="Kafka reader: `python` (built-in Python data source) or `kafka` (Spark's connector, "
        "when spark-sql-kafka is on the classpath).",
    )
    spark_checkpoint_dir: Path | None = Field(
        default=None, description="Spark checkpoint location. Default: <data_dir>/spark/checkpoint."
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description="Extra Spark settings as a JSON object, applied last."
    )

    # --- metrics and alerts ------------------------------------------------------------------
    volatility_thresholds: Annotated[dict[str, float], NoDecode] = Field(
        default={"BTCUSDT": 60.0, "ETHUSDT": 3.0, "BNBUSDT": 1.0},
        description="Price standard deviation per 1-min window above which volatility_alert is set, "
        "per symbol, in quote currency (`BTCUSDT=60,ETHUSDT=3`).",
    )
    volatility_default_bps: float = Field(
        default=5.0,
        gt=0,
        description="For symbols without a threshold: alert when the stddev exceeds this many basis "
        "points of the window's VWAP.",
    )
    volume_spike_factor: float = Field(
        default=3.0, gt=0, description="volume_spike when a window's volume exceeds k x the mean of previous windows."
    )
    volume_spike_windows: int = Field(default=10, ge=1, description="N previous windows averaged for volume_spike.")
    spread_warning_factor: float = Field(
        default=3.0, gt=0, description="spread_warning when the average spread exceeds this x the minimum spread."
    )

    # --- SMTP --------------------------------------------------------------------------------
    smtp_host: str | None = Field(default=None, description="SMTP server for alert e-mail (unset: no e-mail).")
    smtp_port: Port = Field(default=587, description="SMTP port.")
    smtp_user: str | None = Field(default=None, description="SMTP user name.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password (from the environment).")
    smtp_from: str = Field(default="cryptotui@localhost", description="Sender address of alert e-mail.")
    smtp_to: Annotated[list[str], NoDecode] = Field(default=[], description="Recipients of alert e-mail.")
    smtp_tls: Literal["none", "starttls", "ssl"] = Field(default="starttls", description="SMTP TLS mode.")

    # --- misc --------------------------------------------------------------------------------
    grafana_port: Port = Field(default=3000, description="Port of Grafana when a Grafana server is installed.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(ENV_PREFIX + "CONFIG_FILE") or default_config_file())
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    # --- validation --------------------------------------------------------------------------
    @field_validator("symbols", mode="before")
    @classmethod
    def _parse_symbols(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, value: list[str]) -> list[str]:
        symbols = [symbol.upper() for symbol in value]
        if not symbols:
            raise ValueError("at least one symbol is required")
        bad = [symbol for symbol in symbols if not _SYMBOL_RE.match(symbol)]
        if bad:
            raise ValueError(f"{', '.join(bad)} is not a Binance symbol (5-20 letters/digits, e.g. BTCUSDT)")
        return list(dict.fromkeys(symbols))

    @field_validator("streams", "smtp_to", "stages", mode="before")
    @classmethod
    def _parse_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("streams")
    @classmethod
    def _check_streams(cls, value: list[StreamType]) -> list[StreamType]:
        if not value:
            raise ValueError("at least one stream type is required (trade, aggTrade, bookTicker)")
        return list(dict.fromkeys(value))

    @field_validator("stages")
    @classmethod
    def _check_stages(cls, value: list[str]) -> list[str]:
        from cryptotui.stages import STAGES

        unknown = [name for name in value if name not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        return list(dict.fromkeys(value))

    @field_validator("feed_args")
    @classmethod
    def _check_feed_args(cls, value: str) -> str:
        import shlex

        shlex.split(value)  # unbalanced quotes fail here, naming the setting
        return value

    @field_validator("volatility_thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, value: Any) -> Any:
        value = _split_mapping(value)
        if isinstance(value, dict):
            return {str(key).upper(): val for key, val in value.items()}
        return value

    @field_validator("volatility_thresholds")
    @classmethod
    def _check_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [symbol for symbol, threshold in value.items() if threshold <= 0]
        if bad:
            raise ValueError(f"thresholds must be positive ({', '.join(bad)})")
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if value in ("binance", "sim") or (value.startswith("replay:") and len(value) > len("replay:")):
            return value
        raise ValueError("allowed: binance, sim, replay:PATH")

    @field_validator("speed")
    @classmethod
    def _check_speed(cls, value: str) -> str:
        value = str(value).strip().lower()
        if not _SPEED_RE.match(value) or (value != "max" and float(value) <= 0):
            raise ValueError("allowed: 1 (real time), a positive number N (N times faster), max")
        return value

    @field_validator("binance_ws_url")
    @classmethod
    def _check_ws_url(cls, value: str) -> str:
        if not re.match(r"^wss?://[^/\s]+/?$", value):
            raise ValueError("allowed: a base URL ws[s]://host[:port] without a path")
        return value.rstrip("/")

    @field_validator("binance_rest_url")
    @classmethod
    def _check_rest_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError("allowed: a base URL http[s]://host[:port] without a path")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^postgres(ql)?://", value):
            raise ValueError("allowed: postgresql://user:password@host:port/database")
        return value or None

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("allowed: host:port[,host:port...]")
        return value.strip()

    @field_validator("spark_master")
    @classmethod
    def _check_master(cls, value: str) -> str:
        if not _SPARK_MASTER_RE.match(value):
            raise ValueError("allowed: local, local[N], local[*], spark://host:port, k8s://..., yarn")
        return value

    @field_validator("spark_driver_memory", "spark_executor_memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        if not _MEMORY_RE.match(value):
            raise ValueError("allowed: a size like 512m or 1g")
        return value.lower()

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _check_topics_distinct(self) -> Settings:
        topics = [self.topic_trade, self.topic_aggtrade, self.topic_bookticker, self.topic_dlq]
        if len(set(topics)) != len(topics):
            raise ValueError("topic_trade, topic_aggtrade, topic_bookticker and topic_dlq must differ")
        return self

    # --- derived values ----------------------------------------------------------------------
    @property
    def paths(self) -> DataPaths:
        return DataPaths(self.data_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.spark_checkpoint_dir or self.paths.spark_checkpoint

    @property
    def market_topics(self) -> dict[StreamType, str]:
        """The topic of each stream type."""
        return {"trade": self.topic_trade, "aggTrade": self.topic_aggtrade, "bookTicker": self.topic_bookticker}

    @property
    def all_topics(self) -> list[str]:
        return [*self.market_topics.values(), self.topic_dlq]

    def volatility_threshold(self, symbol: str) -> float | None:
        """The absolute threshold for a symbol, or None when it is relative (volatility_default_bps)."""
        return self.volatility_thresholds.get(symbol)

    def to_env(self) -> dict[str, str]:
        """These settings as CRYPTOTUI_* environment variables, for child processes."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, (list, dict)):
                text = json.dumps(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env


def child_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that must see exactly these settings.

    Inherited CRYPTOTUI_* variables are dropped first: an unset field (e.g. an embedded database) must
    not be overridden by a value the parent happened to inherit.
    """
    env = {key: value for key, value in (base if base is not None else os.environ).items()
           if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG_FILE"}
    env.update(settings.to_env())
    return env


def describe_error(error: ValidationError) -> str:
    """One line per bad setting, naming its environment variable and what is allowed."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "settings"
        name = ENV_PREFIX + field.upper() if field in Settings.model_fields else "settings"
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"invalid setting {name}: {message}{shown}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into a SettingsError that names the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None
    except (ValueError, json.JSONDecodeError) as error:
        raise SettingsError(f"invalid setting: {error}") from None


def settings_table() -> str:
    """A Markdown table of every setting: the README's configuration reference."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(see description)" if name == "data_dir" else json.dumps(field.default_factory())
        elif field.default is None:
            default = "unset"
        elif isinstance(field.default, (list, dict)):
            default = json.dumps(field.default)
        else:
            default = str(field.default)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default}` | {description} |")
    return "\n".join(rows)
