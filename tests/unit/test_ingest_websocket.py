"""The ingest WebSocket client's protocol handling, fed bytes directly (no network)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from typing import Any

import pytest

from cryptotui.stages.ingest.connection import HandshakeError, WebSocketClient

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return bytes((first, 126)) + struct.pack("!H", size) + payload
    return bytes((first, 127)) + struct.pack("!Q", size) + payload


def unmask(data: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of a client frame, checking it is masked."""
    assert data[1] & 0x80, "client frames must be masked"
    size = data[1] & 0x7F
    mask, payload = data[2:6], data[6:6 + size]
    return data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Harness:
    def __init__(self) -> None:
        self.batches: list[tuple[list[str], int]] = []
        self.invalid: list[bytes] = []
        self.client = WebSocketClient("example.com", "/stream?streams=btcusdt@trade",
                                      lambda conn, texts, ns: self.batches.append((list(texts), ns)),
                                      lambda conn, raw, ns: self.invalid.append(raw))
        self.transport = FakeTransport()
        self.client.connection_made(self.transport)

    def accept(self, extra: bytes = b"") -> None:
        request = self.transport.written[0].decode()
        key = next(line.split(": ", 1)[1] for line in request.split("\r\n") if line.startswith("Sec-WebSocket-Key"))
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        self.client.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n" + extra)

    @property
    def texts(self) -> list[str]:
        return [text for batch, _ in self.batches for text in batch]


async def test_handshake_then_frames_split_anywhere_are_reassembled() -> None:
    h = Harness()
    request = h.transport.written[0].decode()
    assert request.startswith("GET /stream?streams=btcusdt@trade HTTP/1.1\r\nHost: example.com\r\n")
    assert "Sec-WebSocket-Extensions" not in request  # never compressed
    messages = [b'{"a":1}', b"x" * 300, "é€".encode(), b"y" * 70000]
    data = b"".join(frame(m) for m in messages)
    h.accept(data[:3])
    for i in range(3, len(data), 7):
        h.client.data_received(data[i:i + 7])
    assert h.client.handshake.done() and h.client.open
    assert h.texts == [m.decode() for m in messages]
    assert h.client.messages == 4 and h.client.first_message.is_set()


async def test_a_batch_of_one_read_shares_one_receive_time() -> None:
    h = Harness()
    h.accept()
    h.client.data_received(frame(b"1") + frame(b"2") + frame(b"3"))
    assert len(h.batches) == 1 and h.batches[0][0] == ["1", "2", "3"]


async def test_fragmented_and_binary_messages() -> None:
    h = Harness()
    h.accept()
    h.client.data_received(frame(b'{"a":', fin=False) + frame(b"9", opcode=0x9) + frame(b"1}", opcode=0x0))
    h.client.data_received(frame(b'{"b":2}', opcode=0x2))
    assert h.texts == ['{"a":1}', '{"b":2}']
    assert h.client.pings == 1


async def test_pings_get_masked_pongs_with_the_same_payload_within_5_per_second() -> None:
    h = Harness()
    h.accept()
    for n in range(8):
        h.client.data_received(frame(f"p{n}".encode(), opcode=0x9))
    pongs = [unmask(data) for data in h.transport.written[1:]]
    assert pongs == [(0xA, f"p{n}".encode()) for n in range(5)]  # the rest wait for the rate limit
    await asyncio.sleep(1.1)
    assert unmask(h.transport.written[-1]) == (0xA, b"p7")  # only the latest ping is answered late
    assert len(h.transport.written) == 7


async def test_invalid_utf8_is_reported_not_fatal() -> None:
    h = Harness()
    h.accept()
    h.client.data_received(frame(b"\xff\xfe") + frame(b"ok"))
    assert h.invalid == [b"\xff\xfe"] and h.texts == ["ok"]


async def test_close_frame_is_answered_and_the_reason_kept() -> None:
    h = Harness()
    h.accept()
    h.client.data_received(frame(struct.pack("!H", 1001) + b"going away", opcode=0x8))
    assert unmask(h.transport.written[-1]) == (0x8, struct.pack("!H", 1001))
    assert h.transport.closed and not h.client.open
    assert "1001 going away" in h.client.close_reason


async def test_masked_server_frames_are_a_protocol_error() -> None:
    h = Harness()
    h.accept()
    h.client.data_received(bytes((0x81, 0x81)) + b"abcd" + b"x")
    assert h.transport.closed and "masked" in h.client.close_reason


@pytest.mark.parametrize(("response", "status", "retry_after"), [
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\n\r\n", 429, 7.0),
    (b"HTTP/1.1 418 I'm a teapot\r\nRetry-After: 120\r\n\r\nbanned", 418, 120.0),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n{\"code\":2}", 400, None),
])
async def test_refused_upgrades_carry_status_and_retry_after(response: bytes, status: int,
                                                            retry_after: float | None) -> None:
    h = Harness()
    h.client.data_received(response)
    with pytest.raises(HandshakeError) as caught:
        await h.client.handshake
    assert (caught.value.status, caught.value.retry_after) == (status, retry_after)
    assert h.transport.aborted


async def test_a_wrong_accept_key_is_refused() -> None:
    h = Harness()
    h.client.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Sec-WebSocket-Accept: nope\r\n\r\n")
    with pytest.raises(HandshakeError, match="bad WebSocket upgrade"):
        await h.client.handshake
