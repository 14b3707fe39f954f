"""The `cryptotui` command: stack, stage, feed, bench and config commands."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from cryptotui.config import Settings, SettingsError, load_settings, settings_table
from cryptotui.logs import setup_logging

T = TypeVar("T")
EXIT_ERROR = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"cryptotui: {message}", err=True)
    sys.exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    """Load the settings; a bad value prints the setting's name and exits 2, without a traceback."""
    try:
        return load_settings(**overrides)
    except SettingsError as error:
        fail(str(error), EXIT_USAGE)


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine, turning the errors a user can act on into one clear line."""
    from cryptotui.db.connection import DatabaseNotReady
    from cryptotui.db.schema import SchemaError
    from cryptotui.services.base import ServiceError

    try:
        return asyncio.run(main())
    except (ServiceError, SchemaError, DatabaseNotReady) as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def _module_exists(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    """A group whose commands live in modules imported only when used (keeps startup fast)."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        available = {name for name, target in self.lazy.items() if _module_exists(target.partition(":")[0])}
        return sorted({*super().list_commands(ctx), *available})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, _, attribute = self.lazy[cmd_name].partition(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if error.name and module_name.startswith(error.name):
                    raise click.UsageError(f"'{cmd_name}' is not available in this build") from None
                raise
            return getattr(module, attribute)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={"feed": "cryptotui.feed.cli:feed"},
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("--daemon", is_flag=True, help="Run the whole pipeline without a UI (logs to stdout).")
@click.option("--source", default=None, help="Market data: binance | sim | replay:PATH (CRYPTOTUI_SOURCE).")
@click.option("--speed", default=None, help="Pace of sim/replay: 1 | N | max (CRYPTOTUI_SPEED).")
@click.option(
    "--stop-stack-on-exit/--keep-stack-on-exit",
    default=None,
    help="Stop the stack when exiting (default: on for --daemon, off for the TUI).",
)
@click.version_option(package_name="cryptotui")
@click.pass_context
def main(
    ctx: click.Context, daemon: bool, source: str | None, speed: str | None, stop_stack_on_exit: bool | None
) -> None:
    """cryptotui: a terminal-first monitor for real-time crypto markets.

    Without a command it runs the whole pipeline: `cryptotui --daemon` headless.
    """
    if ctx.invoked_subcommand is not None:
        return
    overrides = {key: value for key, value in (("source", source), ("speed", speed)) if value is not None}
    settings = settings_or_exit(**overrides)
    if not daemon:
        fail("the Textual TUI is not part of this build yet; run `cryptotui --daemon`", EXIT_USAGE)
    from cryptotui.daemon import run_daemon

    sys.exit(run_daemon(settings, stop_stack_on_exit=True if stop_stack_on_exit is None else stop_stack_on_exit))


# --- stack ----------------------------------------------------------------------------------
@main.group()
def stack() -> None:
    """Start, stop and inspect the services (PostgreSQL/TimescaleDB, Kafka broker)."""


@stack.command("up")
def stack_up() -> None:
    """Start the embedded services (or check the external ones), apply the schema, create the topics."""
    from rich.console import Console

    from cryptotui.services.stack import Stack

    settings = settings_or_exit()
    setup_logging("WARNING")
    console = Console(stderr=True, log_path=False)

    async def up() -> None:
        with console.status("starting the stack") as status:
            await Stack(settings).up(lambda step: (status.update(step), console.log(step)))
        console.print(f"[green]stack is up[/green] (data in {settings.data_dir})")

    run_async(up)


@stack.command("down")
def stack_down() -> None:
    """Stop the embedded services cleanly; their data is kept."""
    from cryptotui.services.stack import Stack

    settings = settings_or_exit()
    run_async(lambda: Stack(settings).down(lambda step: click.echo(step, err=True)))
    click.echo("stack is down", err=True)


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts and the TUI).")
def stack_status(as_json: bool) -> None:
    """Show each service: state, pid, address, version, TimescaleDB, topics."""
    from cryptotui.services.stack import Stack

    settings = settings_or_exit()
    setup_logging("ERROR")
    report = run_async(lambda: Stack(settings).status_json())
    if as_json:
        click.echo(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("service", "state", "pid", "address", "version", "details")
    for service in report["services"]:
        extra = {k: v for k, v in service.items() if k not in ("name", "state", "pid", "address", "version")}
        details = ", ".join(f"{k}={json.dumps(v)}" for k, v in extra.items() if v not in (None, [], {}))
        table.add_row(service["name"], service["state"], str(service["pid"] or ""), service["address"] or "",
                      service["version"] or "", details)
    Console().print(table)


@stack.command("env")
def stack_env() -> None:
    """Print shell exports so psql, kcat and other tools reach the same services."""
    from cryptotui.db.connection import DatabaseNotReady
    from cryptotui.services.stack import Stack

    settings = settings_or_exit()
    try:
        click.echo("\n".join(Stack(settings).env_lines()))
    except DatabaseNotReady as error:
        fail(str(error))


# --- stages ---------------------------------------------------------------------------------
@main.group()
def stage() -> None:
    """Run one pipeline stage in the foreground (the supervisor runs them for you)."""


@stage.command("list")
def stage_list() -> None:
    """List the stages."""
    from cryptotui.stages import STAGES

    for name in STAGES:
        click.echo(name)


@stage.command("run")
@click.argument("name")
def stage_run(name: str) -> None:
    """Run stage NAME until SIGTERM/SIGINT, then flush and exit 0."""
    from cryptotui.stages import UnknownStage, load_stage
    from cryptotui.stages.base import StageRunner

    settings = settings_or_exit()
    setup_logging(settings.log_level)
    try:
        stage_class = load_stage(name)
    except UnknownStage as error:
        fail(str(error), EXIT_USAGE)
    code = run_async(lambda: StageRunner(stage_class(settings)).run())
    sys.exit(code)


# --- config ---------------------------------------------------------------------------------
@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
def config_show() -> None:
    """Print the effective settings as JSON (secrets hidden)."""
    settings = settings_or_exit()
    click.echo(settings.model_dump_json(indent=2))


@config.command("docs")
def config_docs() -> None:
    """Print the settings reference as a Markdown table."""
    click.echo(settings_table())


# --- lazily loaded command groups -------------------------------------------------------------
BENCHMARKS = ("stack", "ingest", "sink", "spark", "e2e")
main.add_command(
    LazyGroup(
        "bench",
        help="Benchmarks; each starts a throwaway stack and prints one JSON object with --json.",
        lazy={name: f"cryptotui.bench.{name}:command" for name in BENCHMARKS},
    )
)

if __name__ == "__main__":
    main()
