"""The feed server on loopback, driven by real WebSocket and HTTP clients (never the internet)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from cryptotui.feed.faults import Faults
from cryptotui.feed.recording import RecordingSource, RecordingWriter, read_recording
from cryptotui.feed.server import FeedServer, FeedServerConfig
from cryptotui.feed.simulate import SimulatedMarket

pytestmark = pytest.mark.timeout(60)

ALL_STREAMS = [f"{symbol}@{kind}" for symbol in ("btcusdt", "ethusdt") for kind in ("trade", "aggTrade", "bookTicker")]
TRADE_FIELDS = {"e": str, "E": int, "s": str, "t": int, "p": str, "q": str, "T": int, "m": bool, "M": bool}
AGG_FIELDS = {"e": str, "E": int, "s": str, "a": int, "p": str, "q": str, "f": int, "l": int, "T": int, "m": bool}
AGG_FIELDS |= {"M": bool}
BOOK_FIELDS = {"u": int, "s": str, "b": str, "B": str, "a": str, "A": str}
FIELDS = {"trade": TRADE_FIELDS, "aggTrade": AGG_FIELDS, "bookTicker": BOOK_FIELDS}


@contextlib.asynccontextmanager
async def running(source: Any = None, faults: Faults | None = None, **config: Any) -> AsyncIterator[FeedServer]:
    source = source or SimulatedMarket(["BTCUSDT", "ETHUSDT"], rate=3000, seed=1, bursts=False)
    server = FeedServer(FeedServerConfig(**config), source=source, faults=faults)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def connect(url: str) -> Any:
    """A websockets client that never stops reading from the socket.

    With its default bounded queue, websockets stops reading once 16 messages wait unread; a
    close handshake then waits (10 s) for a close frame stuck behind the unread data.
    """
    return websockets.connect(url, max_queue=None, close_timeout=2)


async def receive(ws: ClientConnection, count: int, timeout: float = 5.0) -> list[Any]:
    return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(count)]


async def control(ws: ClientConnection, request: dict[str, Any] | str) -> dict[str, Any]:
    """Send a control message and return its reply, skipping the market data that arrives meanwhile."""
    await ws.send(request if isinstance(request, str) else json.dumps(request))
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if "id" in message and ("result" in message or "error" in message):
            return message


async def closed_within(ws: ClientConnection, seconds: float) -> float:
    """Read until the server closes the connection; how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(seconds):
            while True:
                await ws.recv()
    assert ws.state is websockets.State.CLOSED, "the server did not close the connection in time"
    return loop.time() - started


def check_fields(kind: str, data: dict[str, Any]) -> None:
    fields = FIELDS[kind]
    assert data.keys() == fields.keys(), data
    for name, expected in fields.items():
        assert type(data[name]) is expected, (name, data)


# --- streams ----------------------------------------------------------------------------------------------


async def test_combined_path_delivers_the_subscribed_streams_in_binance_format() -> None:
    async with running() as server:
        wanted = ["btcusdt@trade", "btcusdt@aggTrade", "ethusdt@bookTicker"]
        async with connect(f"{server.url}/stream?streams={'/'.join(wanted)}") as ws:
            messages = await receive(ws, 300)
    seen = {message["stream"] for message in messages}
    assert seen == set(wanted)
    for message in messages:
        assert message.keys() == {"stream", "data"}
        kind = message["stream"].partition("@")[2]
        check_fields(kind, message["data"])
        assert message["data"]["s"].lower() == message["stream"].partition("@")[0]
        if kind != "bookTicker":
            assert message["data"]["e"] == kind


async def test_raw_path_delivers_bare_data_objects() -> None:
    async with running() as server, connect(f"{server.url}/ws/ethusdt@trade") as ws:
        messages = await receive(ws, 50)
    for data in messages:
        check_fields("trade", data)
        assert data["s"] == "ETHUSDT"
    ids = [data["t"] for data in messages]
    assert ids == list(range(ids[0], ids[0] + len(ids)))


async def test_subscribe_list_and_unsubscribe_on_a_bare_connection() -> None:
    async with running() as server, connect(f"{server.url}/ws") as ws:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)  # nothing subscribed, nothing sent
        subscribe = {"method": "SUBSCRIBE", "params": ["btcusdt@bookTicker", "ethusdt@trade"], "id": 1}
        assert await control(ws, subscribe) == {"result": None, "id": 1}
        listing = await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": "list-2"})
        assert listing == {"result": ["btcusdt@bookTicker", "ethusdt@trade"], "id": "list-2"}
        data = await receive(ws, 50)
        assert {item["s"] for item in data} == {"BTCUSDT", "ETHUSDT"}
        assert "stream" not in data[0]
        unsubscribe = {"method": "UNSUBSCRIBE", "params": ["ethusdt@trade"], "id": 3}
        assert await control(ws, unsubscribe) == {"result": None, "id": 3}
        await asyncio.sleep(1.1)  # stay under 5 messages per second
        assert await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 4}) == {
            "result": ["btcusdt@bookTicker"],
            "id": 4,
        }
        await asyncio.sleep(0.1)
        later = await receive(ws, 50)
        assert all("u" in item and item["s"] == "BTCUSDT" for item in later[5:])


async def test_combined_property_switches_the_payload_format() -> None:
    async with running() as server, connect(f"{server.url}/ws/btcusdt@trade") as ws:
        get = {"method": "GET_PROPERTY", "params": ["combined"], "id": 1}
        assert await control(ws, get) == {"result": False, "id": 1}
        assert await control(ws, {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2}) == {
            "result": None,
            "id": 2,
        }
        messages = await receive(ws, 20)
        assert messages[-1]["stream"] == "btcusdt@trade"
        bad = {"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 3}
        assert await control(ws, bad) == {"error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": 3}
        unknown = {"method": "GET_PROPERTY", "params": ["colour"], "id": 4}
        assert await control(ws, unknown) == {"error": {"code": 0, "msg": "Unknown property"}, "id": 4}


async def test_bad_control_messages_get_binance_error_replies() -> None:
    async with running() as server, connect(f"{server.url}/ws") as ws:
        reply = await control(ws, "{not json")
        assert reply["error"]["code"] == 3 and reply["error"]["msg"].startswith("Invalid JSON: ")
        reply = await control(ws, {"method": "SUBSCRIBE", "params": ["BTCUSDT@trade"], "id": 7})
        assert reply["id"] == 7 and reply["error"]["code"] == 2
        assert reply["error"]["msg"].startswith("Invalid request: invalid stream name `BTCUSDT@trade`")
        reply = await control(ws, {"method": "FOO", "id": 8})
        assert reply["error"] == {
            "code": 2,
            "msg": "Invalid request: unknown variant `FOO`, expected one of `SUBSCRIBE`, `UNSUBSCRIBE`, "
            "`LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`",
        }
        await asyncio.sleep(1.1)
        reply = await control(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": {"a": 1}})
        assert reply == {
            "error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"},
            "id": None,
        }
        too_many = [f"s{index}usdt@trade" for index in range(1025)]
        reply = await control(ws, {"method": "SUBSCRIBE", "params": too_many, "id": 9})
        assert reply["error"]["code"] == 2 and "too many streams" in reply["error"]["msg"]
        assert await control(ws, {"method": "SUBSCRIBE", "params": too_many[:1024], "id": 10}) == {
            "result": None,
            "id": 10,
        }


async def test_invalid_streams_in_the_url_are_refused() -> None:
    async with running() as server, aiohttp.ClientSession() as session:
        for path in (
            "/ws/BTCUSDT@trade",
            "/stream?streams=btcusdt@depth",
            "/stream?streams=" + "/".join(f"s{index}usdt@trade" for index in range(1025)),
        ):
            async with session.get(f"{server.rest_url}{path}") as response:
                assert response.status == 400
                assert (await response.json())["code"] == 2


# --- limits -----------------------------------------------------------------------------------------------


async def test_more_than_5_incoming_messages_per_second_close_the_connection() -> None:
    async with running() as server:
        async with connect(f"{server.url}/ws") as ws:
            for index in range(5):
                assert await control(ws, {"method": "LIST_SUBSCRIPTIONS", "id": index}) == {"result": [], "id": index}
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 5}))
            await closed_within(ws, 3)
            assert ws.close_code == 1008
        assert server.stats.drops["rate_limit"] == 1


async def test_server_pings_and_drops_a_client_that_does_not_pong() -> None:
    async with running(ping_interval_s=0.2, pong_timeout_s=0.7) as server, aiohttp.ClientSession() as session:
        ponging = await connect(f"{server.url}/ws/btcusdt@bookTicker")  # pongs automatically
        pings = 0
        started = asyncio.get_running_loop().time()
        async with session.ws_connect(f"{server.url}/ws", autoping=False) as silent:
            async for message in silent:
                if message.type is aiohttp.WSMsgType.PING:
                    pings += 1  # ... and never answered
            elapsed = asyncio.get_running_loop().time() - started
        assert pings >= 2
        assert 0.6 <= elapsed < 2.0
        assert server.stats.drops["pong_timeout"] == 1
        await receive(ponging, 5)  # the client that pongs is still served
        assert ponging.state is websockets.State.OPEN
        await ponging.close()


async def test_connections_are_closed_at_the_end_of_their_lifetime() -> None:
    async with running(lifetime_s=0.5) as server:
        async with connect(f"{server.url}/ws/btcusdt@trade") as ws:
            elapsed = await closed_within(ws, 3)
        assert 0.4 <= elapsed < 1.5
        assert server.stats.drops["lifetime"] == 1


# --- REST and gaps ----------------------------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def test_skipped_ids_are_gaps_that_rest_fills_exactly() -> None:
    faults = Faults(skip_ids_every=7)
    async with running(faults=faults) as server, aiohttp.ClientSession() as session:
        streams = "btcusdt@trade/btcusdt@aggTrade"
        async with connect(f"{server.url}/stream?streams={streams}") as ws:
            messages = await receive(ws, 400)
        seen: dict[str, list[int]] = defaultdict(list)
        for message in messages:
            data = message["data"]
            seen[message["stream"]].append(data["t"] if data["e"] == "trade" else data["a"])
        for stream, endpoint, id_field in (
            ("btcusdt@trade", "historicalTrades", "id"),
            ("btcusdt@aggTrade", "aggTrades", "a"),
        ):
            ids = seen[stream]
            missing = sorted(set(range(ids[0], ids[-1] + 1)) - set(ids))
            assert missing, f"{stream}: the fault should leave gaps"
            for gap_id in missing:
                url = f"{server.rest_url}/api/v3/{endpoint}?symbol=BTCUSDT&fromId={gap_id}&limit=1"
                status, body = await get_json(session, url)
                assert status == 200
                assert [item[id_field] for item in body] == [gap_id]
        # The REST trades are exactly what the market produced, and match what the WebSocket sent.
        first = seen["btcusdt@trade"][0]
        status, body = await get_json(
            session, f"{server.rest_url}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={first}&limit=1000"
        )
        assert [trade["id"] for trade in body[:50]] == list(range(first, first + 50))
        sent = {m["data"]["t"]: m["data"] for m in messages if m["stream"] == "btcusdt@trade"}
        for trade in body:
            assert trade.keys() == {"id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"}
            if trade["id"] in sent:
                data = sent[trade["id"]]
                assert (trade["price"], trade["qty"], trade["time"], trade["isBuyerMaker"]) == (
                    data["p"],
                    data["q"],
                    data["T"],
                    data["m"],
                )
        assert server.source.history.trade_ids("BTCUSDT")[-1] >= seen["btcusdt@trade"][-1]
        assert server.stats.skipped_ids > 0


async def test_rest_errors_look_like_binance() -> None:
    async with running() as server, aiohttp.ClientSession() as session:
        base = f"{server.rest_url}/api/v3"
        assert await get_json(session, f"{base}/historicalTrades?symbol=NOPEUSDT") == (
            400,
            {"code": -1121, "msg": "Invalid symbol."},
        )
        status, body = await get_json(session, f"{base}/aggTrades")
        assert (status, body["code"]) == (400, -1102)
        status, body = await get_json(session, f"{base}/aggTrades?symbol=BTCUSDT&limit=1001")
        assert (status, body["code"]) == (400, -1130)
        status, body = await get_json(session, f"{base}/historicalTrades?symbol=BTCUSDT&fromId=abc")
        assert (status, body["code"]) == (400, -1100)
        async with connect(f"{server.url}/ws/btcusdt@trade") as ws:
            await receive(ws, 30)  # let the market run
        status, trades = await get_json(session, f"{base}/historicalTrades?symbol=BTCUSDT&limit=5")
        assert status == 200 and len(trades) == 5
        status, aggs = await get_json(session, f"{base}/aggTrades?symbol=BTCUSDT")
        assert status == 200 and 0 < len(aggs) <= 500
        assert aggs[0].keys() == {"a", "p", "q", "f", "l", "T", "m", "M"}
        assert await get_json(session, f"{base}/ping") == (200, {})


# --- faults -----------------------------------------------------------------------------------------------


async def test_malformed_messages_are_injected_and_counted() -> None:
    async with running(faults=Faults(malformed_per_1000=50)) as server:
        async with connect(f"{server.url}/stream?streams={'/'.join(ALL_STREAMS)}") as ws:
            texts = [await asyncio.wait_for(ws.recv(), 5) for _ in range(1000)]
        bad = 0
        for text in texts:
            try:
                message = json.loads(text)
                kind = message["stream"].partition("@")[2]
                check_fields(kind, message["data"])
                if float(message["data"].get("p", 1)) <= 0 or float(message["data"].get("b", 1)) <= 0:
                    raise ValueError("bad price")
                if kind == "bookTicker" and float(message["data"]["b"]) >= float(message["data"]["a"]):
                    raise ValueError("crossed")
            except (ValueError, KeyError, AssertionError):
                bad += 1
        assert 40 <= bad <= 60
        assert server.stats.malformed >= bad


async def test_drop_shutdown_and_stall_on_demand() -> None:
    async with running() as server:
        async with connect(f"{server.url}/ws/btcusdt@bookTicker") as ws:
            await receive(ws, 3)
            assert await server.drop_connections() == 1
            with pytest.raises(websockets.ConnectionClosedError):
                await receive(ws, 10_000)
        async with connect(f"{server.url}/stream?streams=btcusdt@bookTicker") as ws:
            await receive(ws, 3)
            shutdown = asyncio.create_task(server.send_server_shutdown(grace_s=0.2))
            notice = None
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if message.get("e") == "serverShutdown":
                        notice = message
            await shutdown
            assert notice is not None and isinstance(notice["E"], int) and notice.keys() == {"e", "E"}
            assert ws.close_code == 1001
        assert server.stats.drops["server_shutdown"] == 1
        async with connect(f"{server.url}/ws/btcusdt@bookTicker") as ws:
            await receive(ws, 3)
            server.stall(0.6)
            await asyncio.sleep(0.1)
            while True:  # drain what was sent before the stall
                try:
                    await asyncio.wait_for(ws.recv(), 0.2)
                except TimeoutError:
                    break
            loop = asyncio.get_running_loop()
            started = loop.time()
            await receive(ws, 1)
            assert loop.time() - started > 0.2
            assert ws.state is websockets.State.OPEN
        assert server.stats.stalled > 0


async def test_scheduled_shutdown_fault() -> None:
    faults = Faults(shutdown_after_s=0.3, shutdown_grace_s=0.1)
    async with running(faults=faults) as server, connect(f"{server.url}/ws/btcusdt@trade") as ws:
        events = []
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
        # Data goes on during the grace period, as on Binance, then the server closes.
        assert [event for event in events if event["e"] == "serverShutdown"]
        assert ws.close_code == 1001


async def test_scheduled_drops_and_stall() -> None:
    faults = Faults(drop_every_s=0.4, stall_after_s=0.2, stall_for_s=0.5)
    async with running(faults=faults) as server:
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        async with connect(f"{server.url}/ws/btcusdt@bookTicker") as ws:
            with pytest.raises(websockets.ConnectionClosedError):  # a TCP reset, no close frame
                while True:
                    await asyncio.wait_for(ws.recv(), 3)
                    arrivals.append(loop.time())
        # The stall began at 0.2 s and outlasts the drop at 0.4 s: silence, then the reset.
        dropped_at = loop.time()
        assert arrivals and dropped_at - arrivals[-1] > 0.15
        async with connect(f"{server.url}/ws/btcusdt@bookTicker") as ws:
            with pytest.raises(websockets.ConnectionClosedError):
                await receive(ws, 100_000)
        assert server.stats.drops["fault_drop"] >= 2
        assert server.stats.stalled > 0


# --- recordings -------------------------------------------------------------------------------------------


def write_recording(path: Path, timestamps: bool) -> list[dict[str, Any]]:
    """A 2-second recording of two symbols' trades and book tickers (and one stream nobody wants)."""
    items: list[dict[str, Any]] = []
    t0 = 1_767_225_600_000
    for index in range(200):
        ms = t0 + index * 10
        for symbol in ("BTCUSDT", "ETHUSDT"):
            trade = {"e": "trade", "E": ms, "s": symbol, "t": 100 + index, "p": "10.00000000", "q": "1.00000000",
                     "T": ms, "m": index % 2 == 0, "M": True}  # fmt: skip
            items.append({"stream": f"{symbol.lower()}@trade", "data": trade})
        book = {"u": 5 + index, "s": "BTCUSDT", "b": "9.99000000", "B": "1.00000000", "a": "10.01000000",
                "A": "1.00000000"}  # fmt: skip
        items.append({"stream": "btcusdt@bookTicker", "data": book})
    with RecordingWriter(path, timestamps=timestamps) as writer:
        for index, item in enumerate(items):
            writer.write(item, received_ns=t0 * 1_000_000 + index * 3_333_333)
    return items


@pytest.mark.parametrize(("name", "timestamps", "speed"), [("r.jsonl", True, "max"), ("r.jsonl.gz", False, 4)])
async def test_recording_replay_sends_the_subscribed_streams(
    tmp_path: Path, name: str, timestamps: bool, speed: str | int
) -> None:
    items = write_recording(tmp_path / name, timestamps)
    source = RecordingSource(tmp_path / name, speed=speed)
    async with running(source=source) as server:
        wanted = ["btcusdt@trade", "btcusdt@bookTicker"]
        loop = asyncio.get_running_loop()
        async with connect(f"{server.url}/stream?streams={'/'.join(wanted)}") as ws:
            started = loop.time()
            expected = [item for item in items if item["stream"] in wanted]
            assert await receive(ws, len(expected)) == expected
            elapsed = loop.time() - started
            await asyncio.wait_for(server.source_done.wait(), 5)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)
        if speed == "max":
            assert elapsed < 1.0
        else:
            assert 0.3 < elapsed < 1.5  # 2 s of recording at 4x
        async with aiohttp.ClientSession() as session:
            status, body = await get_json(
                session, f"{server.rest_url}/api/v3/historicalTrades?symbol=ETHUSDT&fromId=150"
            )
        assert status == 200 and [trade["id"] for trade in body] == list(range(150, 300))
        assert server.stats.sent["ethusdt@trade"] == 0


# --- the command ------------------------------------------------------------------------------------------


async def test_feed_serve_command_prints_its_port_and_serves() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cryptotui.feed.cli", "serve", "--port", "0", "--simulate", "--rate", "500",
        "--seed", "3", "--symbols", "BTCUSDT,SOLUSDT",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line.startswith("feed server listening on ws://127.0.0.1:")
        url = line.split()[-1]
        async with connect(f"{url}/ws/solusdt@trade") as ws:
            data = await receive(ws, 5)
        assert all(item["s"] == "SOLUSDT" for item in data)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_feed_record_command_records_until_stopped(tmp_path: Path) -> None:
    async with running() as server:

        async def record(out: Path, *extra: str) -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cryptotui.feed.cli", "record", "--url", server.url, "--out", str(out),
                "--symbols", "BTCUSDT", "--streams", "trade,bookTicker", *extra,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip

        stopped_by_signal = await record(tmp_path / "a.jsonl.gz")
        timed = await record(tmp_path / "b.jsonl", "--duration", "1")
        while server.stats.connections_opened < 2:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stopped_by_signal.send_signal(signal.SIGTERM)
        for process in (stopped_by_signal, timed):
            _, stderr = await asyncio.wait_for(process.communicate(), 15)
            assert process.returncode == 0, stderr.decode()
            assert b"recorded" in stderr
    for name in ("a.jsonl.gz", "b.jsonl"):
        recorded = list(read_recording(tmp_path / name, strict=True))
        assert {message.stream for message in recorded} == {"btcusdt@trade", "btcusdt@bookTicker"}
        stamps = [message.received_ns for message in recorded]
        assert None not in stamps and stamps == sorted(stamps)
        ids = [message.data["t"] for message in recorded if message.stream == "btcusdt@trade"]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
