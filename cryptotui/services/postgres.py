"""PostgreSQL with TimescaleDB: the embedded server in the data directory, or an external one.

The embedded server listens on 127.0.0.1 only, with password authentication and a generated password
kept in a mode-0600 file. PostgreSQL refuses to run as root, so as root it runs under the `postgres`
account (which then owns the cluster directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import asyncpg

from cryptotui.config import Settings
from cryptotui.db.connection import EMBEDDED_HOST, database_url, redact
from cryptotui.db.schema import apply_schema, timescaledb_info
from cryptotui.services.base import (
    PortInUse,
    Service,
    ServiceError,
    ServiceStatus,
    pid_alive,
    port_free,
)

SERVICE_ACCOUNT = "postgres"
SUPPORTED_MAJORS = ("17", "16", "15")
START_TIMEOUT_S = 30
_DB_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def find_bindir(override: Path | None = None) -> Path | None:
    """The directory holding initdb and pg_ctl (Debian keeps them out of PATH)."""
    candidates = [override] if override else []
    candidates += [Path(f"/usr/lib/postgresql/{major}/bin") for major in SUPPORTED_MAJORS]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    return next((path for path in candidates if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)


def timescaledb_installed(bindir: Path) -> bool:
    """The TimescaleDB extension files are in this server's share directory."""
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        return False
    sharedir = subprocess.run([str(pg_config), "--sharedir"], capture_output=True, text=True, check=False)
    return (Path(sharedir.stdout.strip()) / "extension" / "timescaledb.control").exists()


def write_secret(path: Path, value: str) -> None:
    """Create a file readable by its owner only (the mode is set at creation, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")


class PostgresService(Service):
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.bindir = find_bindir(settings.postgres_bindir)
        self._as_root = os.geteuid() == 0

    @property
    def external(self) -> bool:
        return self.settings.database_url is not None

    @property
    def cluster_dir(self) -> Path:
        return self.paths.postgres

    @property
    def address(self) -> str:
        return f"{EMBEDDED_HOST}:{self.settings.postgres_port}"

    # --- process helpers ---------------------------------------------------------------------
    def _command(self, *args: str) -> list[str]:
        assert self.bindir is not None
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            return ["runuser", "-u", SERVICE_ACCOUNT, "--", *command]
        return command

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self._command(*args), capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
        )
        if result.returncode != 0:
            raise ServiceError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-800:]}")
        return result

    def pid(self) -> int | None:
        try:
            return int((self.cluster_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def installed(self) -> bool:
        return self.bindir is not None

    # --- lifecycle ---------------------------------------------------------------------------
    def _chown_to_service_account(self, path: Path) -> None:
        if self._as_root:
            account = pwd.getpwnam(SERVICE_ACCOUNT)
            os.chown(path, account.pw_uid, account.pw_gid)

    def _check_traversable(self) -> None:
        """As root the server runs as `postgres`, which must reach the cluster directory."""
        if not self._as_root:
            return
        probe = subprocess.run(
            ["runuser", "-u", SERVICE_ACCOUNT, "--", "test", "-x", str(self.cluster_dir.parent)],
            check=False,
            cwd="/",
        )
        if probe.returncode != 0:
            raise ServiceError(
                f"the '{SERVICE_ACCOUNT}' account cannot reach {self.cluster_dir.parent} (PostgreSQL cannot run"
                " as root); set CRYPTOTUI_DATA_DIR to a directory it can traverse, e.g. /var/lib/cryptotui"
            )

    def _ensure_password(self) -> str:
        path = self.paths.postgres_password_file
        if not path.exists():
            write_secret(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    def _initdb(self) -> None:
        password = self._ensure_password()
        self.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._chown_to_service_account(self.cluster_dir)
        self._check_traversable()
        # initdb reads the superuser password from a file the service account can read; delete it after.
        handle, pwfile = tempfile.mkstemp(prefix="cryptotui-pw-")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(password + "\n")
            self._chown_to_service_account(Path(pwfile))
            self._run(
                "initdb", "-D", str(self.cluster_dir), "-U", self.settings.database_user, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
            )
        finally:
            os.unlink(pwfile)

    def _server_options(self) -> str:
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.settings.postgres_port}",
            f"-c unix_socket_directories={self.cluster_dir}",
            "-c max_connections=200",
            "-c shared_buffers=256MB",
            "-c timezone=UTC",
            "-c log_timezone=UTC",
        ]
        if self.bindir is not None and timescaledb_installed(self.bindir):
            options += ["-c shared_preload_libraries=timescaledb", "-c timescaledb.telemetry_level=off"]
        return " ".join(options)

    async def start(self) -> None:
        if self.external:
            await self._check_external()
            return
        if self.bindir is None:
            raise ServiceError("PostgreSQL server binaries not found (initdb, pg_ctl): run `make setup`")
        state = self.local_state()
        if state == "running":
            return
        if not port_free(self.settings.postgres_port):
            raise PortInUse(self.settings.postgres_port, "CRYPTOTUI_POSTGRES_PORT")
        if not (self.cluster_dir / "PG_VERSION").exists():
            await asyncio.to_thread(self._initdb)
        log_file = self.paths.postgres_log
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.touch()
        self._chown_to_service_account(log_file)
        await asyncio.to_thread(self._start_server, state == "crashed")
        await self._wait_healthy()

    def _start_server(self, after_crash: bool) -> None:
        # After a crash the old backends may still hold shared memory for a moment: retry briefly.
        attempts = 5 if after_crash else 1
        for attempt in range(attempts):
            try:
                self._run(
                    "pg_ctl", "-D", str(self.cluster_dir), "-l", str(self.paths.postgres_log), "-w",
                    "-t", str(START_TIMEOUT_S), "-o", self._server_options(), "start",
                    timeout=START_TIMEOUT_S + 10,
                )
                return
            except ServiceError:
                if attempt == attempts - 1:
                    raise ServiceError(
                        f"PostgreSQL did not start; see {self.paths.postgres_log}:\n{self._log_tail()}"
                    ) from None
                subprocess.run(["sleep", "1"], check=False)

    def _log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.paths.postgres_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def _admin_connect(self, database: str = "postgres") -> asyncpg.Connection:
        password = self.paths.postgres_password_file.read_text().strip()
        return await asyncpg.connect(
            host=EMBEDDED_HOST,
            port=self.settings.postgres_port,
            user=self.settings.database_user,
            password=password,
            database=database,
            timeout=5,
        )

    async def _wait_healthy(self) -> None:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            try:
                conn = await self._admin_connect()
                await conn.close()
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                if asyncio.get_running_loop().time() > deadline:
                    raise ServiceError(f"PostgreSQL at {self.address} did not become healthy: {error}") from None
                await asyncio.sleep(0.2)

    async def _check_external(self) -> None:
        url = database_url(self.settings)
        try:
            conn = await asyncpg.connect(url, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            raise ServiceError(f"cannot reach CRYPTOTUI_DATABASE_URL {redact(url)}: {error}") from None
        await conn.close()

    async def stop(self) -> None:
        if self.external or self.local_state() != "running":
            return
        await asyncio.to_thread(
            self._run, "pg_ctl", "-D", str(self.cluster_dir), "-m", "fast", "-w", "-t", "30", "stop"
        )

    def kill(self) -> None:
        """SIGKILL the postmaster (tests simulate crashes with it)."""
        pid = self.pid()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    async def create_database(self, name: str) -> None:
        """Create a database on the embedded server when missing (names cannot be parameters: checked)."""
        if not _DB_NAME_RE.match(name):
            raise ServiceError(f"invalid database name {name!r} (CRYPTOTUI_DATABASE_NAME)")
        conn = await self._admin_connect()
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    async def provision(self) -> None:
        if not self.external:
            await self.create_database(self.settings.database_name)
        conn = await asyncpg.connect(database_url(self.settings), timeout=10)
        try:
            await apply_schema(conn, self.settings.timescaledb)
        finally:
            await conn.close()

    async def status(self) -> ServiceStatus:
        state = self.local_state()
        status = ServiceStatus(self.name, state, details={"timescaledb": None})  # type: ignore[arg-type]
        if self.external:
            status.address = redact(self.settings.database_url or "")
        elif state != "not-installed":
            status.address = self.address
            status.pid = self.pid() if state == "running" else None
            status.details["data_dir"] = str(self.cluster_dir)
        if state in ("running", "external"):
            await self._query_versions(status)
        return status

    async def _query_versions(self, status: ServiceStatus) -> None:
        try:
            conn = await asyncpg.connect(database_url(self.settings), timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            if status.state == "external":
                status.state = "unreachable"
            status.details["error"] = str(error)
            return
        try:
            status.version = "PostgreSQL " + await conn.fetchval("SHOW server_version")
            version, license_ = await timescaledb_info(conn)
            if version is not None:
                status.details["timescaledb"] = {"version": version, "license": license_}
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
