"""The lab from a clone anywhere: it runs under private (0700) folders without touching any folder it did
not create, keeps its ports across restarts, and `certsync-lab up` on a running lab changes nothing.

The `certsync-lab` commands run as real processes in a network namespace of their own (held open by a
small process), so the lab's Samba gets port 389 even while the session's DC holds it here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.postgres import POSTGRES_BIN_PATH, EmbeddedPostgres

pytestmark = pytest.mark.integration

CERTSYNC_LAB = str(Path(sys.executable).parent / "certsync-lab")
USERS = 20

# Brings loopback up in the fresh network namespace (no dependency on iproute2), then waits.
NAMESPACE_HOLDER = """
import fcntl, signal, socket, struct
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifreq = struct.pack("16sh22x", b"lo", 0)
flags = struct.unpack("16sh22x", fcntl.ioctl(sock, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
fcntl.ioctl(sock, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
print("ready", flush=True)
signal.pause()
"""

Snapshot = dict[str, tuple[int, int, int]]


def _snapshot(paths: list[Path]) -> Snapshot:
    """Mode, owner and group of each path."""
    return {str(p): (st.st_mode, st.st_uid, st.st_gid) for p in paths for st in (p.stat(),)}


def _guarded(home: Path) -> list[Path]:
    """Folders the lab did not create: every parent of its home, and the venv's PostgreSQL with
    every parent of it, every folder in it and every binary."""
    package = POSTGRES_BIN_PATH.parent.parent
    inside = [p for p in package.rglob("*") if p.is_dir() or p.parent == POSTGRES_BIN_PATH]
    return [*home.parents, package, *package.parents, *inside]


def _private_folder(base: Path) -> Path:
    """A 0700 folder inside a 0700 folder, as a clone under root's home or in `mktemp -d`."""
    base.chmod(0o700)  # the test's own folder
    private = base / "private"
    private.mkdir(mode=0o700)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    return private


def test_embedded_postgres_under_private_folders_changes_no_folder(tmp_path: Path) -> None:
    data_dir = _private_folder(tmp_path) / "clone" / ".certsync" / "postgres"
    data_dir.parent.mkdir(parents=True)
    guarded = _guarded(data_dir.parent)
    before = _snapshot(guarded)
    with EmbeddedPostgres(data_dir=data_dir) as pg:
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        if os.geteuid() == 0:
            # As root the server runs in a user namespace of its own, not as root, not as another account.
            assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert data_dir.stat().st_uid == os.geteuid()
    assert _snapshot(guarded) == before


def test_emulator_attaches_to_the_one_serving_its_home(tmp_path: Path) -> None:
    home = tmp_path / "emulator"
    with EmulatorProcess(home=home) as first:
        with EmulatorProcess(home=home) as second:
            assert first.started_here and not second.started_here
            assert second.url == first.url
            assert second.control.health()
        # The guest's exit left the emulator up.
        assert first.running()
        assert first.control.health()
    assert not EmulatorProcess(home=home).running()


def test_emulator_keeps_its_port_and_moves_only_when_it_is_taken(tmp_path: Path) -> None:
    home = tmp_path / "emulator"
    with EmulatorProcess(home=home) as first:
        url = first.url
    port = int(url.rsplit(":", 1)[1])
    with EmulatorProcess(home=home) as again:
        assert again.url == url
    with _listening(port):
        with EmulatorProcess(home=home) as moved:
            new_port = int(moved.url.rsplit(":", 1)[1])
        assert new_port != port
        log = (home / "emulator.log").read_text()
        assert f"port {port}, which this home listened on before, is taken by another process" in log
    # The new port is the one remembered from now on.
    with EmulatorProcess(home=home) as after:
        assert after.url.endswith(f":{new_port}")


@contextlib.contextmanager
def _listening(port: int) -> Iterator[None]:
    """Something else listening on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


# --- the whole lab through its command ---


@dataclass(frozen=True, kw_only=True)
class Lab:
    home: Path
    nsenter: tuple[str, ...]
    guarded: list[Path]
    before: Snapshot

    def run(self, *args: str) -> str:
        result = subprocess.run(
            [*self.nsenter, CERTSYNC_LAB, args[0], "--home", str(self.home), *args[1:]],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"certsync-lab {args[0]}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def up(self) -> str:
        return self.run("up", "--users", str(USERS))

    def state(self) -> dict[str, int | None]:
        """Pids and ports of the lab's servers, from the files each server writes."""
        pg = _read(self.home / "postgres" / "postmaster.pid").split() or ["", "", "", ""]
        endpoint = json.loads(_read(self.home / "emulator" / "endpoint.json") or "{}")
        samba = _read(self.home / "samba" / "run" / "samba.pid").split() or [""]
        return {
            "postgres_pid": _alive(pg[0]),
            "postgres_port": int(pg[3]) if pg[3] else None,
            "samba_pid": _alive(samba[0]),
            "emulator_pid": _alive(str(endpoint.get("pid", ""))),
            "emulator_port": endpoint.get("port"),
        }


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _alive(pid: str) -> int | None:
    return int(pid) if pid and Path(f"/proc/{pid}").exists() else None


@pytest.fixture(scope="module")
def network_namespace() -> Iterator[tuple[str, ...]]:
    holder = subprocess.Popen(
        ["unshare", "--net", sys.executable, "-c", NAMESPACE_HOLDER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield ("nsenter", f"--net=/proc/{holder.pid}/ns/net")
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(
    network_namespace: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory, lab_cache_dir: Path
) -> Iterator[Lab]:
    """A running lab whose home is in a 0700 folder inside a 0700 folder, started by `certsync-lab up`."""
    home = _private_folder(tmp_path_factory.mktemp("clone")) / ".certsync"
    # The session's cached domain (2-3 MB) spares a provisioning; the lab provisions without it.
    (home / "cache").mkdir(parents=True)
    for tarball in (lab_cache_dir / "samba").glob("*.tar.gz"):
        shutil.copy2(tarball, home / "cache")
    guarded = _guarded(home)
    started = Lab(home=home, nsenter=network_namespace, guarded=guarded, before=_snapshot(guarded))
    output = started.up()
    assert f"lab up in {home}" in output
    try:
        yield started
    finally:
        started.run("down")


def test_up_on_a_running_lab_starts_nothing_and_says_where_things_are(lab: Lab) -> None:
    env_file = lab.home / "lab.env"
    state = lab.state()
    assert None not in state.values()
    settings = env_file.read_text()
    env_file.chmod(0o644)

    output = lab.up()

    assert lab.state() == state
    assert f"lab already running in {lab.home}" in output
    assert f"127.0.0.1:{state['postgres_port']}" in output
    assert f"https://127.0.0.1:{state['emulator_port']}" in output
    assert "ldap://127.0.0.1:389" in output
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text() == settings


def test_down_then_up_keeps_every_port(lab: Lab) -> None:
    state = lab.state()
    assert "lab stopped" in lab.run("down")
    assert set(lab.state().values()) == {None}

    output = lab.up()

    again = lab.state()
    assert f"lab up in {lab.home}" in output
    assert (again["postgres_port"], again["emulator_port"]) == (
        state["postgres_port"],
        state["emulator_port"],
    )
    assert again["emulator_pid"] != state["emulator_pid"]
    assert again["postgres_pid"] != state["postgres_pid"]


def test_exec_runs_certsync_against_the_lab(lab: Lab) -> None:
    output = lab.run("exec", "certsync", "run", "--dry-run")
    assert "Audit log:" in output and "signed rows" in output


def test_the_lab_changed_no_folder_it_did_not_create(lab: Lab) -> None:
    assert stat.S_IMODE(lab.home.parent.stat().st_mode) == 0o700
    assert _snapshot(lab.guarded) == lab.before
