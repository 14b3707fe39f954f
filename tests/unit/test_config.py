"""Settings: parsing from the environment, validation messages, and the documentation table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cryptotui.config import Settings, SettingsError, child_env, load_settings, settings_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_three_symbols_and_all_streams() -> None:
    settings = load_settings()
    assert settings.symbols == ["BTCUSDT", "ETHUSDT", "BNBUSDT"]
    assert settings.streams == ["trade", "aggTrade", "bookTicker"]
    assert settings.kafka_partitions == 3
    assert settings.market_topics == {
        "trade": "binance.trade", "aggTrade": "binance.aggtrade", "bookTicker": "binance.bookticker"
    }


def test_lists_and_mappings_parse_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTOTUI_SYMBOLS", "btcusdt, solusdt")
    monkeypatch.setenv("CRYPTOTUI_STREAMS", '["trade"]')
    monkeypatch.setenv("CRYPTOTUI_VOLATILITY_THRESHOLDS", "btcusdt=80,SOLUSDT=0.5")
    settings = load_settings()
    assert settings.symbols == ["BTCUSDT", "SOLUSDT"]
    assert settings.streams == ["trade"]
    assert settings.volatility_threshold("BTCUSDT") == 80.0
    assert settings.volatility_threshold("SOLUSDT") == 0.5
    assert settings.volatility_threshold("ETHUSDT") is None


def test_toml_file_is_read_below_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('kafka_partitions = 5\nspark_master = "spark://host:7077"\n')
    monkeypatch.setenv("CRYPTOTUI_CONFIG_FILE", str(config))
    monkeypatch.setenv("CRYPTOTUI_KAFKA_PARTITIONS", "7")
    settings = load_settings()
    assert settings.kafka_partitions == 7
    assert settings.spark_master == "spark://host:7077"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CRYPTOTUI_KAFKA_PARTITIONS", "0", "CRYPTOTUI_KAFKA_PARTITIONS: Input should be greater than or equal to 1"),
        ("CRYPTOTUI_SYMBOLS", "BTC-USD", "CRYPTOTUI_SYMBOLS: BTC-USD is not a Binance symbol"),
        ("CRYPTOTUI_STREAMS", "trade,depth", "CRYPTOTUI_STREAMS"),
        ("CRYPTOTUI_SOURCE", "file", "CRYPTOTUI_SOURCE: allowed: binance, sim, replay:PATH"),
        ("CRYPTOTUI_BINANCE_WS_URL", "http://x", "CRYPTOTUI_BINANCE_WS_URL: allowed: a base URL"),
        ("CRYPTOTUI_DATABASE_URL", "mysql://x", "CRYPTOTUI_DATABASE_URL: allowed: postgresql://"),
        ("CRYPTOTUI_KAFKA_BOOTSTRAP", "nohost", "CRYPTOTUI_KAFKA_BOOTSTRAP: allowed: host:port"),
        ("CRYPTOTUI_SPARK_MASTER", "mesos://x", "CRYPTOTUI_SPARK_MASTER: allowed: local"),
        ("CRYPTOTUI_POSTGRES_PORT", "70000", "CRYPTOTUI_POSTGRES_PORT: Input should be less than or equal to 65535"),
        ("CRYPTOTUI_VOLATILITY_THRESHOLDS", "BTCUSDT=-1", "CRYPTOTUI_VOLATILITY_THRESHOLDS: thresholds must be"),
        ("CRYPTOTUI_SPEED", "fast", "CRYPTOTUI_SPEED: allowed: 1"),
    ],
)
def test_invalid_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert expected in str(error.value)


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CRYPTOTUI_KAFKA_PARTITIONS": "zero", "CRYPTOTUI_CONFIG_FILE": "/nonexistent"}
    result = subprocess.run(
        [sys.executable, "-m", "cryptotui", "stack", "status"], env=env, capture_output=True, text=True,
        cwd=tmp_path, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cryptotui: invalid setting CRYPTOTUI_KAFKA_PARTITIONS: Input should be a valid integer, "
        "unable to parse string as an integer (got 'zero')"
    )
    assert "Traceback" not in result.stderr


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CRYPTOTUI_SYMBOLS=ETHUSDT\n")
    env = {"PATH": "/usr/bin:/bin", "CRYPTOTUI_CONFIG_FILE": "/nonexistent"}
    result = subprocess.run(
        [sys.executable, "-m", "cryptotui", "config", "show"], env=env, capture_output=True, text=True,
        cwd=tmp_path, check=True,
    )
    assert '"symbols": [\n    "ETHUSDT"\n  ]' in result.stdout


def test_child_env_round_trips_and_drops_inherited_values(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(symbols=["SOLUSDT"], kafka_partitions=4, spark_conf={"spark.x": "1"})
    env = child_env(settings, base={"PATH": "/bin", "CRYPTOTUI_DATABASE_URL": "postgresql://stale/db"})
    assert "CRYPTOTUI_DATABASE_URL" not in env
    assert env["PATH"] == "/bin"
    for key, value in env.items():
        if key.startswith("CRYPTOTUI_"):
            monkeypatch.setenv(key, value)
    rebuilt = load_settings()
    assert rebuilt.symbols == ["SOLUSDT"]
    assert rebuilt.kafka_partitions == 4
    assert rebuilt.spark_conf == {"spark.x": "1"}
    assert rebuilt.data_dir == settings.data_dir


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"CRYPTOTUI_{name.upper()}" not in readme]
    assert not missing, f"README lacks: {missing}"
    assert settings_table() in readme, "README's settings table is stale: run `make docs`"
