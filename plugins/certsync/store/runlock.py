"""One run at a time: Postgres advisory locks held by every stage that reads or writes run state.

Advisory locks belong to one database, so the lock is per certsync database. Two keys matter:

- the run slot, held in shared mode by every stage session of the one run that may work now. The
  parallel tasks of that run (validation shards, publish batches) share it; a stage of any other run
  waits until no session of another run holds it. Admission goes through a short exclusive gate, so
  two runs can never both see an empty slot. Each session names its run in `application_name`,
  which is how a waiting run finds, and names, the holder.
- a stage key per run and stage (`publish:3`, `validate:0`, `run` for a whole CLI run), exclusive,
  so the same stage of the same run never runs twice at once (a retry next to a zombie, the same
  run key started twice).

The locks are session-level: a killed worker's session ends and Postgres releases them, and a stage
that loses its session (Postgres restarted) notices before its next write and stops. Between a
run's stages (separate processes in Airflow) no session lives on: the durable run slot
(certsync.store.runslot), taken by begin and given back by finish, keeps other runs out then.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

NAMESPACE = 0x63657274  # "cert": the first key of every certsync advisory lock
SLOT, GATE = 1, 2
STAGE_NAMESPACE = NAMESPACE + 1
APP_NAME = re.compile(r"^certsync run (\d+) ")
POLL_S = 0.25

HOLDERS = """
SELECT DISTINCT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = CAST(:ns AS oid) AND l.objid = CAST(:key AS oid) AND l.objsubid = 2
"""


class RunLocked(RuntimeError):
    """Another run (or the same stage of this run) holds the lock beyond the allowed wait."""


class RunLockLost(RuntimeError):
    """The session holding the lock is gone (the database restarted): stop before writing more."""


class RunLock:
    """The locks of one stage of one run, on their own database session."""

    def __init__(self, *, conn: Connection, run_id: int, stage: str) -> None:
        self._conn = conn
        self.run_id = run_id
        self.stage = stage

    def ensure(self) -> None:
        """Raise RunLockLost unless the session that holds the locks is still alive."""
        try:
            self._conn.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError:
            raise RunLockLost(
                f"run {self.run_id}: the database session holding the run lock was lost; stopping"
                " (a retry settles what was in flight)"
            ) from None

    def try_stage(self, stage: str) -> bool:
        """Take another stage key of this run without waiting (True when taken)."""
        return bool(
            self._conn.execute(
                sa.text("SELECT pg_try_advisory_lock(CAST(:ns AS int4), hashtext(:k))"),
                {"ns": STAGE_NAMESPACE, "k": f"{self.run_id}:{stage}"},
            ).scalar()
        )

    def release_stage(self, stage: str) -> None:
        self._conn.execute(
            sa.text("SELECT pg_advisory_unlock(CAST(:ns AS int4), hashtext(:k))"),
            {"ns": STAGE_NAMESPACE, "k": f"{self.run_id}:{stage}"},
        )


def _other_runs(conn: Connection, run_id: int) -> dict[int, str]:
    """Sessions holding the run slot for another run: {run id (0 when unnamed): application name}."""
    found: dict[int, str] = {}
    for row in conn.execute(sa.text(HOLDERS), {"ns": NAMESPACE, "key": SLOT}):
        match = APP_NAME.match(row.application_name or "")
        holder = int(match.group(1)) if match else 0
        if holder != run_id:
            found[holder] = row.application_name or f"pid {row.pid}"
    return found


def _admit(conn: Connection, run_id: int) -> dict[int, str]:
    """Take the shared run slot unless another run holds it; returns the other holders."""
    conn.execute(
        sa.text("SELECT pg_advisory_lock(CAST(:ns AS int4), CAST(:key AS int4))"),
        {"ns": NAMESPACE, "key": GATE},
    )
    try:
        others = _other_runs(conn, run_id)
        if not others:
            conn.execute(
                sa.text("SELECT pg_advisory_lock_shared(CAST(:ns AS int4), CAST(:key AS int4))"),
                {"ns": NAMESPACE, "key": SLOT},
            )
        return others
    finally:
        conn.execute(
            sa.text("SELECT pg_advisory_unlock(CAST(:ns AS int4), CAST(:key AS int4))"),
            {"ns": NAMESPACE, "key": GATE},
        )


def _describe(conn: Connection, holders: dict[int, str]) -> str:
    runs = conn.execute(
        sa.text(
            "SELECT run_id, dag_id, airflow_run_id, logical_date FROM certsync.sync_run WHERE run_id = ANY(:ids)"
        ),
        {"ids": list(holders)},
    ).all()
    named = {
        r.run_id: f"run {r.run_id} ({r.dag_id} / {r.airflow_run_id}, logical date {r.logical_date})"
        for r in runs
    }
    return ", ".join(named.get(k, holders[k]) for k in sorted(holders))


def _wait_for_slot(conn: Connection, *, run_id: int, stage: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    logged = False
    while others := _admit(conn, run_id):
        if time.monotonic() >= deadline:
            raise RunLocked(
                f"run {run_id} ({stage}) refused after waiting {wait_s:.0f}s: {_describe(conn, others)}"
                " holds the certsync run lock; one run at a time works on a database"
            )
        if not logged:
            log.warning("run %s (%s) waits for %s to finish", run_id, stage, _describe(conn, others))
            logged = True
        time.sleep(POLL_S)


def _wait_for_stage(lock: RunLock, *, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not lock.try_stage(lock.stage):
        if time.monotonic() >= deadline:
            raise RunLocked(
                f"run {lock.run_id}: stage {lock.stage} is already running in another process"
                f" (waited {wait_s:.0f}s)"
            )
        time.sleep(POLL_S)


@contextmanager
def hold(engine: Engine, *, run_id: int, stage: str, wait_s: float) -> Iterator[RunLock]:
    """Hold the run slot and this stage's key for the block: wait up to `wait_s` seconds for another
    run, then refuse with RunLocked naming it."""
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        conn.execute(
            sa.text("SELECT set_config('application_name', :n, false)"),
            {"n": f"certsync run {run_id} {stage}"[:63]},
        )
        _wait_for_slot(conn, run_id=run_id, stage=stage, wait_s=wait_s)
        lock = RunLock(conn=conn, run_id=run_id, stage=stage)
        _wait_for_stage(lock, wait_s=wait_s)
        yield lock
    finally:
        _release(conn)


def _release(conn: Connection) -> None:
    try:
        conn.execute(sa.text("SELECT pg_advisory_unlock_all()"))
        conn.execute(sa.text("RESET application_name"))
        conn.close()
    except sa.exc.DBAPIError:
        conn.invalidate()  # the session is gone, and its locks with it
        conn.close()
