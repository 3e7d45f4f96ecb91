"""docker-compose.yml, run service by service in namespaces (tests/compose/namespaces.py): the stack comes
up healthy, an operator triggers the `certsync` DAG through the API server's REST API, the run succeeds
across the services, the emulator then holds certificates and certsync's audit log has rows.

Needs root (namespaces, mounts), Debian's postgresql and redis-server packages and Samba's AD DC
(scripts/bootstrap.sh installs them). No outer `unshare -n` is needed: the runner never touches the
caller's network; its bridge lives in a network namespace it creates, and every service has its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.compose.airflow_api import Api, task_instances, trigger, wait_for_dag, wait_for_run
from tests.compose.namespaces import REPO, NamespaceStack, compose_up, volume_dir

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

COMPOSE_FILE = REPO / "docker-compose.yml"
DAG_ID = "certsync"
RUN_TIMEOUT_S = 600
# The compose file's local-lab default (no .env is given to the test).
CERTSYNC_OWNER = {"user": "certsync", "password": "certsync-lab", "dbname": "certsync"}

EMULATOR_STATE = """
import json
from pathlib import Path
from certsync_lab.emulator.control import EmulatorControl
control = EmulatorControl(url="https://emulator:8443", ca_file=Path("/var/lib/exchange-emulator/tls/ca.pem"))
print(json.dumps(control.state()["recipients"]))
"""


def _emulator_recipients(stack: NamespaceStack) -> list[dict[str, Any]]:
    result = stack.exec("airflow-scheduler", ["python", "-c", EMULATOR_STATE])
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def _cloud_with_certificates(recipients: list[dict[str, Any]]) -> int:
    """Recipients that only certsync can give certificates (not synchronised from on-premises)."""
    return sum(
        1 for r in recipients if not r["IsDirSynced"] and (r["UserCertificate"] or r["UserSMimeCertificate"])
    )


def _audit_rows(address: str) -> int:
    with psycopg.connect(host=address, port=5432, connect_timeout=10, **CERTSYNC_OWNER) as conn:
        return int(conn.execute("SELECT count(*) FROM certsync.audit_log").fetchone()[0])


def _trigger_and_wait(api: Api) -> dict[str, Any]:
    # Unpausing also lets the scheduler add the latest hourly run; max_active_runs=1 runs them in turn,
    # and whichever publishes first, the triggered run must succeed after it.
    run_id = trigger(api, DAG_ID)
    return wait_for_run(api, DAG_ID, run_id, timeout=RUN_TIMEOUT_S)


def _task_hosts(api: Api, run_id: str) -> dict[str, tuple[str, str | None]]:
    """Per task instance (`task[map_index]`): its state and the host whose worker ran it."""
    return {
        f"{ti['task_id']}[{ti['map_index']}]": (str(ti["state"]), ti.get("hostname"))
        for ti in task_instances(api, DAG_ID, run_id)
    }


def _sync_once(stack: NamespaceStack) -> dict[str, tuple[str, str | None]]:
    before = _cloud_with_certificates(_emulator_recipients(stack))
    assert before == 0, "the emulator's cloud recipients start without certificates"
    api = stack.in_network(Api, f"http://{stack.address('airflow-apiserver')}:8080")
    stack.in_network(wait_for_dag, api, DAG_ID)
    run = stack.in_network(_trigger_and_wait, api)
    tasks = stack.in_network(_task_hosts, api, run["dag_run_id"])
    log.info("run %s: %s; tasks %s", run["dag_run_id"], run["state"], tasks)
    assert run["state"] == "success", f"tasks: {tasks}\n{stack.log_tail('airflow-scheduler')}"
    assert _cloud_with_certificates(_emulator_recipients(stack)) > 0
    assert stack.in_network(_audit_rows, stack.address("certsync-db")) > 0
    return tasks


@pytest.fixture(scope="module")
def dc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The provisioned domain's tarball, kept between the two stacks (provisioning takes 10-50 s)."""
    return tmp_path_factory.mktemp("samba-cache")


def _run_profile(
    workdir: Path,
    dc_cache: Path,
    *,
    profiles: tuple[str, ...],
    env: dict[str, str],
    scale: dict[str, int] | None = None,
) -> tuple[NamespaceStack, dict[str, tuple[str, str | None]]]:
    began = time.monotonic()
    cache = volume_dir(workdir, "samba") / "cache"
    shutil.copytree(dc_cache, cache, dirs_exist_ok=True)
    try:
        with compose_up(
            compose_file=COMPOSE_FILE, workdir=workdir, env=env, profiles=profiles, scale=scale
        ) as stack:
            log.info("up in %.0f s: %s", time.monotonic() - began, stack.status())
            shutil.copytree(cache, dc_cache, dirs_exist_ok=True)
            return stack, _sync_once(stack)
    finally:
        log.info("profile %s done in %.0f s", profiles or "default", time.monotonic() - began)


def test_default_profile_syncs_across_services(tmp_path: Path, dc_cache: Path) -> None:
    _run_profile(tmp_path, dc_cache, profiles=(), env={})


def test_celery_profile_syncs_through_two_workers(tmp_path: Path, dc_cache: Path) -> None:
    """`--scale airflow-worker=2`: both workers join the queue, and every task ran on one of them,
    recorded under that worker's own hostname."""
    stack, tasks = _run_profile(
        tmp_path,
        dc_cache,
        profiles=("celery",),
        env={"AIRFLOW_EXECUTOR": "CeleryExecutor"},
        scale={"airflow-worker": 2},
    )
    workers = stack.replicas("airflow-worker")
    assert workers == ["airflow-worker-1", "airflow-worker-2"]
    hosts = {host for _, host in tasks.values()}
    assert hosts <= set(workers), f"tasks ran outside the workers: {tasks}"
    log.info("tasks per worker: %s", {w: sum(h == w for _, h in tasks.values()) for w in workers})
