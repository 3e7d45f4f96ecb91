"""A throwaway Samba AD domain controller, provisioned and run entirely inside one home directory.

LDAP listens on 127.0.0.1:389 (Samba has no option to move it), so only one lab DC can run at a time.
`interfaces` adds listen interfaces (e.g. a compose service's eth0); loopback is always served.
Provisioning takes seconds; a provisioned domain is cached as a tarball and restored in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from types import TracebackType

import ldap3

from certsync_lab.emulator.tls import write_private_file

log = logging.getLogger(__name__)

LDAP_HOST = "127.0.0.1"
LDAP_PORT = 389
PASSWORD_FILE = "admin.password"  # noqa: S105 (a file name)
ORIGIN_FILE = "lab-origin"
CACHE_LAYOUT = "1"  # bump when the provisioning recipe changes, to invalidate old tarballs
STOP_TIMEOUT_S = 20.0


class SambaLabError(RuntimeError):
    """The lab domain controller could not be provisioned, started or stopped."""


class LdapPortBusyError(SambaLabError):
    """Port 389 is served by something other than this home's Samba."""


class SambaDC:
    """Provision (or restore from cache), start, reuse and stop a Samba AD DC living in `home`."""

    def __init__(
        self,
        *,
        home: Path,
        realm: str = "CORP.EXAMPLE.TEST",
        domain: str = "CORP",
        cache_dir: Path | None = None,
        host_name: str = "dc1",
        users_ou_name: str = "People",
        start_timeout: float = 60.0,
        interfaces: tuple[str, ...] = ("lo",),
    ) -> None:
        self.home = Path(home).expanduser().absolute()
        self.realm = realm.upper()
        self.domain = domain.upper()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.home.parent / "cache"
        self.host_name = host_name
        self.users_ou_name = users_ou_name
        self.start_timeout = start_timeout
        # Loopback stays first: the readiness check and the local tools bind over 127.0.0.1.
        self.interfaces = tuple(dict.fromkeys(("lo", *interfaces)))
        self.timings: dict[str, float] = {}
        self.restored_from_cache: bool | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"SambaDC(home={str(self.home)!r}, realm={self.realm!r}, running={self.running})"

    @property
    def ldap_url(self) -> str:
        return f"ldap://{LDAP_HOST}:{LDAP_PORT}"

    @property
    def base_dn(self) -> str:
        return ",".join(f"DC={part}" for part in self.realm.lower().split("."))

    @property
    def bind_dn(self) -> str:
        return f"CN=Administrator,CN=Users,{self.base_dn}"

    @property
    def users_ou(self) -> str:
        return f"OU={self.users_ou_name},{self.base_dn}"

    @property
    def password(self) -> str:
        return (self.home / PASSWORD_FILE).read_text().strip()

    @property
    def smb_conf(self) -> Path:
        return self.home / "etc" / "smb.conf"

    @property
    def running(self) -> bool:
        return self._own_pid() is not None

    def connect(self) -> ldap3.Connection:
        """A bound ldap3 connection as Administrator (simple bind; the lab allows it over ldap://)."""
        server = ldap3.Server(self.ldap_url, get_info=ldap3.NONE, connect_timeout=5)
        conn = ldap3.Connection(server, user=self.bind_dn, password=self.password)
        if not conn.bind():
            raise SambaLabError(f"LDAP bind as {self.bind_dn} failed: {conn.result['description']}")
        return conn

    def ensure_provisioned(self) -> None:
        """Make `home` hold a provisioned domain: keep it, restore the cached one, or provision."""
        if self.smb_conf.exists():
            return
        if self.home.exists() and any(self.home.iterdir()):
            raise SambaLabError(f"{self.home} is not empty and holds no provisioned domain")
        began = time.monotonic()
        if self._cache_file().exists():
            self._restore()
            self.restored_from_cache = True
            self.timings["restore"] = time.monotonic() - began
            log.info("restored the domain from cache in %.2f s", self.timings["restore"])
            return
        self._provision()
        self.restored_from_cache = False
        self.timings["provision"] = time.monotonic() - began
        log.info("provisioned %s in %.2f s", self.realm, self.timings["provision"])

    def start(self) -> SambaDC:
        self.ensure_provisioned()
        began = time.monotonic()
        if self._own_pid() is not None:
            log.info("reusing the Samba DC already running from %s", self.home)
        elif _port_open(LDAP_HOST, LDAP_PORT):
            raise LdapPortBusyError(
                f"{LDAP_HOST}:{LDAP_PORT} is served by another process; stop it or run the lab "
                "in its own network namespace (unshare -n)"
            )
        else:
            self._spawn()
        self._wait_until_bound(began)
        self.timings["start"] = time.monotonic() - began
        log.info("Samba DC answers LDAP after %.2f s", self.timings["start"])
        return self

    def stop(self) -> None:
        """SIGTERM the DC of this home (whoever started it) and wait for it to exit."""
        pid = self._own_pid()
        if pid is None:
            self._proc = None
            return
        began = time.monotonic()
        # Started in its own session, so the group id is the pid: stop helpers with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not self._wait_gone(pid, STOP_TIMEOUT_S):
            log.warning("Samba did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            self._wait_gone(pid, 5.0)
        self._proc = None
        self.timings["stop"] = time.monotonic() - began
        log.info("Samba DC stopped in %.2f s", self.timings["stop"])

    def __enter__(self) -> SambaDC:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Only stop what this object launched; a reused DC belongs to whoever started it.
        if self._proc is not None:
            self.stop()

    # provisioning and cache

    def _provision(self) -> None:
        created = not self.home.exists()
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            password = _new_password()
            write_private_file(self.home / PASSWORD_FILE, f"{password}\n".encode())
            self._samba_tool(self._provision_args(password), secret=password)
            self._disable_admin_expiry(password)
            (self.home / ORIGIN_FILE).write_text(f"{self.home}\n")
            self._write_cache()
        except BaseException:
            self._discard_home(created)
            raise

    def _disable_admin_expiry(self, password: str) -> None:
        # A cached domain must keep binding long after the default 42-day password age.
        sam = f"ldb://{self.home / 'private' / 'sam.ldb'}"
        args = ["user", "setexpiry", "Administrator", "--noexpiry", "-H", sam]
        self._samba_tool([*args, "-s", str(self.smb_conf)], secret=password)

    def _provision_args(self, password: str) -> list[str]:
        home = self.home
        options = {
            "interfaces": "lo",
            "bind interfaces only": "yes",
            "server services": "ldap",
            "disable netbios": "yes",
            "log file": f"{home}/log/samba.log",
            "pid directory": f"{home}/run",
            "ncalrpc dir": f"{home}/run/ncalrpc",
            "winbindd socket directory": f"{home}/run/winbindd",
            "ntp signd socket directory": f"{home}/run/ntp_signd",
        }
        args = ["domain", "provision", f"--targetdir={home}", f"--realm={self.realm}"]
        args += [f"--domain={self.domain}", "--server-role=dc", "--dns-backend=NONE"]
        args += [f"--adminpass={password}", f"--host-name={self.host_name}", "--use-rfc2307"]
        return args + [f"--option={key}={value}" for key, value in options.items()]

    def _samba_tool(self, args: list[str], *, secret: str) -> None:
        env = {**os.environ, "TDB_NO_FSYNC": "1"}
        result = subprocess.run(["samba-tool", *args], capture_output=True, env=env, timeout=300, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            tail = "\n".join(output.replace(secret, "***").splitlines()[-15:])
            raise SambaLabError(f"samba-tool {args[0]} {args[1]} failed:\n{tail}")

    def _cache_file(self) -> Path:
        version = _samba_version().replace(" ", "_")
        name = f"samba-dc-{self.realm}-{self.domain}-{self.host_name}-{version}-v{CACHE_LAYOUT}"
        return self.cache_dir / f"{name.lower()}.tar.gz"

    def _write_cache(self) -> None:
        target = self._cache_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        # The tarball holds the admin password: readable by the owner only.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
            tar.add(self.home, arcname=".", filter=_skip_special)
        os.replace(partial, target)
        log.info("cached the provisioned domain in %s", target)

    def _restore(self) -> None:
        created = not self.home.exists()
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(self._cache_file(), mode="r:gz") as tar:
                tar.extractall(self.home, filter="tar")
            origin = (self.home / ORIGIN_FILE).read_text().strip()
            # Provisioning wrote absolute paths into smb.conf only; point them at the new home.
            conf = self.smb_conf.read_text().replace(origin, str(self.home))
            self.smb_conf.write_text(conf)
            (self.home / ORIGIN_FILE).write_text(f"{self.home}\n")
        except BaseException:
            self._discard_home(created)
            raise

    def _discard_home(self, created: bool) -> None:
        if created:
            shutil.rmtree(self.home, ignore_errors=True)
        else:
            for child in self.home.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    # process control

    def _spawn(self) -> None:
        for sub in ("log", "run"):
            (self.home / sub).mkdir(exist_ok=True)
        cmd = ["samba", "-s", str(self.smb_conf), "-F", "-M", "single", "--debug-stdout", "-d0"]
        # Without this, simple binds over ldap:// get strongerAuthRequired; provision cannot set it.
        cmd.append("--option=ldap server require strong auth=no")
        # Given at start, not provision: a cached domain serves whichever interfaces this DC asks for.
        cmd.append(f"--option=interfaces={' '.join(self.interfaces)}")
        env = {**os.environ, "TDB_NO_FSYNC": "1"}
        with open(self.home / "log" / "samba.stdout", "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info("started samba pid %s", self._proc.pid)

    def _wait_until_bound(self, began: float) -> None:
        deadline = began + self.start_timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise SambaLabError(
                    f"samba exited with {self._proc.returncode} while starting:\n{self._log_tail()}"
                )
            try:
                self.connect().unbind()
                return
            except (ldap3.core.exceptions.LDAPException, SambaLabError) as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise SambaLabError(f"Samba LDAP did not accept a bind within {self.start_timeout} s: {last_error}")

    def _own_pid(self) -> int | None:
        """Pid of a live samba recorded in this home's pid file, else None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            pid = int((self.home / "run" / "samba.pid").read_text().split()[0])
            # samba rewrites its cmdline (process title), so the executable is what can be checked.
            exe = os.readlink(f"/proc/{pid}/exe")
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(exe).name == "samba" else None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not Path(f"/proc/{pid}").exists():
                return True
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        try:
            text = (self.home / "log" / "samba.stdout").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-20:])


def _new_password() -> str:
    # The suffix guarantees the four character classes AD's complexity rule asks for.
    return f"{secrets.token_urlsafe(24)}aA1!"


def _skip_special(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return info if (info.isfile() or info.isdir() or info.issym()) else None


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@functools.cache
def _samba_version() -> str:
    out = subprocess.run(["samba", "--version"], capture_output=True, check=True, timeout=30)
    return out.stdout.decode().strip().removeprefix("Version ")


__all__ = ["LdapPortBusyError", "SambaDC", "SambaLabError"]
