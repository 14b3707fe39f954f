"""`cryptotui feed serve` (a local Binance-compatible feed) and `cryptotui feed record` (record any feed).

Also runnable alone: `python -m cryptotui.feed.cli serve --simulate --port 0`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click

from cryptotui.feed.source import STREAM_KINDS, is_valid_stream, parse_speed, stream_name

__all__ = ["combined_stream_url", "feed"]

DEFAULT_SYMBOLS = "BTCUSDT,ETHUSDT,BNBUSDT"
DEFAULT_RECORD_URL = "wss://data-stream.binance.vision"
_POSITIVE = click.FloatRange(min=0, min_open=True)


def _split_list(value: str | tuple[str, ...] | None) -> list[str]:
    """`--symbols A,B --symbols C` and `--symbols "A B"` -> ["A", "B", "C"]."""
    if value is None:
        return []
    parts = value if isinstance(value, tuple) else (value,)
    return [item for part in parts for item in part.replace(",", " ").split()]


def _symbols_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    symbols = [symbol.upper() for symbol in _split_list(value or (DEFAULT_SYMBOLS,))]
    bad = [symbol for symbol in symbols if not symbol.isalnum() or not 2 <= len(symbol) <= 20]
    if bad:
        raise click.BadParameter(f"not a symbol: {', '.join(bad)} (e.g. BTCUSDT)")
    return list(dict.fromkeys(symbols))


def _speed_option(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return parse_speed(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(name="feed")
def feed() -> None:
    """Local Binance-compatible market feed (WebSocket + REST) and a feed recorder."""


# --- serve ------------------------------------------------------------------------------------------------


@feed.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=9443, show_default=True, help="0: a free port.")
@click.option("--simulate", is_flag=True, help="Serve a synthetic market (the default without --recording).")
@click.option(
    "--recording",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replay this recording (JSON lines, optionally `<ns> ` prefixed; .gz accepted).",
)
@click.option("--symbols", multiple=True, callback=_symbols_option, help=f"Simulated symbols [{DEFAULT_SYMBOLS}].")
@click.option("--rate", type=_POSITIVE, default=None, help="Simulated messages per second, all streams [2000].")
@click.option("--seed", type=int, default=None, help="Seed of the simulated market (same seed, same market).")
@click.option("--bursts/--no-bursts", default=True, show_default=True, help="Simulated bursts of activity.")
@click.option(
    "--speed",
    default="1",
    show_default=True,
    callback=_speed_option,
    help="1: recorded pace; N: N times faster; max: as fast as the clients read.",
)
@click.option(
    "--history",
    type=click.IntRange(min=1),
    default=200_000,
    show_default=True,
    help="Trades kept per symbol for the REST endpoints.",
)
@click.option("--ping-interval", type=_POSITIVE, default=20.0, show_default=True, help="Seconds between pings.")
@click.option(
    "--pong-timeout",
    type=_POSITIVE,
    default=60.0,
    show_default=True,
    help="Close a connection that has not answered a ping for this many seconds.",
)
@click.option(
    "--lifetime", type=_POSITIVE, default=86_400.0, show_default=True, help="Close connections after this many seconds."
)
@click.option("--drop-every", type=_POSITIVE, default=None, help="Fault: drop all connections every S seconds.")
@click.option(
    "--drop-mode",
    type=click.Choice(["reset", "close"]),
    default="reset",
    show_default=True,
    help="How --drop-every drops: TCP reset, or a close frame (1001).",
)
@click.option(
    "--malformed-per-1000",
    type=click.IntRange(0, 1000),
    default=0,
    show_default=True,
    help="Fault: replace N of every 1000 messages with malformed ones.",
)
@click.option(
    "--skip-ids-every",
    type=click.IntRange(min=2),
    default=None,
    help="Fault: keep every N-th trade/aggTrade of a symbol off the WebSocket (REST has it).",
)
@click.option("--stall-after", type=_POSITIVE, default=None, help="Fault: stop sending data after S seconds...")
@click.option("--stall-for", type=_POSITIVE, default=None, help="...for S seconds [5].")
@click.option(
    "--shutdown-after",
    type=_POSITIVE,
    default=None,
    help="Fault: send serverShutdown after S seconds, then close the connections.",
)
@click.option("--exit-at-end", is_flag=True, help="Exit when the recording has been replayed.")
@click.option("--stats-every", type=_POSITIVE, default=None, help="Print a JSON stats line to stderr every S s.")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and faults to stderr.")
def serve(**options: Any) -> None:
    """Serve Binance's spot market streams and REST trade endpoints from a simulation or a recording.

    Prints `feed server listening on ws://HOST:PORT` once listening. Stop with Ctrl-C or SIGTERM.
    """
    if options["simulate"] and options["recording"]:
        raise click.UsageError("--simulate and --recording exclude each other")
    if options["recording"] and options["rate"] is not None:
        raise click.UsageError("--rate applies to --simulate only (use --speed with --recording)")
    if options["stall_for"] is not None and options["stall_after"] is None:
        raise click.UsageError("--stall-for needs --stall-after")
    if options["exit_at_end"] and not options["recording"]:
        raise click.UsageError("--exit-at-end needs --recording")
    logging.basicConfig(
        level=logging.INFO if options["verbose"] else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(options))


def _build_server(options: dict[str, Any]) -> Any:
    from cryptotui.feed.faults import Faults
    from cryptotui.feed.recording import RecordingSource
    from cryptotui.feed.server import FeedServer, FeedServerConfig
    from cryptotui.feed.simulate import SimulatedMarket

    source: Any
    if options["recording"]:
        source = RecordingSource(options["recording"], speed=options["speed"], history_size=options["history"])
    else:
        source = SimulatedMarket(
            options["symbols"],
            rate=options["rate"] or 2000.0,
            seed=options["seed"],
            speed=options["speed"],
            bursts=options["bursts"],
            history_size=options["history"],
        )
    faults = Faults(
        drop_every_s=options["drop_every"],
        drop_abrupt=options["drop_mode"] == "reset",
        malformed_per_1000=options["malformed_per_1000"],
        skip_ids_every=options["skip_ids_every"] or 0,
        stall_after_s=options["stall_after"],
        stall_for_s=options["stall_for"] or 5.0,
        shutdown_after_s=options["shutdown_after"],
    )
    config = FeedServerConfig(
        host=options["host"],
        port=options["port"],
        ping_interval_s=options["ping_interval"],
        pong_timeout_s=options["pong_timeout"],
        lifetime_s=options["lifetime"],
    )
    return FeedServer(config, source=source, faults=faults)


async def _serve(options: dict[str, Any]) -> None:
    server = _build_server(options)
    stop = _stop_event()
    try:
        await server.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {options['host']}:{options['port']}: {exc}") from None
    print(f"feed server listening on {server.url}", flush=True)
    print(f"REST endpoints at {server.rest_url}/api/v3/historicalTrades and /api/v3/aggTrades", file=sys.stderr)
    waiters = [asyncio.create_task(stop.wait())]
    if options["exit_at_end"]:
        waiters.append(asyncio.create_task(server.source_done.wait()))
    if options["stats_every"]:
        waiters.append(asyncio.create_task(_print_stats(server, options["stats_every"])))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await server.stop()
        print(json.dumps({"feed_stats": server.stats.as_dict()}), file=sys.stderr, flush=True)


async def _print_stats(server: Any, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        print(json.dumps({"feed_stats": server.stats.as_dict()}), file=sys.stderr, flush=True)


def _stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so both stop the command cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    return stop


# --- record -----------------------------------------------------------------------------------------------


def combined_stream_url(base: str, streams: list[str]) -> str:
    """`wss://host` + streams -> `wss://host/stream?streams=a/b`; a URL already naming streams is kept."""
    parts = urlsplit(base)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {base}")
    path = parts.path.rstrip("/")
    if path not in ("", "/stream"):
        raise ValueError(f"expected a base URL or a /stream URL (combined streams), got path {parts.path!r}")
    query = dict(parse_qsl(parts.query))
    if query.get("streams"):
        return base
    query["streams"] = "/".join(streams)
    return urlunsplit((parts.scheme, parts.netloc, "/stream", urlencode(query, safe="/@"), ""))


def _record_streams(symbols: list[str], kinds: list[str]) -> list[str]:
    streams: list[str] = []
    for kind in kinds:
        if "@" in kind:
            streams.append(kind)
            continue
        if kind not in STREAM_KINDS:
            raise click.BadParameter(
                f"unknown stream kind {kind!r} (expected {', '.join(STREAM_KINDS)} "
                "or full stream names like btcusdt@trade)",
                param_hint="--streams",
            )
        streams.extend(stream_name(symbol, kind) for symbol in symbols)
    bad = [name for name in streams if not is_valid_stream(name)]
    if bad:
        raise click.BadParameter(f"invalid stream name(s): {', '.join(bad)}", param_hint="--streams")
    if len(set(streams)) > 1024:
        raise click.BadParameter("at most 1024 streams per connection", param_hint="--streams")
    return list(dict.fromkeys(streams))


@feed.command()
@click.option(
    "--url",
    default=DEFAULT_RECORD_URL,
    show_default=True,
    help="Feed base URL (the combined-stream path is added) or a full /stream?streams=... URL.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="Recording file to write (.gz: gzip).",
)
@click.option("--duration", type=_POSITIVE, default=None, help="Seconds to record (default: until Ctrl-C).")
@click.option("--symbols", multiple=True, callback=_symbols_option, help=f"Symbols [{DEFAULT_SYMBOLS}].")
@click.option(
    "--streams",
    "kinds",
    multiple=True,
    help="Stream kinds (trade,aggTrade,bookTicker: the default) or full stream names.",
)
@click.option(
    "--timestamps/--no-timestamps",
    default=True,
    show_default=True,
    help="Prefix each line with the receive time in ns.",
)
def record(
    url: str, out_path: Path, duration: float | None, symbols: list[str], kinds: tuple[str, ...], timestamps: bool
) -> None:
    """Record a Binance-compatible feed to a file, one `<receive ns> <message>` line per message.

    Reconnects after disconnections until the duration is over; Ctrl-C or SIGTERM stop it cleanly.
    """
    streams = _record_streams(symbols, _split_list(kinds) or list(STREAM_KINDS))
    try:
        full_url = combined_stream_url(url, streams)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    with contextlib.suppress(KeyboardInterrupt):
        count = asyncio.run(_record(full_url, out_path, duration, timestamps))
        click.echo(f"recorded {count} messages to {out_path}", err=True)


async def _record(url: str, out_path: Path, duration: float | None, timestamps: bool) -> int:
    from cryptotui.feed.recording import RecordingWriter

    stop = _stop_event()
    loop = asyncio.get_running_loop()
    deadline = math.inf if duration is None else loop.time() + duration
    with RecordingWriter(out_path, timestamps=timestamps) as writer:
        recorder = asyncio.create_task(_record_until_stopped(url, writer, deadline, stop))
        stopper = asyncio.create_task(stop.wait())
        timeout = None if duration is None else duration + 1
        await asyncio.wait([recorder, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in (recorder, stopper):
            task.cancel()
        await asyncio.gather(recorder, stopper, return_exceptions=True)
        return writer.count


async def _record_until_stopped(url: str, writer: Any, deadline: float, stop: asyncio.Event) -> None:
    """Record, reconnecting with backoff after failures, until the deadline or the stop event.

    The loops check `stop` themselves instead of relying on cancellation alone: on Python 3.11,
    `asyncio.wait_for` loses a cancellation that arrives as the awaited message does, which at
    thousands of messages per second happens often enough to hang a recorder.
    """
    import websockets

    loop = asyncio.get_running_loop()
    backoff = 1.0
    last_flush = loop.time()
    while loop.time() < deadline and not stop.is_set():
        try:
            # max_queue=None: with a bounded queue websockets stops reading once it is full, and a
            # close handshake started then waits its whole close_timeout for a frame stuck behind data.
            async with websockets.connect(
                url, ping_interval=None, max_size=2**22, max_queue=None, open_timeout=10, close_timeout=2
            ) as ws:
                backoff = 1.0
                while (remaining := deadline - loop.time()) > 0 and not stop.is_set():
                    try:
                        async with asyncio.timeout(min(remaining, 5.0)):
                            text = await ws.recv()
                    except TimeoutError:
                        continue
                    received_ns = time.time_ns()
                    if isinstance(text, bytes):
                        text = text.decode("utf-8", "replace")
                    if text.startswith('{"stream"'):
                        writer.write(text, received_ns)
                    elif '"serverShutdown"' in text:
                        logging.getLogger("cryptotui.feed").warning("server shutdown announced: reconnecting")
                        break
                    if loop.time() - last_flush > 5.0:
                        writer.flush()  # a recorder killed hard loses at most a few seconds
                        last_flush = loop.time()
        except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
            click.echo(f"feed connection failed ({exc}); retrying in {backoff:.0f} s", err=True)
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, 30.0)


if __name__ == "__main__":
    feed()
