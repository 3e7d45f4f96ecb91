"""Run the emulator over TLS and announce where it listens (home/endpoint.json).

The port a home listened on is kept in home/emulator.port and used again by the next start, so
clients configured with the emulator's URL keep working across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from certsync_lab.emulator.app import Emulator, create_app
from certsync_lab.emulator.tls import TlsFiles, ensure_tls

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"
PORT_FILE = "emulator.port"


def serve(*, home: Path, host: str = "127.0.0.1", port: int = 0, tls_hostnames: Sequence[str] = ()) -> None:
    """Serve until interrupted (SIGINT/SIGTERM); port 0 means the port this home used last, or a
    free one the first time (or when another process holds the old one).

    ``tls_hostnames`` adds names to the server certificate (e.g. a compose service name).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    hostnames = tuple(dict.fromkeys(("localhost", "127.0.0.1", host, *tls_hostnames)))
    tls = ensure_tls(directory=home / "tls", hostnames=hostnames)
    emulator = Emulator.open(home=home)
    sock = _bind(home=home, host=host, port=port)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_uvicorn_config(emulator=emulator, tls=tls))
    announcement = {
        "url": f"https://{host}:{bound_port}",
        "host": host,
        "port": bound_port,
        "pid": os.getpid(),
        "tenant_id": emulator.store.tenant_id,
        "tenant_domain": emulator.store.tenant_domain,
        "ca_file": str(tls.ca_cert.resolve()),
    }
    # uvicorn re-raises SIGTERM once it has shut down; turn that into a normal exit so the
    # endpoint file is removed and the state closed.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        asyncio.run(_serve(server=server, sock=sock, home=home, announcement=announcement))
    finally:
        with contextlib.suppress(FileNotFoundError):
            (home / ENDPOINT_FILE).unlink()
        emulator.store.close()


def _bind(*, home: Path, host: str, port: int) -> socket.socket:
    """A socket bound to `port`, or for port 0 to the remembered port while it is free; the bound
    port is remembered for the next start."""
    remembered = _remembered_port(home) if port == 0 else None
    try:
        sock = _tcp_socket(host, remembered or port)
    except OSError as exc:
        if remembered is None:
            raise
        log.warning(
            "port %s, which this home listened on before, is taken by another process (%s);"
            " listening on a new port, so clients configured with the old URL need the new one",
            remembered,
            exc.strerror,
        )
        sock = _tcp_socket(host, 0)
    (home / PORT_FILE).write_text(f"{sock.getsockname()[1]}\n")
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets that say so, and
    # without it every response body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Lets a restart take its old port while connections of the previous run sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _remembered_port(home: Path) -> int | None:
    try:
        return int((home / PORT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _uvicorn_config(*, emulator: Emulator, tls: TlsFiles) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(emulator),
        ssl_certfile=str(tls.server_cert),
        ssl_keyfile=str(tls.server_key),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,
        # Clients keep TLS connections alive; do not let them hold up a stop for long.
        timeout_graceful_shutdown=1,
    )


def _exit_on_signal(signum: int, frame: object) -> None:
    sys.exit(0)


async def _serve(
    *, server: uvicorn.Server, sock: socket.socket, home: Path, announcement: dict[str, Any]
) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.02)
    _write_json_atomically(home / ENDPOINT_FILE, announcement)
    log.info("emulator listening on %s", announcement["url"])
    await task


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_endpoint(home: Path) -> dict[str, Any] | None:
    """The endpoint a running emulator announced in ``home``, if any."""
    try:
        return dict(json.loads((Path(home) / ENDPOINT_FILE).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
