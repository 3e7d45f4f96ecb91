"""Run docker-compose.yml without a container engine: each service's command in its own PID, mount,
network, UTS and IPC namespaces, wired as compose wires them.

- Network: a bridge in a network namespace of its own (never the caller's), one veth pair per
  service (its end is `eth0`), and an /etc/hosts that maps service names to their addresses.
- Filesystem: the service's root is an overlay over this machine's / (writes stay in the service),
  with named volumes bind-mounted from per-run folders at their targets and a fresh /proc.
- Images: `build:` services run the repo's venv (its bin first on PATH) with the image's ENV and
  DAG folder; `postgres:*` runs Debian's initdb + postgres as the `postgres` user; `redis:*` runs
  Debian's redis-server.
- depends_on conditions (service_started, service_healthy, service_completed_successfully) gate
  each start; health checks run inside the service's namespaces with nsenter.
- Replicas (`docker compose up --scale NAME=N`, or the service's `deploy.replicas`): N containers
  `NAME-1`..`NAME-N`, each with its own namespaces and address; a dependency on NAME waits for all
  of them. A replica's hostname is its container name unless the service fixes one (then, as in
  compose, every replica has that hostname).
Stop kills each service's PID namespace (its whole process tree) and the network namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.netns import join_netns

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBNET = "10.213.0"  # only ever configured inside namespaces this module creates
PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class ComposeError(RuntimeError):
    """A service could not be started, failed, or did not become healthy in time."""


# compose file: interpolation, profiles, services

_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        current = env.get(name)
        unset = current is None or (current == "" and operator in (":-", ":?"))
        if operator in (":-", "-") and unset:
            return interpolate(argument, env)
        if operator in (":?", "?") and unset:
            raise ComposeError(f"variable {name} is required: {argument}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def parse_duration(text: str | None, default: float) -> float:
    if not text:
        return default
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", str(text)))


@dataclass
class Healthcheck:
    argv: list[str]
    interval: float
    timeout: float
    retries: int
    start_period: float
    start_interval: float

    @classmethod
    def parse(cls, spec: Mapping[str, Any] | None) -> Healthcheck | None:
        if not spec or spec.get("disable"):
            return None
        test = spec["test"]
        if isinstance(test, str):
            argv = ["/bin/sh", "-c", test]
        elif test[0] == "CMD":
            argv = list(test[1:])
        elif test[0] == "CMD-SHELL":
            argv = ["/bin/sh", "-c", test[1]]
        else:
            return None
        return cls(
            argv=argv,
            interval=parse_duration(spec.get("interval"), 30.0),
            timeout=parse_duration(spec.get("timeout"), 30.0),
            retries=int(spec.get("retries", 3)),
            start_period=parse_duration(spec.get("start_period"), 0.0),
            start_interval=parse_duration(spec.get("start_interval"), 5.0),
        )


@dataclass
class Service:
    """One container of a compose service: `name` is the service's own name, or `NAME-i` for the
    i-th of several replicas (`service` is always the compose service's name)."""

    name: str
    spec: dict[str, Any]
    address: str
    healthcheck: Healthcheck | None = None
    service: str = ""

    def __post_init__(self) -> None:
        self.service = self.service or self.name

    @property
    def hostname(self) -> str:
        return str(self.spec.get("hostname") or self.name)

    @property
    def depends_on(self) -> dict[str, str]:
        raw = self.spec.get("depends_on") or {}
        if isinstance(raw, list):
            return dict.fromkeys(raw, "service_started")
        return {name: (cond or {}).get("condition", "service_started") for name, cond in raw.items()}

    def environment(self) -> dict[str, str]:
        raw = self.spec.get("environment") or {}
        if isinstance(raw, list):
            raw = dict(item.split("=", 1) for item in raw)
        return {key: "" if value is None else str(value) for key, value in raw.items()}

    def command(self) -> list[str]:
        command = self.spec.get("command")
        if command is None:
            return []
        return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]

    def volumes(self) -> list[tuple[str, str, bool]]:
        mounts = []
        for entry in self.spec.get("volumes") or []:
            source, target, *mode = str(entry).split(":")
            mounts.append((source, target, "ro" in mode))
        return mounts


def load_services(
    compose_file: Path,
    *,
    env: Mapping[str, str],
    profiles: tuple[str, ...],
    scale: Mapping[str, int] | None = None,
) -> list[Service]:
    """The containers of the services active for `profiles`, variables substituted, each with its
    address: one per service, or `scale[name]` (else `deploy.replicas`) replicas NAME-1..NAME-N."""
    document = interpolate(yaml.safe_load(compose_file.read_text()), env)
    scale = dict(scale or {})
    unknown = set(scale) - set(document["services"])
    if unknown:
        raise ComposeError(f"no such service to scale: {sorted(unknown)}")
    services = []
    for name, spec in document["services"].items():
        wanted = spec.get("profiles")
        if wanted and not set(wanted) & set(profiles):
            continue
        replicas = int(scale.get(name, (spec.get("deploy") or {}).get("replicas", 1)))
        names = [name] if replicas == 1 else [f"{name}-{i}" for i in range(1, replicas + 1)]
        for container in names:
            address = f"{SUBNET}.{10 + len(services)}"
            services.append(Service(name=container, spec=spec, address=address, service=name))
    for service in services:
        service.healthcheck = Healthcheck.parse(service.spec.get("healthcheck"))
    return services


# images: what each service's command becomes on this machine


def image_environment(dockerfile: Path) -> dict[str, str]:
    """The ENV KEY=VALUE lines of a Dockerfile (the runtime environment the image gives)."""
    env = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_workdir(dockerfile: Path) -> str:
    """The last WORKDIR of a Dockerfile (where the image's command starts)."""
    found = [
        line.split(None, 1)[1].strip()
        for line in dockerfile.read_text().splitlines()
        if line.startswith("WORKDIR ")
    ]
    return found[-1] if found else "/"


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise ComposeError("Debian's PostgreSQL server is not installed (apt package postgresql)")
    return found[-1].parent


POSTGRES_ENTRYPOINT = """set -eu
data=${PGDATA:-/var/lib/postgresql/data}
mkdir -p "$data" /run/postgresql
chown postgres:postgres "$data" /run/postgresql
chmod 700 "$data"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
if [ ! -s "$data/PG_VERSION" ]; then
    umask 077
    printf '%s\\n' "$POSTGRES_PASSWORD" > /run/postgresql/pwfile
    chown postgres /run/postgresql/pwfile
    as_postgres "$PGBIN/initdb" -D "$data" -U "${POSTGRES_USER:-postgres}" --pwfile=/run/postgresql/pwfile \\
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >/dev/null
    rm -f /run/postgresql/pwfile
    echo "host all all all scram-sha-256" >> "$data/pg_hba.conf"
    db=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
    if [ "$db" != postgres ]; then
        echo "CREATE DATABASE \\"$db\\" OWNER \\"${POSTGRES_USER:-postgres}\\";" \\
            | as_postgres "$PGBIN/postgres" --single -D "$data" postgres >/dev/null
    fi
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$PGBIN/postgres" -D "$data" \\
    -c listen_addresses='*' -c unix_socket_directories=/run/postgresql
"""


@dataclass
class Runtime:
    """How a service runs here: argv, environment, extra bind mounts (host path, target, ro) and
    the scripts to write before it starts (path, text)."""

    argv: list[str]
    env: dict[str, str]
    mounts: list[tuple[Path, str, bool]] = field(default_factory=list)
    workdir: str = "/"
    scripts: dict[Path, str] = field(default_factory=dict)


def runtime_for(service: Service, *, script_dir: Path) -> Runtime:
    image = str(service.spec.get("image", ""))
    env = {"HOSTNAME": service.hostname, "HOME": "/root"}
    if "build" in service.spec:
        dockerfile = REPO / service.spec["build"].get("dockerfile", "Dockerfile")
        env |= image_environment(dockerfile) | {"PATH": f"{VENV_BIN}:{SYSTEM_PATH}"}
        env |= service.environment()
        # The image links the installed certsync.dags there; here it is the repo's editable package.
        return Runtime(
            argv=service.command(),
            env=env,
            mounts=[(dags_folder(), "/opt/certsync/dags", True)],
            workdir=image_workdir(dockerfile),
        )
    if image.startswith("postgres:"):
        pgbin = postgres_bin()
        env |= {"PATH": f"{pgbin}:{SYSTEM_PATH}", "PGBIN": str(pgbin)} | service.environment()
        entrypoint = script_dir / "postgres-entrypoint.sh"
        return Runtime(argv=["/bin/sh", str(entrypoint)], env=env, scripts={entrypoint: POSTGRES_ENTRYPOINT})
    if image.startswith("redis:"):
        argv = service.command() or ["redis-server"]
        # The official image's entrypoint turns protected mode off when no config file is given.
        if argv[0] == "redis-server":
            argv = [argv[0], "--protected-mode", "no", *argv[1:]]
        return Runtime(argv=argv, env=env | {"PATH": SYSTEM_PATH} | service.environment())
    raise ComposeError(f"service {service.name}: no local stand-in for image {image!r}")


# namespaces

SETUP_SCRIPT = """set -eu
# Runs as PID 1 of the service's new namespaces: wait for eth0, build the root, exec the command.
# The route is the last thing the runner configures: once it is there, eth0 is up and addressed.
for _ in $(seq 200); do ip route show default 2>/dev/null | grep -q via && break; sleep 0.05; done
ip route show default | grep -q via || { echo "no network" >&2; exit 97; }
hostname "$CS_HOSTNAME"
mount --make-rprivate /
root="$CS_DIR/root"
mkdir -p "$root"
mount -t tmpfs -o mode=755 tmpfs "$root"
mkdir "$root/upper" "$root/work" "$root/fs"
mount -t overlay overlay -o lowerdir=/,upperdir="$root/upper",workdir="$root/work" "$root/fs"
fs="$root/fs"
mount --rbind /dev "$fs/dev"
mount -t tmpfs -o mode=1777 tmpfs "$fs/dev/shm"
mount -t proc proc "$fs/proc"
mount -t sysfs sysfs "$fs/sys"
mount --bind "$CS_HOSTS" "$fs/etc/hosts"
while IFS='|' read -r source target mode; do
    [ -n "$source" ] || continue
    mkdir -p "$fs$target"
    mount --bind "$source" "$fs$target"
    [ "$mode" = ro ] && mount -o remount,bind,ro "$fs$target"
done < "$CS_MOUNTS"
workdir=${CS_WORKDIR:-/}
mkdir -p "$fs$workdir"  # the image creates its WORKDIR
unset CS_HOSTNAME CS_DIR CS_HOSTS CS_MOUNTS CS_WORKDIR
exec unshare --root="$fs" --wd="$workdir" -- "$@"
"""

NAMESPACE_FLAGS = ["--pid", "--mount", "--net", "--uts", "--ipc", "--fork", "--kill-child"]


def _die_with_parent() -> None:
    # If the test process dies, its services die with it (unshare --kill-child takes the namespace).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _run(argv: list[str], *, timeout: float = 30.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ComposeError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Running:
    service: Service
    launcher: subprocess.Popen[bytes]
    init_pid: int
    log_file: Path
    started_at: float
    healthy: bool = False
    failures: int = 0
    next_check: float = 0.0
    check_started: float = 0.0
    pending: Future[tuple[int, str]] | None = None

    def exit_code(self) -> int | None:
        return self.launcher.poll()


class NamespaceStack:
    """Bring a compose project up across namespaces, and tear it down."""

    def __init__(
        self,
        *,
        compose_file: Path,
        workdir: Path,
        env: Mapping[str, str],
        profiles: tuple[str, ...] = (),
        only: tuple[str, ...] = (),
        scale: Mapping[str, int] | None = None,
    ) -> None:
        self.compose_file = compose_file
        self.workdir = workdir
        loaded = load_services(compose_file, env=env, profiles=profiles, scale=scale)
        self.services = {s.name: s for s in loaded}
        if only:  # `docker compose up SERVICE...`: those and what they depend on
            wanted = _closure({s.service: s for s in loaded}, only)
            self.services = {name: s for name, s in self.services.items() if s.service in wanted}
        self.running: dict[str, Running] = {}
        self._network: subprocess.Popen[bytes] | None = None
        self._client: ThreadPoolExecutor | None = None
        self._checks = ThreadPoolExecutor(max_workers=max(4, len(self.services)))

    # lifecycle

    def up(self, *, timeout: float = 600.0) -> None:
        """Start every service once its dependencies allow; return when all are healthy (or done)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        self._start_network()
        deadline = time.monotonic() + timeout
        while not self._all_ready():
            if time.monotonic() > deadline:
                raise ComposeError(f"not up after {timeout:.0f} s: {self.status()}")
            for name, service in self.services.items():
                if name not in self.running and self._dependencies_met(service):
                    self._start(service)
            self._check_health()
            time.sleep(0.5)
        log.info("stack up: %s", self.status())

    def down(self) -> None:
        """Stop services in reverse start order: SIGTERM, then SIGKILL of the PID namespace."""
        for name in reversed(list(self.running)):
            run = self.running[name]
            try:
                self._stop(run)
            except (OSError, subprocess.SubprocessError):
                log.exception("stopping %s failed; killing its namespace", name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.init_pid, signal.SIGKILL)
        self._checks.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.shutdown(wait=True)
            self._client = None
        if self._network is not None:
            self._network.kill()
            self._network.wait()
            self._network = None

    def __enter__(self) -> NamespaceStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def status(self) -> dict[str, str]:
        states = {}
        for name in self.services:
            run = self.running.get(name)
            if run is None:
                states[name] = "waiting"
            elif run.exit_code() is not None:
                states[name] = f"exited {run.exit_code()}"
            else:
                states[name] = "healthy" if run.healthy else "running"
        return states

    def log_tail(self, name: str, lines: int = 40) -> str:
        run = self.running.get(name)
        if run is None:
            return "(not started)"
        text = run.log_file.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # operator tools

    def exec(self, name: str, argv: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside a running service's namespaces and root, with its environment
        (`docker compose exec`)."""
        run = self.running[name]
        enter = ["nsenter", f"--target={run.init_pid}", "--mount", "--net", "--pid", "--uts", "--ipc"]
        return subprocess.run(
            [*enter, "--root", "--wd", "--", *argv],
            env=self._runtime(run.service).env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def address(self, name: str) -> str:
        return self.services[name].address

    def replicas(self, service: str) -> list[str]:
        """The container names of a compose service: [service], or service-1..service-N."""
        return [s.name for s in self.services.values() if s.service == service]

    def pid(self, name: str) -> int:
        """PID (on this machine) of the container's init: the root of its whole process tree."""
        return self.running[name].init_pid

    def in_network(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn in a thread that lives in the stack's network namespace (where the bridge is),
        as the host of a compose project reaches its containers' addresses."""
        if self._client is None:
            assert self._network is not None
            self._client = ThreadPoolExecutor(
                max_workers=1, initializer=join_netns, initargs=(self._network.pid,)
            )
        return self._client.submit(fn, *args, **kwargs).result()

    # internals

    def _runtime(self, service: Service) -> Runtime:
        return runtime_for(service, script_dir=self._service_dir(service.name))

    def _service_dir(self, name: str) -> Path:
        path = self.workdir / "services" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        # A replica also answers to its service's name (compose's DNS; here the first replica wins).
        lines += [
            " ".join(dict.fromkeys([s.address, s.name, s.hostname, s.service]))
            for s in self.services.values()
        ]
        (self.workdir / "hosts").write_text("\n".join(lines) + "\n")

    def _in_network_ns(self, argv: list[str]) -> None:
        assert self._network is not None
        _run(["nsenter", f"--net=/proc/{self._network.pid}/ns/net", "--", *argv])

    def _start_network(self) -> None:
        self._network = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"], preexec_fn=_die_with_parent
        )
        _wait_for(lambda: _netns(self._network.pid) != _netns(os.getpid()), "network namespace")
        self._in_network_ns(["ip", "link", "set", "lo", "up"])
        self._in_network_ns(["ip", "link", "add", "br0", "type", "bridge"])
        self._in_network_ns(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0"])
        self._in_network_ns(["ip", "link", "set", "br0", "up"])

    def _volume_dir(self, name: str) -> Path:
        return volume_dir(self.workdir, name)

    def _mount_table(self, service: Service, runtime: Runtime) -> str:
        rows = []
        for source, target, ro in service.volumes():
            host = Path(source) if source.startswith(("/", ".")) else self._volume_dir(source)
            rows.append(f"{host.resolve()}|{target}|{'ro' if ro else 'rw'}")
        rows += [f"{host}|{target}|{'ro' if ro else 'rw'}" for host, target, ro in runtime.mounts]
        return "\n".join(rows) + "\n"

    def _start(self, service: Service) -> None:
        runtime = self._runtime(service)
        directory = self._service_dir(service.name)
        # Written here only: `exec` (health checks among them) asks for the runtime again while the
        # service starts, and rewriting a script its shell is about to read once left it empty.
        for path, text in {directory / "setup.sh": SETUP_SCRIPT, **runtime.scripts}.items():
            path.write_text(text)
        (directory / "mounts").write_text(self._mount_table(service, runtime))
        env = runtime.env | {
            "CS_HOSTNAME": service.hostname,
            "CS_DIR": str(directory),
            "CS_HOSTS": str(self.workdir / "hosts"),
            "CS_MOUNTS": str(directory / "mounts"),
            "CS_WORKDIR": str(service.spec.get("working_dir") or runtime.workdir),
        }
        log_file = self.workdir / f"{service.name}.log"
        with open(log_file, "ab") as out:
            launcher = subprocess.Popen(
                ["unshare", *NAMESPACE_FLAGS, "--", "/bin/sh", str(directory / "setup.sh"), *runtime.argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        init_pid = _wait_for(lambda: _first_child(launcher.pid), f"{service.name}'s namespaces")
        self._wire(service, init_pid, index=len(self.running))
        self.running[service.name] = Running(
            service=service,
            launcher=launcher,
            init_pid=init_pid,
            log_file=log_file,
            started_at=time.monotonic(),
        )
        log.info("started %s at %s (pid %s)", service.name, service.address, init_pid)

    def _wire(self, service: Service, init_pid: int, *, index: int) -> None:
        """A veth pair: `veth<index>` on the bridge, `eth0` with the service's address inside."""
        host_end = f"veth{index}"
        self._in_network_ns(
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", str(init_pid)]
        )
        self._in_network_ns(["ip", "link", "set", host_end, "master", "br0", "up"])
        inside = ["nsenter", f"--net=/proc/{init_pid}/ns/net", "--"]
        _run([*inside, "ip", "link", "set", "lo", "up"])
        _run([*inside, "ip", "addr", "add", f"{service.address}/24", "dev", "eth0"])
        _run([*inside, "ip", "link", "set", "eth0", "up"])
        _run([*inside, "ip", "route", "add", "default", "via", f"{SUBNET}.1"])

    def _dependencies_met(self, service: Service) -> bool:
        # A service of an inactive profile has no replicas (compose: `required: false`).
        return all(
            self._replica_ready(replica, condition)
            for name, condition in service.depends_on.items()
            for replica in self.replicas(name)
        )

    def _replica_ready(self, name: str, condition: str) -> bool:
        run = self.running.get(name)
        if run is None:
            return False
        code = run.exit_code()
        if condition == "service_completed_successfully":
            if code is None:
                return False
            if code != 0:
                raise ComposeError(f"{name} exited with {code}:\n{self.log_tail(name)}")
        elif condition == "service_healthy":
            return run.healthy
        return True

    def _all_ready(self) -> bool:
        # Every started service is looked at, so one that died fails the start at once rather than
        # after the timeout its dependents would wait for it.
        ready = [self._ready(run) for run in self.running.values()]
        return len(self.running) == len(self.services) and all(ready)

    def _ready(self, run: Running) -> bool:
        code = run.exit_code()
        if code is not None:
            if code != 0 or run.service.healthcheck is not None:
                raise ComposeError(
                    f"{run.service.name} exited with {code}:\n{self.log_tail(run.service.name)}"
                )
            return True  # a one-shot job that finished
        return run.service.healthcheck is None or run.healthy

    def _check_health(self) -> None:
        """Start due checks in the background (each runs in its service's namespaces, like Docker's),
        and record the ones that finished."""
        now = time.monotonic()
        for run in self.running.values():
            check = run.service.healthcheck
            if check is None or run.exit_code() is not None:
                continue
            if run.pending is not None and run.pending.done():
                self._record_health(run, check, run.pending.result())
                run.pending = None
            if run.pending is None and now >= run.next_check:
                run.check_started = now
                run.pending = self._checks.submit(self._health_once, run.service.name, check)

    def _health_once(self, name: str, check: Healthcheck) -> tuple[int, str]:
        try:
            result = self.exec(name, check.argv, timeout=check.timeout)
        except subprocess.TimeoutExpired:
            return -1, f"health check timed out after {check.timeout:.0f} s"
        return result.returncode, (result.stdout + result.stderr)[-500:]

    def _record_health(self, run: Running, check: Healthcheck, outcome: tuple[int, str]) -> None:
        code, output = outcome
        in_start_period = run.check_started - run.started_at < check.start_period
        run.healthy = code == 0
        log.debug("health of %s: %s %s", run.service.name, code, output[-200:])
        if run.healthy:
            run.failures = 0
        elif not in_start_period:
            run.failures += 1
            if run.failures >= check.retries:
                raise ComposeError(
                    f"{run.service.name} is unhealthy: {output}\n{self.log_tail(run.service.name)}"
                )
        pace = check.start_interval if in_start_period and not run.healthy else check.interval
        run.next_check = time.monotonic() + pace

    def _stop(self, run: Running, *, grace: float = 10.0) -> None:
        if run.exit_code() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.init_pid, signal.SIGTERM)
            try:
                run.launcher.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # Killing PID 1 of the namespace kills every process in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.init_pid, signal.SIGKILL)
                run.launcher.kill()
                run.launcher.wait(timeout=30)
        log.info("stopped %s (%s)", run.service.name, run.exit_code())


def volume_dir(workdir: Path, name: str) -> Path:
    """The host folder behind named volume `name` of a stack run in `workdir`."""
    path = workdir / "volumes" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _closure(services: Mapping[str, Service], names: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in found or name not in services:
            continue
        found.add(name)
        pending += list(services[name].depends_on)
    return found


def dags_folder() -> Path:
    """Where the installed package certsync.dags lives (the image links it at /opt/certsync/dags)."""
    spec = importlib.util.find_spec("certsync.dags")
    if spec is None or not spec.submodule_search_locations:
        raise ComposeError("certsync.dags is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _wait_for(probe: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise ComposeError(f"timed out waiting for {what}")


@contextlib.contextmanager
def compose_up(
    *,
    compose_file: Path,
    workdir: Path,
    env: Mapping[str, str],
    profiles: tuple[str, ...] = (),
    scale: Mapping[str, int] | None = None,
    timeout: float = 600.0,
) -> Iterator[NamespaceStack]:
    """The stack, up and healthy (`docker compose up --wait [--scale NAME=N]`); torn down on exit
    whatever happened."""
    stack = NamespaceStack(
        compose_file=compose_file, workdir=workdir, env=env, profiles=profiles, scale=scale
    )
    try:
        stack.up(timeout=timeout)
        yield stack
    finally:
        stack.down()
