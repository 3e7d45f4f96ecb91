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
import requests

from tests.compose.namespaces import REPO, NamespaceStack, compose_up, volume_dir

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

COMPOSE_FILE = REPO / "docker-compose.yml"
DAG_ID = "certsync"
RUN_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 120  # a busy API server answers slowly; the poll loop must not give up on one call
# The compose file's local-lab defaults (no .env is given to the test).
ADMIN = {"username": "admin", "password": "admin"}
CERTSYNC_OWNER = {"user": "certsync", "password": "certsync-lab", "dbname": "certsync"}

EMULATOR_STATE = """
import json
from pathlib import Path
from certsync_lab.emulator.control import EmulatorControl
control = EmulatorControl(url="https://emulator:8443", ca_file=Path("/var/lib/exchange-emulator/tls/ca.pem"))
print(json.dumps(control.state()["recipients"]))
"""


class Api:
    """The Airflow REST API as an operator uses it: a token from /auth/token, then /api/v2."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.trust_env = False
        response = self.session.post(f"{base}/auth/token", json=ADMIN, timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.session.request(method, f"{self.base}/api/v2/{path}", json=body, timeout=HTTP_TIMEOUT_S)


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


def _wait_for_dag(api: Api) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if api.call("GET", f"dags/{DAG_ID}").status_code == 200:
            return
        time.sleep(2)
    raise AssertionError(f"the DAG processor did not register {DAG_ID!r} within 180 s")


def _trigger_and_wait(api: Api) -> dict[str, Any]:
    # Unpausing also lets the scheduler add the latest hourly run; max_active_runs=1 runs them in turn,
    # and whichever publishes first, the triggered run must succeed after it.
    assert api.call("PATCH", f"dags/{DAG_ID}", {"is_paused": False}).status_code == 200
    response = api.call("POST", f"dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {}})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = api.call("GET", f"dags/{DAG_ID}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed"):
            return dict(run)
        time.sleep(3)
    raise AssertionError(f"run {run_id} did not finish within {RUN_TIMEOUT_S} s")


def _task_states(api: Api, run_id: str) -> dict[str, str]:
    response = api.call("GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    return {
        f"{ti['task_id']}[{ti['map_index']}]": str(ti["state"]) for ti in response.json()["task_instances"]
    }


def _sync_once(stack: NamespaceStack) -> None:
    before = _cloud_with_certificates(_emulator_recipients(stack))
    assert before == 0, "the emulator's cloud recipients start without certificates"
    api = stack.in_network(Api, f"http://{stack.address('airflow-apiserver')}:8080")
    stack.in_network(_wait_for_dag, api)
    run = stack.in_network(_trigger_and_wait, api)
    states = stack.in_network(_task_states, api, run["dag_run_id"])
    log.info("run %s: %s; tasks %s", run["dag_run_id"], run["state"], states)
    assert run["state"] == "success", f"tasks: {states}\n{stack.log_tail('airflow-scheduler')}"
    assert _cloud_with_certificates(_emulator_recipients(stack)) > 0
    assert stack.in_network(_audit_rows, stack.address("certsync-db")) > 0


@pytest.fixture(scope="module")
def dc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The provisioned domain's tarball, kept between the two stacks (provisioning takes 10-50 s)."""
    return tmp_path_factory.mktemp("samba-cache")


def _run_profile(workdir: Path, dc_cache: Path, *, profiles: tuple[str, ...], env: dict[str, str]) -> None:
    began = time.monotonic()
    cache = volume_dir(workdir, "samba") / "cache"
    shutil.copytree(dc_cache, cache, dirs_exist_ok=True)
    try:
        with compose_up(compose_file=COMPOSE_FILE, workdir=workdir, env=env, profiles=profiles) as stack:
            log.info("up in %.0f s: %s", time.monotonic() - began, stack.status())
            shutil.copytree(cache, dc_cache, dirs_exist_ok=True)
            _sync_once(stack)
    finally:
        log.info("profile %s done in %.0f s", profiles or "default", time.monotonic() - began)


def test_default_profile_syncs_across_services(tmp_path: Path, dc_cache: Path) -> None:
    _run_profile(tmp_path, dc_cache, profiles=(), env={})


def test_celery_profile_syncs_through_a_worker(tmp_path: Path, dc_cache: Path) -> None:
    _run_profile(tmp_path, dc_cache, profiles=("celery",), env={"AIRFLOW_EXECUTOR": "CeleryExecutor"})
