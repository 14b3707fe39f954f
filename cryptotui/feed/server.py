"""A local server speaking Binance's spot market-stream protocol, WebSocket and REST on one port.

WebSocket: `/stream?streams=a/b` (combined payloads), `/ws/<stream>` and `/ws` (raw payloads), live
SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS / SET_PROPERTY / GET_PROPERTY, Binance's limits (5 incoming
messages per second, 1024 streams per connection, pings, pong timeout, connection lifetime).
REST: `/api/v3/historicalTrades`, `/api/v3/trades`, `/api/v3/aggTrades`, `/api/v3/ping`, `/api/v3/time`.

Messages flow source -> `_emit` (per-message faults, stall) -> one bounded queue per connection -> that
connection's writer task. The queues decouple clients: a slow client cannot hold up the others (a paced
source drops it once its backlog is too long) while at speed `max` the slowest client sets the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

from aiohttp import WSMsgType, web

from cryptotui.feed.faults import Faults, MessageFaults
from cryptotui.feed.source import AggTradeRecord, Event, FeedSource, MarketHistory, TradeRecord, is_valid_stream

__all__ = [
    "ControlError",
    "ControlRequest",
    "FeedServer",
    "FeedServerConfig",
    "FeedStats",
    "parse_control",
]

log = logging.getLogger("cryptotui.feed")

CONTROL_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_ID_TEXT_RE = re.compile(r"^[A-Za-z0-9_-]{0,36}$")
_SYMBOL_RE = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
_EIGHT_DECIMALS = Decimal("0.00000001")
#: Longest request line accepted.
MAX_URL_BYTES = 64 * 1024
#: A connection's writer pauses while its socket buffer holds more than this (a slow reader).
SEND_BUFFER_HIGH = 512 * 1024
_SMALL_HEADERS = [bytes((0x81, size)) for size in range(126)]
_MEDIUM_HEADER = struct.Struct("!BBH")
_LARGE_HEADER = struct.Struct("!BBQ")
#: Batches a connection may have queued at speed `max` before the source waits for it.
UNPACED_QUEUE_BATCHES = 4


@dataclass
class FeedServerConfig:
    """Where to listen and the per-connection limits (Binance's values by default)."""

    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (read it from `FeedServer.port`)."""
    ping_interval_s: float = 20.0
    pong_timeout_s: float = 60.0
    """A connection whose last pong answering one of our pings is older than this is closed."""
    lifetime_s: float = 86_400.0
    """Connections are closed this long after they opened."""
    max_incoming_per_s: int = 5
    """More incoming messages (text, ping, pong frames) than this within one second close the connection."""
    max_streams: int = 1024
    """Streams one connection may subscribe to."""
    start_source_on_subscribe: bool = True
    """Start the source when a first connection subscribes (a replay then starts with its listener);
    False starts it with the server."""
    max_queued_batches: int = 500
    """With a paced source, a connection this many batches (~10 ms each) behind is dropped as too slow."""
    close_timeout_s: float = 2.0
    """How long a close handshake may take before the TCP connection is cut."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")
        for name in ("ping_interval_s", "pong_timeout_s", "lifetime_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_incoming_per_s < 1 or self.max_streams < 1 or self.max_queued_batches < 1:
            raise ValueError("max_incoming_per_s, max_streams and max_queued_batches must be >= 1")


@dataclass
class FeedStats:
    """What the server did; `sent` counts messages per stream summed over connections."""

    sent: Counter[str] = field(default_factory=Counter)
    generated: int = 0
    malformed: int = 0
    skipped_ids: int = 0
    stalled: int = 0
    connections_opened: int = 0
    connections_open: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    """Connections the server closed, by reason: pong_timeout, lifetime, rate_limit, slow_consumer,
    fault_drop, server_shutdown."""
    control_requests: int = 0

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": dict(self.sent),
            "total_sent": self.total_sent,
            "generated": self.generated,
            "malformed": self.malformed,
            "skipped_ids": self.skipped_ids,
            "stalled": self.stalled,
            "connections_opened": self.connections_opened,
            "connections_open": self.connections_open,
            "drops": dict(self.drops),
            "control_requests": self.control_requests,
        }


# --- control messages -------------------------------------------------------------------------------------


class ControlError(Exception):
    """A request Binance would answer with `{"error":{"code":..,"msg":..},"id":..}`."""

    def __init__(self, code: int, msg: str, request_id: int | str | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.request_id = request_id

    def reply(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "msg": self.msg}, "id": self.request_id}


@dataclass(frozen=True)
class ControlRequest:
    method: str
    params: list[Any]
    id: int | str | None


def _json_type(value: Any) -> str:
    """How serde names a JSON value in its errors: `string "x"`, `integer `1``, `map`..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    return "sequence" if isinstance(value, list) else "map"


def _valid_id(value: Any) -> bool:
    # Binance accepts a 64-bit signed integer, an alphanumeric string of at most 36 characters, or null.
    if value is None:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and _ID_TEXT_RE.match(value) is not None


def parse_control(text: str) -> ControlRequest:
    """Validate a control message like Binance does; raises ControlError with Binance's code and wording."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        reason = "expected value" if exc.msg == "Expecting value" else exc.msg[0].lower() + exc.msg[1:]
        raise ControlError(3, f"Invalid JSON: {reason} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(message, dict):
        raise ControlError(2, f"Invalid request: invalid type: {_json_type(message)}, expected a request object")
    request_id = message.get("id")
    if "id" not in message or not _valid_id(request_id):
        raise ControlError(2, "Invalid request: request ID must be an unsigned integer")
    if "method" not in message:
        raise ControlError(2, "Invalid request: missing field `method`", request_id)
    method = message["method"]
    if method not in CONTROL_METHODS:
        expected = ", ".join(f"`{name}`" for name in CONTROL_METHODS)
        shown = method if isinstance(method, str) else json.dumps(method)
        raise ControlError(2, f"Invalid request: unknown variant `{shown}`, expected one of {expected}", request_id)
    params = message.get("params", [])
    if params is None:
        params = []
    if not isinstance(params, list):
        raise ControlError(2, f"Invalid request: invalid type: {_json_type(params)}, expected a sequence", request_id)
    return ControlRequest(method, params, request_id)


# --- connections ----------------------------------------------------------------------------------------


class _Connection:
    """State of one WebSocket client."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, combined: bool, now: float) -> None:
        self.ws = ws
        self.transport = request.transport
        self.peer = request.remote or "?"
        self.combined = combined
        self.subscriptions: dict[str, None] = {}  # an ordered set: LIST_SUBSCRIPTIONS keeps the order
        self.opened_at = now
        self.last_alive = now
        self.next_ping = now  # set by the server to the first ping time
        self.pending_pings: deque[bytes] = deque(maxlen=64)
        self.incoming: deque[float] = deque()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.closing = False
        self.handshaking = False  # a close handshake is in progress
        self.closed = asyncio.Event()  # set when that handshake is over

    def allow_incoming(self, now: float, limit: int) -> bool:
        """Count one incoming frame; False when more than `limit` arrived within the last second."""
        incoming = self.incoming
        while incoming and now - incoming[0] >= 1.0:
            incoming.popleft()
        incoming.append(now)
        return len(incoming) <= limit

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def discard_queue(self) -> None:
        """Empty the queue so a source blocked on a full queue goes on."""
        while not self.queue.empty():
            self.queue.get_nowait()


# --- the server -----------------------------------------------------------------------------------------


class FeedServer:
    """The feed server. `await start()`, then `url`/`port`; `await stop()` (or `async with`)."""

    def __init__(
        self,
        config: FeedServerConfig | None = None,
        source: FeedSource | None = None,
        faults: Faults | None = None,
    ) -> None:
        if source is None:
            from cryptotui.feed.simulate import SimulatedMarket

            source = SimulatedMarket()
        self.config = config or FeedServerConfig()
        self.source = source
        self.faults = faults or Faults()
        self.stats = FeedStats()
        self.source_done = asyncio.Event()
        """Set when the source has ended (a replay reached the end of its recording) or failed."""
        self.source_error: BaseException | None = None
        self._message_faults = MessageFaults(self.faults) if self.faults.alters_messages else None
        self._connections: set[_Connection] = set()
        self._listening = asyncio.Event()  # some connection has subscriptions
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stall_until = 0.0

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """WebSocket base URL, e.g. ws://127.0.0.1:PORT (add /stream?streams=... or /ws/<stream>)."""
        return f"ws://{self._url_host()}:{self.port}"

    @property
    def rest_url(self) -> str:
        """REST base URL, e.g. http://127.0.0.1:PORT (add /api/v3/...)."""
        return f"http://{self._url_host()}:{self.port}"

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    @property
    def history(self) -> MarketHistory:
        """Every trade and aggTrade the source produced (bounded), as the REST endpoints serve them."""
        return self.source.history

    def _url_host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the server is already started")
        app = web.Application()
        app.router.add_get("/stream", self._handle_combined)
        app.router.add_get("/ws", self._handle_raw)
        app.router.add_get("/ws/{streams:.+}", self._handle_raw)
        app.router.add_get("/api/v3/historicalTrades", self._handle_historical_trades)
        app.router.add_get("/api/v3/trades", self._handle_recent_trades)
        app.router.add_get("/api/v3/aggTrades", self._handle_agg_trades)
        app.router.add_get("/api/v3/ping", self._handle_ping)
        app.router.add_get("/api/v3/time", self._handle_time)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            max_line_size=MAX_URL_BYTES,  # 1024 stream names in a combined-stream URL are ~30 kB
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._schedule_faults()
        if not self.config.start_source_on_subscribe:
            self._start_source()
        log.info("feed server listening on %s", self.url)

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the source, let clients receive what is queued for them (at most `flush_timeout_s`),
        then close every connection (1001 going away) and the listener."""
        if self._runner is None:
            return
        background = [*self._tasks, *([self._pump] if self._pump else [])]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._flush(flush_timeout_s)
        await asyncio.gather(
            *(self._close(conn, 1001, "server stopping", None) for conn in list(self._connections)),
            return_exceptions=True,
        )
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def _flush(self, timeout_s: float) -> None:
        """Wait until no open connection has batches queued: a replay's last messages reach the client."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and any(not conn.closing and not conn.queue.empty() for conn in self._connections):
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> FeedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- faults on demand -----------------------------------------------------------------------------

    async def drop_connections(self, abrupt: bool = True) -> int:
        """Close every client connection: abrupt = TCP reset without a close frame. Returns how many."""
        victims = list(self._connections)
        self.stats.drops["fault_drop"] += len(victims)
        if abrupt:
            for conn in victims:
                conn.abort()
        else:
            await asyncio.gather(*(self._close(conn, 1001, "dropped", None) for conn in victims))
        return len(victims)

    async def send_server_shutdown(self, grace_s: float | None = None) -> int:
        """Send `{"e":"serverShutdown","E":ms}` on every connection, then close them after `grace_s`."""
        victims = list(self._connections)
        notice = f'{{"e":"serverShutdown","E":{int(time.time() * 1000)}}}'
        for conn in victims:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.ws.send_str(notice)
        await asyncio.sleep(self.faults.shutdown_grace_s if grace_s is None else grace_s)
        await asyncio.gather(*(self._close(conn, 1001, "server shutdown", "server_shutdown") for conn in victims))
        return len(victims)

    def stall(self, seconds: float) -> None:
        """Send no data for `seconds` (the market goes on: the trades missed are in the REST history)."""
        self._stall_until = asyncio.get_running_loop().time() + seconds

    @property
    def stalled(self) -> bool:
        return asyncio.get_running_loop().time() < self._stall_until

    def _schedule_faults(self) -> None:
        faults = self.faults
        if faults.drop_every_s:
            self._spawn(self._drop_periodically(faults.drop_every_s))
        if faults.stall_after_s:
            self._spawn(self._after(faults.stall_after_s, self._stall_now))
        if faults.shutdown_after_s:
            self._spawn(self._after(faults.shutdown_after_s, self.send_server_shutdown))

    async def _stall_now(self) -> None:
        log.info("stalling for %.1f s", self.faults.stall_for_s)
        self.stall(self.faults.stall_for_s)

    async def _drop_periodically(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            count = await self.drop_connections(abrupt=self.faults.drop_abrupt)
            log.info("dropped %d connection(s)", count)

    @staticmethod
    async def _after(delay_s: float, action: Any) -> None:
        await asyncio.sleep(delay_s)
        await action()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- source -> connections ------------------------------------------------------------------------

    def _start_source(self) -> None:
        if self._pump is None:
            self._pump = asyncio.create_task(self._run_source(), name="feed-source")

    async def _run_source(self) -> None:
        try:
            await self.source.run(self._emit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.source_error = exc
            log.exception("the feed source failed")
        finally:
            self.source_done.set()

    async def _emit(self, batch: list[Event]) -> None:
        stats = self.stats
        stats.generated += len(batch)
        faults = self._message_faults
        if faults is not None:
            batch = faults.apply(batch)
            stats.malformed = faults.malformed
            stats.skipped_ids = faults.skipped
        if self._stall_until and self.stalled:
            stats.stalled += len(batch)
            return
        paced = self.source.paced
        if not paced:
            # At speed max nobody listening means nothing to wait for: pause instead of spinning.
            await self._listening.wait()
        for conn in list(self._connections):
            if conn.closing or not conn.subscriptions:
                continue
            if paced:
                if conn.queue.qsize() >= self.config.max_queued_batches:
                    log.warning("dropping slow client %s (%d batches behind)", conn.peer, conn.queue.qsize())
                    self.stats.drops["slow_consumer"] += 1
                    conn.discard_queue()
                    conn.abort()
                    continue
                conn.queue.put_nowait(batch)
            else:
                await conn.queue.put(batch)

    async def _write_loop(self, conn: _Connection) -> None:
        """Send each queued batch's subscribed messages: one frame per message, like Binance.

        A batch's frames go to the socket in one write: per-message `send_str` calls (each a
        coroutine and a send attempt) cost several times more CPU at tens of thousands of messages
        per second.
        """
        transport = conn.transport
        ws = conn.ws
        sent = self.stats.sent
        queue = conn.queue
        try:
            while True:
                batch = await queue.get()
                subscriptions = conn.subscriptions
                wanted = [event for event in batch if event.stream in subscriptions]
                if not wanted:
                    continue
                texts = [event.combined for event in wanted] if conn.combined else [event.payload for event in wanted]
                if ws.closed or conn.closing:
                    return  # a close frame went out: nothing may follow it
                if transport is None:
                    for text in texts:
                        await ws.send_str(text)
                else:
                    transport.write(_text_frames(texts))
                for event in wanted:
                    sent[event.stream] += 1
                if transport is not None:
                    await _wait_for_room(transport)
        except (ConnectionError, RuntimeError):
            conn.closing = True
            conn.discard_queue()

    def _update_listening(self) -> None:
        if any(conn.subscriptions and not conn.closing for conn in self._connections):
            self._listening.set()
            if self.config.start_source_on_subscribe:
                self._start_source()
        else:
            self._listening.clear()

    # --- WebSocket connections ------------------------------------------------------------------------

    async def _handle_combined(self, request: web.Request) -> web.StreamResponse:
        streams = [name for name in request.query.get("streams", "").split("/") if name]
        return await self._serve(request, streams, combined=True)

    async def _handle_raw(self, request: web.Request) -> web.StreamResponse:
        streams = [name for name in request.match_info.get("streams", "").split("/") if name]
        return await self._serve(request, streams, combined=False)

    async def _serve(self, request: web.Request, streams: list[str], combined: bool) -> web.StreamResponse:
        problem = self._check_streams(streams)
        if problem is not None:
            return _json_response({"code": 2, "msg": f"Invalid request: {problem}"}, status=400)
        ws = web.WebSocketResponse(
            autoping=False,  # pings and pongs count toward the incoming-message limit, so we see them
            compress=False,  # Binance does not compress; per-message deflate would cost more than it saves
            max_msg_size=64 * 1024,
            timeout=self.config.close_timeout_s,
        )
        await ws.prepare(request)
        loop = asyncio.get_running_loop()
        conn = _Connection(ws, request, combined, loop.time())
        conn.next_ping = conn.opened_at + self.config.ping_interval_s
        if not self.source.paced:
            conn.queue = asyncio.Queue(maxsize=UNPACED_QUEUE_BATCHES)
        conn.subscriptions.update(dict.fromkeys(streams))
        self._connections.add(conn)
        self.stats.connections_opened += 1
        self.stats.connections_open = len(self._connections)
        self._update_listening()
        writer = asyncio.create_task(self._write_loop(conn), name="feed-writer")
        keeper = asyncio.create_task(self._keep_alive(conn), name="feed-keepalive")
        try:
            await self._read_loop(conn)
        finally:
            conn.closing = True
            self._connections.discard(conn)
            self.stats.connections_open = len(self._connections)
            self._update_listening()
            conn.discard_queue()
            writer.cancel()
            if conn.handshaking:
                # A close handshake started by another task is still running: let it finish.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.closed.wait(), self.config.close_timeout_s + 1)
            keeper.cancel()
            await asyncio.gather(writer, keeper, return_exceptions=True)
        return ws

    async def _read_loop(self, conn: _Connection) -> None:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        limit = self.config.max_incoming_per_s
        async for message in ws:
            if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
            if not conn.allow_incoming(loop.time(), limit):
                log.info("closing %s: more than %d incoming messages per second", conn.peer, limit)
                await self._close(conn, 1008, "Too many requests", "rate_limit")
                break
            if message.type is WSMsgType.TEXT:
                await self._answer(conn, message.data)
            elif message.type is WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type is WSMsgType.PONG:
                # Only a pong echoing one of our pings proves the client alive (unsolicited ones do not).
                if message.data in conn.pending_pings:
                    conn.pending_pings.clear()
                    conn.last_alive = loop.time()
            elif message.type is WSMsgType.BINARY:
                await ws.send_str(json.dumps(ControlError(3, "Invalid JSON: expected a text frame").reply()))

    async def _keep_alive(self, conn: _Connection) -> None:
        """Ping every ping_interval_s; close on pong timeout and at the end of the connection's lifetime."""
        config = self.config
        loop = asyncio.get_running_loop()
        while not conn.closing:
            now = loop.time()
            if now - conn.opened_at >= config.lifetime_s:
                await self._close(conn, 1000, "connection lifetime exceeded", "lifetime")
                return
            if now - conn.last_alive >= config.pong_timeout_s:
                log.info("closing %s: no pong for %.1f s", conn.peer, now - conn.last_alive)
                await self._close(conn, 1008, "pong timeout", "pong_timeout")
                return
            if now >= conn.next_ping:
                payload = str(int(time.time() * 1000)).encode()
                conn.pending_pings.append(payload)
                conn.next_ping = now + config.ping_interval_s
                try:
                    await conn.ws.ping(payload)
                except (ConnectionError, RuntimeError):
                    return
            wake = min(conn.next_ping, conn.opened_at + config.lifetime_s, conn.last_alive + config.pong_timeout_s)
            await asyncio.sleep(max(0.001, wake - loop.time()))

    async def _close(self, conn: _Connection, code: int, message: str, reason: str | None) -> None:
        """Close handshake bounded by close_timeout_s; the TCP connection is cut when it takes longer."""
        if conn.closing and reason is not None:
            return
        conn.closing = True
        conn.handshaking = True
        if reason is not None:
            self.stats.drops[reason] += 1
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=message.encode()), self.config.close_timeout_s)
        except (TimeoutError, ConnectionError, RuntimeError):
            conn.abort()
        finally:
            conn.discard_queue()
            conn.closed.set()

    # --- control messages -----------------------------------------------------------------------------

    async def _answer(self, conn: _Connection, text: str) -> None:
        self.stats.control_requests += 1
        try:
            request = parse_control(text)
            reply: dict[str, Any] = {"result": self._execute(conn, request), "id": request.id}
        except ControlError as error:
            reply = error.reply()
        try:
            await conn.ws.send_str(json.dumps(reply, separators=(",", ":")))
        except (ConnectionError, RuntimeError):
            conn.closing = True

    def _execute(self, conn: _Connection, request: ControlRequest) -> Any:
        method, params, request_id = request.method, request.params, request.id
        if method == "LIST_SUBSCRIPTIONS":
            return list(conn.subscriptions)
        if method == "SET_PROPERTY":
            name, value = self._property_params(params, request_id, expected=2)
            if not isinstance(value, bool):
                raise ControlError(1, "Invalid value type: expected Boolean", request_id)
            conn.combined = value
            return None
        if method == "GET_PROPERTY":
            self._property_params(params, request_id, expected=1)
            return conn.combined
        for name in params:
            if not isinstance(name, str):
                reason = f"Invalid request: invalid type: {_json_type(name)}, expected a string"
                raise ControlError(2, reason, request_id)
        problem = self._check_streams(params)
        if problem is not None:
            raise ControlError(2, f"Invalid request: {problem}", request_id)
        if method == "SUBSCRIBE":
            added = [name for name in params if name not in conn.subscriptions]
            if len(conn.subscriptions) + len(set(added)) > self.config.max_streams:
                raise ControlError(
                    2,
                    f"Invalid request: too many streams (at most {self.config.max_streams} per connection)",
                    request_id,
                )
            conn.subscriptions.update(dict.fromkeys(added))
        else:
            for name in params:
                conn.subscriptions.pop(name, None)
        self._update_listening()
        return None

    @staticmethod
    def _property_params(params: list[Any], request_id: int | str | None, expected: int) -> list[Any]:
        if len(params) > expected:
            raise ControlError(2, "Invalid request: too many parameters", request_id)
        if len(params) < expected or not isinstance(params[0], str):
            raise ControlError(2, "Invalid request: property name must be a string", request_id)
        if params[0] != "combined":
            raise ControlError(0, "Unknown property", request_id)
        return params

    def _check_streams(self, streams: Sequence[str]) -> str | None:
        """Why these stream names cannot be subscribed, or None."""
        if len(set(streams)) > self.config.max_streams:
            return f"too many streams (at most {self.config.max_streams} per connection)"
        for name in streams:
            if not is_valid_stream(name):
                return f"invalid stream name `{name}` (expected <lowercase symbol>@trade, @aggTrade or @bookTicker)"
        return None

    # --- REST -----------------------------------------------------------------------------------------

    async def _handle_ping(self, request: web.Request) -> web.Response:
        return _json_response({})

    async def _handle_time(self, request: web.Request) -> web.Response:
        return _json_response({"serverTime": int(time.time() * 1000)})

    async def _handle_historical_trades(self, request: web.Request) -> web.Response:
        try:
            symbol = self._symbol_param(request)
            limit = _limit_param(request)
            from_id = _int_param(request, "fromId")
        except _RestError as error:
            return error.response()
        trades = self.source.history.trades_from(symbol, from_id, limit)
        return _json_response([_trade_json(trade) for trade in trades])

    async def _handle_recent_trades(self, request: web.Request) -> web.Response:
        try:
            symbol = self._symbol_param(request)
            limit = _limit_param(request)
        except _RestError as error:
            return error.response()
        trades = self.source.history.trades_from(symbol, None, limit)
        return _json_response([_trade_json(trade) for trade in trades])

    async def _handle_agg_trades(self, request: web.Request) -> web.Response:
        try:
            symbol = self._symbol_param(request)
            limit = _limit_param(request)
            from_id = _int_param(request, "fromId")
            start_ms = _int_param(request, "startTime")
            end_ms = _int_param(request, "endTime")
            if start_ms is not None and end_ms is not None and end_ms - start_ms > 3_600_000:
                raise _RestError(-1127, "More than 1 hours between startTime and endTime.")
        except _RestError as error:
            return error.response()
        aggs = self.source.history.agg_trades_from(symbol, from_id, limit, start_ms, end_ms)
        return _json_response([_agg_json(agg) for agg in aggs])

    def _symbol_param(self, request: web.Request) -> str:
        symbol = request.query.get("symbol", "")
        if not symbol:
            raise _RestError(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if not _SYMBOL_RE.match(symbol):
            raise _RestError(
                -1100, "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
            )
        if symbol not in self.source.symbols and symbol not in self.source.history.symbols():
            raise _RestError(-1121, "Invalid symbol.")
        return symbol


class _RestError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status

    def response(self) -> web.Response:
        return _json_response({"code": self.code, "msg": self.msg}, status=self.status)


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        raise _RestError(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")
    return int(raw)


def _limit_param(request: web.Request) -> int:
    limit = _int_param(request, "limit")
    if limit is None:
        return 500
    if not 1 <= limit <= 1000:
        raise _RestError(-1130, "Data sent for parameter 'limit' is not valid.")
    return limit


def _trade_json(trade: TradeRecord) -> dict[str, Any]:
    quote = (Decimal(trade.price) * Decimal(trade.qty)).quantize(_EIGHT_DECIMALS, rounding=ROUND_DOWN)
    return {
        "id": trade.id,
        "price": trade.price,
        "qty": trade.qty,
        "quoteQty": f"{quote:f}",
        "time": trade.time,
        "isBuyerMaker": trade.is_buyer_maker,
        "isBestMatch": True,
    }


def _agg_json(agg: AggTradeRecord) -> dict[str, Any]:
    return {
        "a": agg.id,
        "p": agg.price,
        "q": agg.qty,
        "f": agg.first_id,
        "l": agg.last_id,
        "T": agg.time,
        "m": agg.is_buyer_maker,
        "M": True,
    }


def _text_frames(texts: list[str]) -> bytes:
    """Server-to-client WebSocket text frames (FIN set, unmasked, uncompressed), concatenated."""
    parts: list[bytes] = []
    append = parts.append
    for text in texts:
        data = text.encode()
        size = len(data)
        if size < 126:
            append(_SMALL_HEADERS[size])
        elif size < 65536:
            append(_MEDIUM_HEADER.pack(0x81, 126, size))
        else:
            append(_LARGE_HEADER.pack(0x81, 127, size))
        append(data)
    return b"".join(parts)


async def _wait_for_room(transport: asyncio.BaseTransport) -> None:
    """Back-pressure: wait while the socket's send buffer holds more than SEND_BUFFER_HIGH bytes."""
    get_size = getattr(transport, "get_write_buffer_size", None)
    if get_size is None:
        return
    while get_size() > SEND_BUFFER_HIGH and not transport.is_closing():
        await asyncio.sleep(0.002)


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, separators=(",", ":")), status=status, content_type="application/json")
