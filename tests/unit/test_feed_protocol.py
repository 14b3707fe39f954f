"""Control-message validation with Binance's error codes, and the feed CLI's option checking."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cryptotui.feed.cli import combined_stream_url, feed
from cryptotui.feed.server import ControlError, ControlRequest, FeedServerConfig, parse_control


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}', ControlRequest("SUBSCRIBE", ["btcusdt@trade"], 1)),
        ('{"method":"LIST_SUBSCRIPTIONS","id":"a1-b2"}', ControlRequest("LIST_SUBSCRIPTIONS", [], "a1-b2")),
        ('{"method":"UNSUBSCRIBE","params":[],"id":null}', ControlRequest("UNSUBSCRIBE", [], None)),
        ('{"method":"GET_PROPERTY","params":["combined"],"id":-5}', ControlRequest("GET_PROPERTY", ["combined"], -5)),
    ],
)
def test_valid_requests_parse(text: str, expected: ControlRequest) -> None:
    assert parse_control(text) == expected


@pytest.mark.parametrize(
    ("text", "code", "message", "request_id"),
    [
        ("{nope", 3, "Invalid JSON: ", None),
        ("", 3, "Invalid JSON: expected value at line 1 column 1", None),
        ('{"method":"SUBSCRIBE","params":[]}', 2, "Invalid request: request ID must be an unsigned integer", None),
        ('{"method":"SUBSCRIBE","id":1.5}', 2, "Invalid request: request ID must be an unsigned integer", None),
        ('{"method":"SUBSCRIBE","id":"' + "x" * 37 + '"}', 2, "request ID must be an unsigned integer", None),
        ('{"params":[],"id":4}', 2, "Invalid request: missing field `method`", 4),
        ('{"method":"PING","id":5}', 2, "Invalid request: unknown variant `PING`, expected one of `SUBSCRIBE`", 5),
        ('{"method":"SUBSCRIBE","params":"btcusdt@trade","id":6}', 2, "expected a sequence", 6),
        ("[1]", 2, "Invalid request: invalid type: sequence", None),
    ],
)
def test_bad_requests_get_binance_errors(text: str, code: int, message: str, request_id: object) -> None:
    with pytest.raises(ControlError) as caught:
        parse_control(text)
    reply = caught.value.reply()
    assert reply["error"]["code"] == code
    assert reply["error"]["msg"].startswith(message) or message in reply["error"]["msg"]
    assert reply["id"] == request_id
    assert set(reply) == {"error", "id"}


def test_server_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        FeedServerConfig(ping_interval_s=0)
    with pytest.raises(ValueError):
        FeedServerConfig(port=70000)


def test_combined_stream_url_adds_the_stream_path() -> None:
    streams = ["btcusdt@trade", "ethusdt@bookTicker"]
    expected = "wss://data-stream.binance.vision/stream?streams=btcusdt@trade/ethusdt@bookTicker"
    assert combined_stream_url("wss://data-stream.binance.vision", streams) == expected
    assert combined_stream_url("wss://data-stream.binance.vision/", streams) == expected
    assert combined_stream_url("ws://127.0.0.1:9/stream", streams) == (
        "ws://127.0.0.1:9/stream?streams=btcusdt@trade/ethusdt@bookTicker"
    )
    kept = "ws://h:1/stream?streams=a@trade"
    assert combined_stream_url(kept, streams) == kept
    for bad in ("http://host", "ws://host/ws/btcusdt@trade"):
        with pytest.raises(ValueError):
            combined_stream_url(bad, streams)


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "70000"],
        ["serve", "--speed", "fast"],
        ["serve", "--speed", "0"],
        ["serve", "--rate", "-5"],
        ["serve", "--simulate", "--recording", "{recording}"],
        ["serve", "--recording", "{recording}", "--rate", "10"],
        ["serve", "--stall-for", "3"],
        ["serve", "--malformed-per-1000", "2000"],
        ["serve", "--skip-ids-every", "1"],
        ["serve", "--recording", "/nonexistent/file.jsonl"],
        ["serve", "--symbols", "BTC-USDT"],
        ["record", "--out", "x.jsonl", "--streams", "depth"],
        ["record", "--out", "x.jsonl", "--url", "http://example.invalid"],
        ["record"],
    ],
)
def test_bad_cli_options_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    recording = tmp_path / "rec.jsonl"
    recording.write_text("")
    result = CliRunner().invoke(feed, [arg.replace("{recording}", str(recording)) for arg in args])
    assert result.exit_code == 2, result.output
