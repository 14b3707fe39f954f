"""WebSocket connections to Binance's combined streams, kept alive by Binance's rules.

`WebSocketClient` is a small RFC 6455 client on an asyncio Protocol. It hands every batch of text
messages that one socket read delivered to a callback, synchronously, with one receive timestamp: no
task, future or coroutine per message, which is what lets one Python process take tens of thousands of
messages per second. It answers pings (at most `MAX_OUTGOING_PER_S` frames per second leave a connection,
pongs and control messages included; Binance counts them all) and never compresses.

`StreamGroup` keeps up to 1024 streams flowing over one connection: exponential backoff with jitter
(1 s to 60 s, reset once a connection has been stable for `STABLE_AFTER_S`), a watchdog (no message for
`watchdog_s` -> reconnect), and replacement before the connection's lifetime ends or when the server
announces `serverShutdown`: the new connection opens while the old one still delivers, takes over once it
delivers itself, and the old one is closed `OVERLAP_S` later. The stage drops what both delivered by id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "MAX_STREAMS_PER_CONNECTION",
    "AttemptLimiter",
    "Backoff",
    "HandshakeError",
    "StreamGroup",
    "WebSocketClient",
    "connect_websocket",
    "split_streams",
    "stream_path",
]

log = logging.getLogger("cryptotui.stages.ingest")

MAX_STREAMS_PER_CONNECTION = 1024
#: Binance closes a connection that sends more than 5 messages per second (pings, pongs, text).
MAX_OUTGOING_PER_S = 5
#: Streams put in the URL; the rest are SUBSCRIBEd (long URLs are refused by some proxies).
MAX_URL_CHARS = 7000
#: Streams per SUBSCRIBE message.
SUBSCRIBE_CHUNK = 200
#: A connection that delivered for this long counts as stable: the backoff starts again at 1 s.
STABLE_AFTER_S = 30.0
#: How long the replaced connection keeps delivering after the new one took over (ids de-duplicate).
OVERLAP_S = 2.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
#: Largest message accepted (Binance's are < 1 kB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Connection attempts per 5 minutes per process (Binance allows 300 per IP).
MAX_ATTEMPTS_PER_5_MIN = 240
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# (connection, texts, receive time ns) -> None: called from data_received, must not block.
OnMessages = Callable[["WebSocketClient", list[str], int], None]
# (connection, raw bytes, receive time ns): a frame that is not UTF-8 text.
OnInvalid = Callable[["WebSocketClient", bytes, int], None]


class HandshakeError(Exception):
    """The server refused the WebSocket upgrade (status, Retry-After seconds if it sent one)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class WebSocketClient(asyncio.Protocol):
    """One client connection. Create with `connect_websocket()`."""

    def __init__(self, host_header: str, path: str, on_messages: OnMessages, on_invalid: OnInvalid,
                 name: str = "ws") -> None:
        self.name = name
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {{key}}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: cryptotui-ingest\r\n\r\n"
        )
        self._key = base64.b64encode(os.urandom(16))
        self._on_messages = on_messages
        self._on_invalid = on_invalid
        self._transport: asyncio.Transport | None = None
        self._handshake_buffer = b""
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0
        self.open = False
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.opened_at = time.monotonic()
        self.last_message_at = self.opened_at
        self.messages = 0
        self.first_message = asyncio.Event()
        self.pings = 0
        self.pongs = 0
        self.server_shutdown = False
        self.attention = asyncio.Event()  # set when the connection needs its group's attention
        self._sent_times: deque[float] = deque()
        self._pending_pong: bytes | None = None
        self._pong_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request.replace("{key}", self._key.decode()).encode())

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._handshake_received(data)
            return
        self._frames_received(data, time.time_ns())

    def eof_received(self) -> bool | None:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("connection closed during the handshake"))
        if self._pong_timer is not None:
            self._pong_timer.cancel()
        if not self.closed.done():
            if exc is not None and not self.close_reason:
                self.close_reason = str(exc) or type(exc).__name__
            self.closed.set_result(None)
        self.attention.set()

    # --- handshake ------------------------------------------------------------------------------------
    def _handshake_received(self, data: bytes) -> None:
        self._handshake_buffer += data
        head, sep, rest = self._handshake_buffer.partition(b"\r\n\r\n")
        if not sep:
            if len(self._handshake_buffer) > 65536:
                self._fail_handshake(HandshakeError("oversized handshake response"))
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail_handshake(HandshakeError(f"not an HTTP response: {lines[0][:100]!r}"))
            return
        if status != 101:
            retry_after = None
            with contextlib.suppress(ValueError):
                retry_after = float(headers.get("retry-after", ""))
            body = rest[:300].decode("utf-8", "replace")
            self._fail_handshake(HandshakeError(f"HTTP {status}: {body}".strip(), status, retry_after))
            return
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected or headers.get("upgrade", "").lower() != "websocket":
            self._fail_handshake(HandshakeError("bad WebSocket upgrade response", status))
            return
        if headers.get("sec-websocket-extensions"):
            self._fail_handshake(HandshakeError("the server enabled an extension that was not offered", status))
            return
        self.open = True
        self._handshake_buffer = b""
        self.opened_at = self.last_message_at = time.monotonic()
        self.handshake.set_result(None)
        if rest:
            self._frames_received(rest, time.time_ns())

    def _fail_handshake(self, error: HandshakeError) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    # --- frames ---------------------------------------------------------------------------------------
    def _frames_received(self, data: bytes, recv_ns: int) -> None:
        if self._buffer:
            data = self._buffer + data
        size = len(data)
        i = 0
        texts: list[str] = []
        append = texts.append
        while size - i >= 2:
            b0 = data[i]
            length = data[i + 1]
            header = 2
            if length & 0x80:
                self._protocol_error(1002, "masked frame from the server")
                return
            if length == 126:
                if size - i < 4:
                    break
                length = (data[i + 2] << 8) | data[i + 3]
                header = 4
            elif length == 127:
                if size - i < 10:
                    break
                length = int.from_bytes(data[i + 2:i + 10], "big")
                header = 10
            if length > MAX_MESSAGE_BYTES:
                self._protocol_error(1009, f"frame of {length} bytes")
                return
            end = i + header + length
            if end > size:
                break
            if b0 == 0x81:  # a whole text message: the usual case
                try:
                    append(data[i + header:end].decode())
                except UnicodeDecodeError:
                    self._on_invalid(self, data[i + header:end], recv_ns)
            else:
                self._other_frame(b0, data[i + header:end], texts, recv_ns)
                if not self.open:
                    return
            i = end
        self._buffer = data[i:] if i < size else b""
        if texts:
            self.messages += len(texts)
            self.last_message_at = time.monotonic()
            if not self.first_message.is_set():
                self.first_message.set()
            try:
                self._on_messages(self, texts, recv_ns)
            except Exception:  # the handler's bug must not take the connection down
                log.exception("%s: the message handler failed", self.name)

    def _other_frame(self, b0: int, payload: bytes, texts: list[str], recv_ns: int) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if b0 & 0x70:
            self._protocol_error(1002, "reserved bits set (no extension was negotiated)")
        elif opcode == 0x9:  # ping
            self.pings += 1
            self._pong(payload)
        elif opcode == 0xA:  # pong
            pass
        elif opcode == 0x8:  # close
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self.close_reason = f"closed by the server ({code} {payload[2:].decode('utf-8', 'replace')})".strip()
            self._send_frame(0x8, payload[:2], count=False)
            self.open = False
            if self._transport is not None:
                self._transport.close()
        elif opcode in (0x1, 0x2):  # first fragment, or a binary message
            if fin:
                self._message_complete(payload, texts, recv_ns)
            else:
                self._fragments = [payload]
                self._fragment_opcode = opcode
        elif opcode == 0x0:  # continuation
            if not self._fragment_opcode:
                self._protocol_error(1002, "continuation without a first fragment")
                return
            self._fragments.append(payload)
            if sum(len(part) for part in self._fragments) > MAX_MESSAGE_BYTES:
                self._protocol_error(1009, "fragmented message too large")
                return
            if fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._fragment_opcode = 0
                self._message_complete(message, texts, recv_ns)
        else:
            self._protocol_error(1002, f"unknown opcode {opcode}")

    def _message_complete(self, payload: bytes, texts: list[str], recv_ns: int) -> None:
        try:
            texts.append(payload.decode())
        except UnicodeDecodeError:
            self._on_invalid(self, payload, recv_ns)

    def _protocol_error(self, code: int, reason: str) -> None:
        log.warning("%s: protocol error: %s", self.name, reason)
        self.close_reason = f"protocol error: {reason}"
        self._send_frame(0x8, code.to_bytes(2, "big"), count=False)
        self.open = False
        if self._transport is not None:
            self._transport.close()

    # --- sending --------------------------------------------------------------------------------------
    def _may_send(self) -> float:
        """0 when a frame may leave now, else the seconds until it may (MAX_OUTGOING_PER_S)."""
        now = time.monotonic()
        times = self._sent_times
        while times and now - times[0] >= 1.0:
            times.popleft()
        if len(times) < MAX_OUTGOING_PER_S:
            return 0.0
        return 1.0 - (now - times[0]) + 0.001

    def _send_frame(self, opcode: int, payload: bytes, count: bool = True) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
        if size:
            repeated = (mask * (size // 4 + 1))[:size]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")
        transport.write(header + mask + payload)
        if count:
            self._sent_times.append(time.monotonic())

    def _pong(self, payload: bytes) -> None:
        """Answer a ping now, or, over the rate limit, answer the latest ping as soon as allowed."""
        wait = self._may_send()
        if wait == 0.0:
            self._send_frame(0xA, payload)
            self.pongs += 1
            return
        self._pending_pong = payload
        if self._pong_timer is None:
            self._pong_timer = asyncio.get_running_loop().call_later(wait, self._send_pending_pong)

    def _send_pending_pong(self) -> None:
        self._pong_timer = None
        if self._pending_pong is not None and self.open:
            payload, self._pending_pong = self._pending_pong, None
            self._pong(payload)

    async def send_text(self, text: str) -> None:
        """Send a control message (SUBSCRIBE...), waiting as long as the rate limit requires."""
        while (wait := self._may_send()) > 0:
            await asyncio.sleep(wait)
        if not self.open:
            raise ConnectionError("the connection is closed")
        self._send_frame(0x1, text.encode())

    async def close(self, code: int = 1000) -> None:
        """Close handshake, bounded by CLOSE_TIMEOUT_S, then the TCP connection."""
        transport = self._transport
        if transport is None:
            return
        if self.open:
            self.open = False
            self._send_frame(0x8, code.to_bytes(2, "big"), count=False)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT_S)
        if not self.closed.done():
            transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), 1.0)

    def abort(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.abort()

    @property
    def age(self) -> float:
        return time.monotonic() - self.opened_at

    @property
    def idle(self) -> float:
        """Seconds since the last data message (or since the connection opened)."""
        return time.monotonic() - self.last_message_at


def stream_path(streams: list[str]) -> tuple[str, list[str]]:
    """The combined-stream path for these streams, and the streams left for SUBSCRIBE messages."""
    in_url: list[str] = []
    length = len("/stream?streams=")
    for index, stream in enumerate(streams):
        if length + len(stream) + 1 > MAX_URL_CHARS and in_url:
            return "/stream?streams=" + "/".join(in_url), streams[index:]
        in_url.append(stream)
        length += len(stream) + 1
    return "/stream?streams=" + "/".join(in_url), []


def split_streams(streams: list[str], per_connection: int = MAX_STREAMS_PER_CONNECTION) -> list[list[str]]:
    """Streams in groups of at most `per_connection`, as even as possible."""
    if not streams:
        return []
    count = -(-len(streams) // per_connection)
    size = -(-len(streams) // count)
    return [streams[i:i + size] for i in range(0, len(streams), size)]


async def connect_websocket(base_url: str, streams: list[str], on_messages: OnMessages, on_invalid: OnInvalid,
                            name: str = "ws", timeout: float = CONNECT_TIMEOUT_S) -> WebSocketClient:
    """Open a combined-stream connection to `base_url` (ws[s]://host[:port]) for these streams."""
    parts = urlsplit(base_url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    default_port = parts.port is None or parts.port == (443 if secure else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    path, rest = stream_path(streams)
    prefix = parts.path.rstrip("/")
    loop = asyncio.get_running_loop()
    ssl_context = ssl.create_default_context() if secure else None

    def factory() -> WebSocketClient:
        return WebSocketClient(host_header, prefix + path, on_messages, on_invalid, name)

    async def open_() -> WebSocketClient:
        _, protocol = await loop.create_connection(factory, host, port, ssl=ssl_context,
                                                   server_hostname=host if secure else None)
        try:
            await protocol.handshake
        except BaseException:
            protocol.abort()
            raise
        return protocol

    client = await asyncio.wait_for(open_(), timeout)
    try:
        for index in range(0, len(rest), SUBSCRIBE_CHUNK):
            request = {"method": "SUBSCRIBE", "params": rest[index:index + SUBSCRIBE_CHUNK],
                       "id": index // SUBSCRIBE_CHUNK + 1}
            await client.send_text(json.dumps(request, separators=(",", ":")))
    except BaseException:
        client.abort()
        raise
    return client


class Backoff:
    """Delays between connection attempts: 1, 2, 4 ... 60 s, each up to 25 % longer (jitter)."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, jitter: float = 0.25,
                 rng: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2 ** min(self.failures, 30))
        self.failures += 1
        return min(self.cap, delay * (1 + self.jitter * self.rng()))

    def reset(self) -> None:
        self.failures = 0


class AttemptLimiter:
    """At most `limit` connection attempts per `window_s`, shared by a process's connections."""

    def __init__(self, limit: int = MAX_ATTEMPTS_PER_5_MIN, window_s: float = 300.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            while self._times and now - self._times[0] >= self.window_s:
                self._times.popleft()
            if len(self._times) < self.limit:
                self._times.append(now)
                return
            wait = self.window_s - (now - self._times[0])
            log.warning("connection attempts at Binance's limit: waiting %.0f s", wait)
            await asyncio.sleep(wait)


class GroupStats:
    """Counters of one StreamGroup."""

    def __init__(self) -> None:
        self.connects = 0
        self.failed_attempts = 0
        self.reconnects = 0  # connections lost and opened again
        self.watchdog = 0
        self.rotations = 0
        self.last_error: str | None = None


class StreamGroup:
    """Keeps one set of (at most 1024) streams flowing over one connection, replacing it as needed."""

    def __init__(
        self,
        index: int,
        base_url: str,
        streams: list[str],
        on_messages: OnMessages,
        on_invalid: OnInvalid,
        watchdog_s: float,
        lifetime_s: float,
        limiter: AttemptLimiter | None = None,
        backoff: Backoff | None = None,
        overlap_s: float = OVERLAP_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.index = index
        self.base_url = base_url
        self.streams = streams
        self._on_messages = on_messages
        self._on_invalid = on_invalid
        self.watchdog_s = watchdog_s
        self.lifetime_s = lifetime_s
        self.limiter = limiter or AttemptLimiter()
        self.backoff = backoff or Backoff()
        self.overlap_s = overlap_s
        self.stable_after_s = stable_after_s
        self.stats = GroupStats()
        self.active: WebSocketClient | None = None
        self.connections: set[WebSocketClient] = set()
        self._serial = 0
        self._closers: set[asyncio.Task[None]] = set()
        self._pings_closed = 0
        self._pongs_closed = 0

    @property
    def overlapping(self) -> bool:
        """Two connections deliver the same streams (a rotation is in progress)."""
        return sum(1 for conn in self.connections if conn.open) > 1

    # --- connections ----------------------------------------------------------------------------------
    async def _open(self) -> WebSocketClient:
        await self.limiter.acquire()
        self._serial += 1
        name = f"ws{self.index}.{self._serial}"
        conn = await connect_websocket(self.base_url, self.streams, self._on_messages, self._on_invalid, name)
        self.connections.add(conn)
        conn.closed.add_done_callback(lambda _: self._forget(conn))
        self.stats.connects += 1
        log.info("%s: connected (%d streams)", name, len(self.streams))
        return conn

    async def _open_with_backoff(self, first_delay: float) -> WebSocketClient:
        delay = first_delay
        while True:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                return await self._open()
            except (OSError, TimeoutError, HandshakeError) as error:
                self.stats.failed_attempts += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                delay = self.backoff.next_delay()
                if isinstance(error, HandshakeError) and error.retry_after:
                    delay = max(delay, error.retry_after)
                log.warning("group %d: cannot connect to %s (%s); retrying in %.1f s",
                            self.index, self.base_url, self.stats.last_error, delay)

    def _forget(self, conn: WebSocketClient) -> None:
        self.connections.discard(conn)
        self._pings_closed += conn.pings
        self._pongs_closed += conn.pongs

    def _close_later(self, conn: WebSocketClient, after_s: float) -> None:
        async def closer() -> None:
            await asyncio.sleep(after_s)
            await conn.close()

        task = asyncio.create_task(closer())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # --- the loop -------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for task in list(self._closers):
                task.cancel()
            conns = list(self.connections)
            if conns:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(
                        asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True), CLOSE_TIMEOUT_S)
                for conn in conns:
                    conn.abort()

    async def _run(self) -> None:
        conn = await self._open_with_backoff(0)
        retry_at = 0.0  # a replacement that failed is tried again from then on
        while True:
            self.active = conn
            why = await self._supervise(conn, retry_at)
            if why in ("lifetime", "shutdown"):
                replacement = await self._replace(conn, why)
                if replacement is not None:
                    conn, retry_at = replacement, 0.0
                    continue
                if not conn.closed.done():  # keep the old one while it delivers; try again later
                    retry_at = time.monotonic() + self.backoff.next_delay()
                    continue
                why = "closed"
            if why == "watchdog":
                self.stats.watchdog += 1
                log.warning("%s: no message for %.1f s: reconnecting", conn.name, conn.idle)
                await conn.close()
            else:
                log.warning("%s: connection lost (%s) after %.1f s", conn.name, conn.close_reason or "closed",
                            conn.age)
            self.stats.reconnects += 1
            self.active = None
            retry_at = 0.0
            conn = await self._open_with_backoff(self.backoff.next_delay())

    async def _supervise(self, conn: WebSocketClient, retry_at: float) -> str:
        """Wait until `conn` must be replaced: closed | watchdog | lifetime | shutdown."""
        tick = max(0.05, min(1.0, self.watchdog_s / 4))
        while True:
            if conn.closed.done():
                return "closed"
            if time.monotonic() >= retry_at:
                if conn.server_shutdown:
                    return "shutdown"
                if conn.age >= self.lifetime_s:
                    return "lifetime"
            if conn.messages and conn.age >= self.stable_after_s and self.backoff.failures:
                self.backoff.reset()
            if conn.idle >= self.watchdog_s:
                return "watchdog"
            conn.attention.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.attention.wait(), tick)

    async def _replace(self, old: WebSocketClient, why: str) -> WebSocketClient | None:
        """Open a new connection while `old` still delivers; switch once the new one delivers."""
        if why == "shutdown":
            log.info("%s: the server announced a shutdown: replacing the connection", old.name)
        else:
            log.info("%s: replacing the connection before its lifetime ends (%.0f s)", old.name, old.age)
        try:
            new = await self._open()
        except (OSError, TimeoutError, HandshakeError) as error:
            self.stats.failed_attempts += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            log.warning("%s: cannot open its replacement (%s)", old.name, error)
            return None
        delivered = asyncio.create_task(new.first_message.wait())
        try:
            await asyncio.wait({delivered, new.closed}, timeout=self.watchdog_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            delivered.cancel()
        if not new.first_message.is_set():
            log.warning("%s: its replacement %s delivered nothing within %.1f s", old.name, new.name,
                        self.watchdog_s)
            await new.close()
            return None
        self.stats.rotations += 1
        log.info("%s: took over from %s", new.name, old.name)
        self._close_later(old, self.overlap_s)
        return new

    def status(self) -> dict[str, Any]:
        active = self.active
        return {
            "streams": len(self.streams),
            "connection": active.name if active else None,
            "connected_s": round(active.age, 1) if active and active.open else None,
            "open_connections": sum(1 for conn in self.connections if conn.open),
            "pings": self._pings_closed + sum(conn.pings for conn in self.connections),
            "pongs": self._pongs_closed + sum(conn.pongs for conn in self.connections),
        }
