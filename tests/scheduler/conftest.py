"""One real Airflow 3 (api-server, scheduler, dag-processor; LocalExecutor; metadata in PostgreSQL)
and one lab for the whole session of scheduler tests.

Samba's LDAP port is fixed on 127.0.0.1:389, and the rest of the suite may hold it in this network
namespace. So the fixture starts a single host process under `unshare --net` (tests/scheduler/host.py)
that runs the lab and Airflow in a network namespace of their own; the tests reach them through
`nsenter --net=/proc/<host pid>/ns/net` (the airflow CLI) and through one thread that joined that
namespace (HTTP, PostgreSQL, LDAP clients). Processes are shared, so the tests can find and kill an
Airflow worker by its pid. Closing the host's stdin (or the session dying) stops everything.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scheduler.harness import NetworkNamespace, SchedulerLab

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def _test_cache() -> Path:
    """The suite's cache (provisioned Samba domain, PKI key pool), as tests/integration keeps it."""
    return Path(os.environ.get("CERTSYNC_TEST_CACHE", REPO / ".certsync" / "test-cache"))


def _wait_ready(host: subprocess.Popen[str], log_file: Path) -> None:
    assert host.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([host.stdout], [], [], 1.0)
        if readable:
            line = host.stdout.readline()
            if line.strip() == "ready":
                return
            if line == "":  # the host exited
                break
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
    raise RuntimeError(f"the scheduler host did not get ready (exit {host.poll()}):\n{tail}")


def _stop(host: subprocess.Popen[str]) -> None:
    assert host.stdin is not None
    host.stdin.close()
    try:
        host.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        host.kill()
        host.wait()


@pytest.fixture(scope="session")
def scheduler_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchedulerLab]:
    """The lab and Airflow, up once for the session (about a minute), stopped at its end."""
    base = tmp_path_factory.mktemp("scheduler")
    home, log_file = base / "lab", base / "host.log"
    with open(log_file, "w") as log:
        host = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-m", "tests.scheduler.host", str(home),
             "--cache", str(_test_cache())],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    try:
        _wait_ready(host, log_file)
        info = json.loads((home / "ready.json").read_text())
        lab = SchedulerLab(info=info, netns=NetworkNamespace(pid=host.pid))
        try:
            yield lab
        finally:
            lab.close()
    finally:
        _stop(host)


@pytest.fixture
def lab(scheduler_lab: SchedulerLab) -> Iterator[SchedulerLab]:
    """The session's lab, with the emulator's knobs (latency, faults) back to normal after the test."""
    yield scheduler_lab
    scheduler_lab.reset_emulator()


@pytest.fixture
def synced_lab(lab: SchedulerLab) -> SchedulerLab:
    """The lab after a first run published the tenant's initial state."""
    lab.ensure_synced()
    return lab
