"""The process that hosts the lab and a real Airflow for the scheduler tests.

Run as `unshare --net -- python -m tests.scheduler.host HOME`: in a network namespace of its own it
brings loopback up, starts the lab (PostgreSQL, a Samba AD DC on 127.0.0.1:389, the Exchange emulator)
and Airflow's api-server, scheduler and dag-processor, each in a process group of its own. It writes
HOME/ready.json (where everything is) and prints `ready`; it tears everything down when its stdin
closes (the test session ended, or died) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import certsync.dags
from certsync_lab.stack import LabStack

log = logging.getLogger("scheduler-host")

API_PORT = 8080  # the namespace is private: nothing else listens here
COMPONENTS = ("api-server", "scheduler", "dag-processor")
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
USERS = 60  # enough users with published certificates for every test to change some (disabled accounts publish none)
# Small publish batches: a run maps publish over several batches, as a tenant-sized run would.
PUBLISH_BATCH_SIZE = 4


def loopback_up() -> None:
    """`ip link set lo up` without iproute2 (a fresh network namespace has loopback down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(sock, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP


def start_lab(home: Path, cache: Path) -> LabStack:
    """The lab with a small population; the cached Samba domain and key pool spare provisioning."""
    for name, target in (("samba", home / "cache"), ("pki-keys", home / "keys")):
        if (cache / name).is_dir() and not target.exists():
            shutil.copytree(cache / name, target)
    return LabStack(home=home, users=USERS).up()


def airflow_environment(stack: LabStack) -> dict[str, str]:
    """Airflow as an operator would run it: metadata in PostgreSQL, LocalExecutor, the packaged DAGs,
    and certsync's connections and variable from the lab."""
    airflow_home = stack.home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    metadata = stack.postgres.ensure_database("airflow").replace("postgresql://", "postgresql+psycopg://")
    config = {**stack.config(), "publish_batch_size": PUBLISH_BATCH_SIZE}
    settings = {**stack.environment(), "AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps(config)}
    return {
        **settings,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(next(iter(certsync.dags.__path__))),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__API__PORT": str(API_PORT),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{API_PORT}",
        # The scheduler signs the tokens the api-server checks: one secret for every component.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        # Only the tests create runs (triggers, backfills): no hourly run appears mid-test.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    }


def process_environment(airflow_env: dict[str, str]) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **airflow_env}


def start_component(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """`airflow <name>` in a process group of its own (stopped as a group, workers included)."""
    with open(logs / f"{name}.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "airflow", name],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_component(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group (the scheduler hands it to its executor's workers), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            # Children of the group (task supervisors) may outlive the leader for a moment.
            _wait_group_gone(process.pid, grace)
            return
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop on %s", process.args, sig.name)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise subprocess.TimeoutExpired(str(pgid), timeout)


def wait_until_ready(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Healthy scheduler and dag-processor, and the certsync DAG parsed and unpaused."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=5.0) as client:
        while time.monotonic() < deadline:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited with {process.returncode}")
            if _ready(client):
                return
            time.sleep(1.0)
    raise RuntimeError(f"Airflow not ready after {READY_TIMEOUT_S:.0f} s")


def _ready(client: httpx.Client) -> bool:
    try:
        health = client.get("/api/v2/monitor/health").json()
        if any(health.get(part, {}).get("status") != "healthy" for part in ("scheduler", "dag_processor")):
            return False
        token = client.get("/auth/token").json()["access_token"]
        dag = client.get("/api/v2/dags/certsync", headers={"Authorization": f"Bearer {token}"})
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return dag.status_code == 200 and dag.json().get("is_paused") is False


def describe(stack: LabStack, env: dict[str, str]) -> dict[str, object]:
    """What the tests need to reach every service (written 0600: it holds the lab's secrets)."""
    return {
        "pid": os.getpid(),
        "env": env,
        "api_url": f"http://127.0.0.1:{API_PORT}",
        "certsync_dsn": stack.postgres.dsn_for("certsync"),
        "airflow_dsn": stack.postgres.dsn_for("airflow"),
        "emulator_url": stack.emulator.url,
        "emulator_ca_file": str(stack.emulator.ca_file),
        "ldap_url": stack.samba.ldap_url,
        "bind_dn": stack.samba.bind_dn,
        "bind_password": stack.samba.password,
        "users_ou": stack.samba.users_ou,
    }


def serve(home: Path, cache: Path) -> None:
    loopback_up()
    stack = start_lab(home, cache)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        env = process_environment(airflow_environment(stack))
        logs = home / "airflow" / "component-logs"
        logs.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True
        )
        for name in COMPONENTS:
            processes[name] = start_component(name, env, logs)
        wait_until_ready(processes)
        ready = home / "ready.json"
        ready.touch(mode=0o600)
        ready.write_text(json.dumps(describe(stack, env)))
        print("ready", flush=True)
        _wait_for_end()
    finally:
        for process in reversed(list(processes.values())):
            stop_component(process)
        stack.down()


def _wait_for_end() -> None:
    """Until stdin closes or SIGTERM arrives."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("home", type=Path)
    parser.add_argument("--cache", type=Path, required=True, help="the tests' cache (Samba domain, keys)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.home.resolve(), args.cache)


if __name__ == "__main__":
    main()
