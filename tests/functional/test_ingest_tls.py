"""Ingest over `wss://`, as against live Binance: real TLS through a local TLS-terminating proxy.

The live endpoint cannot be reached from tests, so a throwaway certificate authority signs a
certificate for 127.0.0.1, the stage trusts it through SSL_CERT_FILE (read by OpenSSL's default
verify paths), and a proxy on loopback terminates TLS in front of the feed server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cryptotui.config import Settings
from tests.functional.test_ingest import assert_complete, feed_server, ingest, market_messages, settled, until

pytestmark = pytest.mark.timeout(120)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1, made with the openssl CLI."""
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    key, csr, cert, ext = folder / "server.key", folder / "server.csr", folder / "server.pem", folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
            "-days", "1", "-subj", "/CN=cryptotui test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return ca_cert, cert, key


@contextlib.asynccontextmanager
async def tls_proxy(cert: Path, key: Path, target_port: int) -> AsyncIterator[int]:
    """A TLS terminator on a free loopback port that pipes each connection to the plain feed server."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_ingest_over_tls_delivers_every_stream(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_cert, cert, key = make_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_cert))
    async with feed_server(rate=600) as server, tls_proxy(cert, key, server.port) as tls_port:
        stage_config = settings.model_copy(update={
            "binance_ws_url": f"wss://127.0.0.1:{tls_port}", "binance_rest_url": server.rest_url,
            "data_dir": tmp_path, "symbols": ["BTCUSDT", "ETHUSDT", "BNBUSDT"],
        })
        async with ingest(stage_config) as stage:
            await until(lambda: stage.status().get("messages", 0) >= 300, 30, "300 messages over TLS")
            await settled(stage, server)
    counts = assert_complete(await market_messages(stage_config))
    assert counts["trade"] > 0 and counts["aggTrade"] > 0 and counts["bookTicker"] > 0


async def test_an_untrusted_certificate_is_refused(settings: Settings, tmp_path: Path) -> None:
    _, cert, key = make_certificates(tmp_path)  # the CA is not trusted: SSL_CERT_FILE is not set
    async with feed_server(rate=200) as server, tls_proxy(cert, key, server.port) as tls_port:
        stage_config = settings.model_copy(update={
            "binance_ws_url": f"wss://127.0.0.1:{tls_port}", "binance_rest_url": server.rest_url,
            "data_dir": tmp_path,
        })
        async with ingest(stage_config) as stage:
            await asyncio.sleep(3)
            assert stage.status().get("messages", 0) == 0
    assert server.stats.connections_opened == 0, "no WebSocket session without a verified certificate"
