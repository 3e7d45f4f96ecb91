"""The Airflow REST API as an operator uses it against a compose stack: a token from /auth/token,
then /api/v2 to wait for the DAG, trigger a run, follow it and read its task instances."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

HTTP_TIMEOUT_S = 120  # a busy API server answers slowly; the poll loop must not give up on one call
# The compose file's local-lab default login (no .env is given to the tests or the bench).
ADMIN = {"username": "admin", "password": "admin"}


class Api:
    """An authenticated session on one API server."""

    def __init__(self, base: str, *, login: dict[str, str] | None = None) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.trust_env = False
        response = self.session.post(f"{base}/auth/token", json=login or ADMIN, timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def call(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.session.request(method, f"{self.base}/api/v2/{path}", json=body, timeout=HTTP_TIMEOUT_S)


def wait_for_dag(api: Api, dag_id: str, *, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.call("GET", f"dags/{dag_id}").status_code == 200:
            return
        time.sleep(2)
    raise AssertionError(f"the DAG processor did not register {dag_id!r} within {timeout:.0f} s")


def trigger(api: Api, dag_id: str, *, conf: dict[str, Any] | None = None) -> str:
    """Unpause the DAG and queue a manual run now; returns its run id."""
    assert api.call("PATCH", f"dags/{dag_id}", {"is_paused": False}).status_code == 200
    response = api.call("POST", f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
    assert response.status_code == 200, response.text
    return str(response.json()["dag_run_id"])


def wait_for_run(
    api: Api, dag_id: str, run_id: str, *, timeout: float, poll_s: float = 3.0
) -> dict[str, Any]:
    """The run once it succeeded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.call("GET", f"dags/{dag_id}/dagRuns/{run_id}").json()
        if run["state"] in ("success", "failed"):
            return dict(run)
        time.sleep(poll_s)
    raise AssertionError(f"run {run_id} did not finish within {timeout:.0f} s")


def every_entry(get: Callable[[str], Any], path: str, key: str) -> list[dict[str, Any]]:
    """Every entry of an API v2 listing (`get(path)` answers one page as JSON), page by page: the
    server caps a page at its `maximum_page_limit` (100 by default) whatever `limit` asks, so a
    run with more task instances (a publish mapped over 200 batches) would be cut short."""
    found: list[dict[str, Any]] = []
    joiner = "&" if "?" in path else "?"
    while True:
        page = get(f"{path}{joiner}offset={len(found)}")
        found += page[key]
        if not page[key] or len(found) >= page["total_entries"]:
            return found


def task_instances(api: Api, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every task instance of the run (mapped ones one per map index), as the API gives them."""

    def get(path: str) -> Any:
        response = api.call("GET", path)
        response.raise_for_status()
        return response.json()

    return every_entry(get, f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances")
