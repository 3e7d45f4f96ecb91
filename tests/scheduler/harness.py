"""Operating a real Airflow from the tests, as an operator would: trigger, wait, clear, backfill, kill a
worker, and read what certsync recorded and what the Exchange emulator received.

Everything the host serves lives in its private network namespace. The airflow CLI runs there under
`nsenter --net`; Python clients (HTTP, psycopg, ldap3) run on one thread of the test process that
joined that namespace with setns(2), so their sockets reach the host's loopback while the rest of the
test session stays in its own namespace.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import ldap3
import psycopg
import sqlalchemy as sa

from certsync_lab.agreement import emulator_disagreements
from certsync_lab.emulator.control import EmulatorControl
from tests.compose.airflow_api import every_entry
from tests.netns import join_netns

T = TypeVar("T")
TERMINAL = frozenset({"success", "failed"})
FAILED_TRIES = frozenset({"failed", "up_for_retry"})  # tries that ran and failed
FAILED_LOG_LINES = 30
CERT_ATTRIBUTES = ("userCertificate", "userSMIMECertificate")


class NetworkNamespace:
    """The network namespace of process `pid`: commands enter it with nsenter, calls run on a thread
    that joined it."""

    def __init__(self, *, pid: int) -> None:
        self.pid = pid
        self._thread = ThreadPoolExecutor(max_workers=1, initializer=join_netns, initargs=(pid,))

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--"]

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _process_titles() -> Iterator[tuple[int, str]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                raw = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            yield int(proc.name), raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _log_line(event: dict[str, Any]) -> str:
    """One structured log event as text, with the exception it carries (Airflow's error_detail)."""
    line = " ".join(str(event.get(k) or "") for k in ("timestamp", "level", "logger", "event")).strip()
    for error in event.get("error_detail") or ():
        line += f"\n    {error.get('exc_type')}: {error.get('exc_value')}"
    return line


def iso(moment: datetime) -> str:
    return moment.isoformat()


def now() -> datetime:
    """A logical date for a manual run: now, to the second."""
    return datetime.now(UTC).replace(microsecond=0)


def parse_time(value: str) -> datetime:
    """A timestamp of Airflow's REST API."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class SchedulerLab:
    """The host's Airflow and lab, seen from the tests (`info` is the host's ready.json)."""

    def __init__(self, *, info: dict[str, Any], netns: NetworkNamespace) -> None:
        self.info = info
        self.netns = netns
        self.env = dict(info["env"])
        self._http = netns.call(httpx.Client, base_url=info["api_url"], timeout=30.0)
        token = netns.call(self._http.get, "/auth/token").json()["access_token"]
        self._http.headers["Authorization"] = f"Bearer {token}"
        self.emulator = EmulatorControl(url=info["emulator_url"], ca_file=Path(info["emulator_ca_file"]))

    def close(self) -> None:
        self.netns.call(self._http.close)
        self.netns.call(self.emulator.close)
        self.netns.close()

    # --- Airflow: the CLI and the REST API v2 ---

    def airflow(self, *args: str, timeout: float = 120.0) -> str:
        """`airflow ARGS` in the host's namespace with Airflow's settings; its output, or a failure."""
        argv = [*self.netns.nsenter, sys.executable, "-m", "airflow", *args]
        result = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, (
            f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
        return result.stdout

    def api(self, method: str, path: str, body: Any = None) -> Any:
        response = self.netns.call(self._http.request, method, f"/api/v2{path}", json=body)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def trigger(self, *, logical_date: datetime | None = None, conf: dict[str, Any] | None = None) -> str:
        """Trigger the certsync DAG as the UI does; the new run's id."""
        body = {"logical_date": iso(logical_date) if logical_date else None, "conf": conf or {}}
        return str(self.api("POST", "/dags/certsync/dagRuns", body)["dag_run_id"])

    def dag_run(self, run_id: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/dags/certsync/dagRuns/{quote(run_id, safe='')}"))

    def dag_runs(self, *, run_type: str | None = None) -> list[dict[str, Any]]:
        runs = every_entry(
            functools.partial(self.api, "GET"), "/dags/certsync/dagRuns?order_by=run_after", "dag_runs"
        )
        return [r for r in runs if run_type is None or r["run_type"] == run_type]

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        path = f"/dags/certsync/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return every_entry(functools.partial(self.api, "GET"), path, "task_instances")

    def wait_for_run(self, run_id: str, *, timeout: float = 180.0) -> str:
        """The run's terminal state; fails naming every task's state when time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.dag_run(run_id)["state"]
            if state in TERMINAL:
                return str(state)
            time.sleep(1.0)
        raise AssertionError(
            f"run {run_id} not finished after {timeout:.0f} s: {self.describe_tasks(run_id)}"
        )

    def wait_for_task(
        self, run_id: str, task_id: str, states: Iterable[str], *, timeout: float = 120.0
    ) -> dict:
        """The first instance (any map index) of `task_id` in one of `states`."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ti in self.task_instances(run_id):
                if ti["task_id"] == task_id and ti["state"] in wanted:
                    return ti
            time.sleep(0.5)
        raise AssertionError(f"{task_id} of {run_id} never {sorted(wanted)}: {self.describe_tasks(run_id)}")

    def describe_tasks(self, run_id: str) -> str:
        """Every task's state and try, then the end of each failed try's log: a scheduler test that
        fails once in many runs must say why from its message (its lab is gone by then)."""
        tis = sorted(self.task_instances(run_id), key=lambda t: (t["start_date"] or "", t["task_id"]))
        states = ", ".join(
            f"{t['task_id']}[{t['map_index']}]={t['state']}(try {t['try_number']})" for t in tis
        )
        logs = [
            f"\n--- {t['task_id']}[{t['map_index']}] try {t['try_number']} ({t['state']}), its log's end:\n"
            + "\n".join(self.task_log(t)[-FAILED_LOG_LINES:])
            for t in tis
            if t["state"] in FAILED_TRIES
        ]
        return states + "".join(logs)

    def task_log(self, ti: dict[str, Any]) -> list[str]:
        """The log of a task instance's latest try, one line per event (the API's structured log)."""
        path = (
            f"/dags/certsync/dagRuns/{quote(ti['dag_run_id'], safe='')}/taskInstances/{ti['task_id']}"
            f"/logs/{ti['try_number']}?full_content=true&map_index={ti['map_index']}"
        )
        try:  # describing a failure must not hide it: an unreadable log is only named
            content = self.api("GET", path)["content"]
        except (AssertionError, KeyError, ValueError, httpx.HTTPError) as exc:
            return [f"(no log: {exc})"]
        return [entry if isinstance(entry, str) else _log_line(entry) for entry in content]

    def clear_tasks(self, logical_date: datetime, *, task_regex: str | None = None) -> None:
        """`airflow tasks clear` of the run at `logical_date`: all its tasks, or those whose id the
        regex matches (without anchors: Airflow 3.3's CLI clears nothing for `^publish$`)."""
        selection = ["-t", task_regex] if task_regex else []
        self.airflow(
            "tasks", "clear", "certsync", *selection, "-s", iso(logical_date), "-e", iso(logical_date), "-y"
        )

    def backfill(self, *, from_date: datetime, to_date: datetime, reprocess: str) -> None:
        self.airflow(
            "backfill", "create", "--dag-id", "certsync", "--from-date", iso(from_date),
            "--to-date", iso(to_date), "--reprocess-behavior", reprocess,
            timeout=300.0,  # the CLI loads every provider first: minutes on a busy machine
        )  # fmt: skip

    def wait_for_backfills(self, *, timeout: float = 60.0) -> None:
        """Until the scheduler has marked every backfill of the DAG completed (a new one is refused
        while one is open, even when all its runs are done)."""
        deadline = time.monotonic() + timeout
        while any(
            b["completed_at"] is None for b in self.api("GET", "/backfills?dag_id=certsync")["backfills"]
        ):
            assert time.monotonic() < deadline, f"backfills still open after {timeout:.0f} s"
            time.sleep(1.0)

    def kill_task_process(self, ti_id: str) -> int:
        """SIGKILL the process that runs task instance `ti_id`: the child of the executor's supervisor
        for it (the supervisor is titled `airflow worker -- LocalExecutor: <ti id>`, its child
        `airflow worker -- <ti id>`). The supervisor lives on and reports the loss to the scheduler."""
        supervisors = [pid for pid, title in _process_titles() if title.endswith(f": {ti_id}")]
        assert len(supervisors) == 1, f"{len(supervisors)} supervisors for task instance {ti_id}"
        children = Path(f"/proc/{supervisors[0]}/task/{supervisors[0]}/children").read_text().split()
        assert len(children) == 1, f"the supervisor of {ti_id} has children {children}"
        os.kill(int(children[0]), signal.SIGKILL)
        return int(children[0])

    # --- certsync's tables, as the lab's superuser ---

    def query(self, sql: str, params: dict[str, Any] | tuple = ()) -> list[tuple]:
        def run() -> list[tuple]:
            with psycopg.connect(self.info["certsync_dsn"], autocommit=True) as conn:
                return conn.execute(sql, params).fetchall()

        return self.netns.call(run)

    def sync_run(self, airflow_run_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT run_id, state, logical_date, dry_run, started_at, finished_at FROM certsync.sync_run"
            " WHERE dag_id = 'certsync' AND airflow_run_id = %s",
            (airflow_run_id,),
        )
        if not rows:
            return None
        keys = ("run_id", "state", "logical_date", "dry_run", "started_at", "finished_at")
        return dict(zip(keys, rows[0], strict=True))

    def audit_of(self, writes: list[dict[str, Any]]) -> dict[str, list[tuple[str, str | None, int]]]:
        """The audit rows (phase, outcome, certsync run) of each Set-* request, by client request id."""
        rows = self.query(
            "SELECT client_request_id::text, phase, outcome, run_id FROM certsync.audit_log"
            " WHERE client_request_id = ANY(%s::uuid[]) ORDER BY seq",
            ([str(w["client_request_id"]) for w in writes],),
        )
        found: dict[str, list[tuple[str, str | None, int]]] = {}
        for request_id, phase, outcome, run_id in rows:
            found.setdefault(request_id, []).append((phase, outcome, run_id))
        return found

    def unaudited(self, writes: list[dict[str, Any]]) -> list[str]:
        """The Set-* requests without exactly one intent row and one closing row (an outcome, or a
        settlement by read-back) in certsync's audit log."""
        audit = self.audit_of(writes)
        problems = []
        for write in writes:
            phases = Counter(
                phase for phase, _outcome, _run in audit.get(str(write["client_request_id"]), [])
            )
            if phases["intent"] != 1 or phases["outcome"] + phases["settlement"] != 1:
                problems.append(
                    f"{write['cmdlet']} {write['identity']} ({write['client_request_id']}): {dict(phases)}"
                )
        return problems

    def disagreements(self, sync_run_id: int) -> list[str]:
        """Writable recipients whose certificates differ from the valid ones run `sync_run_id` selected."""

        def check() -> list[str]:
            url = self.info["certsync_dsn"].replace("postgresql://", "postgresql+psycopg://")
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            try:
                with engine.connect() as conn:
                    return emulator_disagreements(conn, self.emulator.state(), run_id=sync_run_id)
            finally:
                engine.dispose()

        return self.netns.call(check)

    # --- the Exchange emulator ---

    def requests(self) -> list[dict[str, Any]]:
        return self.netns.call(self.emulator.requests)

    def writes(self, since: int = 0) -> list[dict[str, Any]]:
        """The Set-* requests the emulator answered, from entry `since` of its request log on."""
        return [r for r in self.requests()[since:] if str(r.get("cmdlet") or "").startswith("Set-")]

    def set_emulator(self, **changes: Any) -> None:
        self.netns.call(self.emulator.set_config, **changes)

    def reset_emulator(self) -> None:
        self.netns.call(self.emulator.reset_config)

    def ensure_synced(self, *, timeout: float = 180.0) -> None:
        """Make sure some run has published the tenant's initial state (tests change it from there)."""
        published = self.query(
            "SELECT count(*) FROM certsync.published_state"
            " WHERE cardinality(user_certificate) + cardinality(user_smime_certificate) > 0"
        )[0][0]
        if not published:
            run_id = self.trigger(logical_date=now())
            assert self.wait_for_run(run_id, timeout=timeout) == "success", self.describe_tasks(run_id)

    # --- the directory: changes for a run to publish ---

    def drop_certificates(self, count: int) -> list[tuple[str, dict[str, list[bytes]]]]:
        """Remove every certificate of `count` users whose certificates certsync has published, so the
        next run has replacements to send; returns what was removed (for restore_certificates)."""
        dns = [
            dn
            for (dn,) in self.query(
                "SELECT u.dn FROM certsync.published_state p JOIN certsync.source_user u USING (object_guid)"
                " WHERE cardinality(p.user_certificate) + cardinality(p.user_smime_certificate) > 0"
                " ORDER BY u.dn LIMIT %s",
                (count,),
            )
        ]
        assert len(dns) == count, f"only {len(dns)} users have published certificates, {count} wanted"
        return self.netns.call(self._drop, dns)

    def _drop(self, dns: list[str]) -> list[tuple[str, dict[str, list[bytes]]]]:
        removed = []
        with self._ldap() as conn:
            for dn in dns:
                conn.search(
                    dn, "(objectClass=user)", search_scope=ldap3.BASE, attributes=list(CERT_ATTRIBUTES)
                )
                entry = conn.response[0]["raw_attributes"]
                values = {a: list(entry.get(a) or []) for a in CERT_ATTRIBUTES}
                changes = {a: [(ldap3.MODIFY_DELETE, [])] for a, v in values.items() if v}
                assert conn.modify(dn, changes), f"removing the certificates of {dn}: {conn.result}"
                removed.append((dn, values))
        return removed

    def restore_certificates(self, removed: list[tuple[str, dict[str, list[bytes]]]]) -> None:
        def restore() -> None:
            with self._ldap() as conn:
                for dn, values in removed:
                    changes = {a: [(ldap3.MODIFY_ADD, v)] for a, v in values.items() if v}
                    assert conn.modify(dn, changes), f"restoring the certificates of {dn}: {conn.result}"

        self.netns.call(restore)

    def _ldap(self) -> ldap3.Connection:
        server = ldap3.Server(self.info["ldap_url"], get_info=ldap3.NONE, connect_timeout=5)
        return ldap3.Connection(
            server, user=self.info["bind_dn"], password=self.info["bind_password"], auto_bind=True
        )
