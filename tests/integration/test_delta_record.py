"""A delta plan's record: the plan saves the users it planned again, and carry_over (beside publish)
copies the base plan's results of everyone else, once per plan (finish does it when carry_over did
not run). Until then the run's record is not whole, and no later plan starts from it. A database
and a tenant of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import psycopg
import pytest

from certsync.config import EnvSource, load_settings
from certsync.failures import RunFailed
from certsync.pipeline import (
    Services,
    begin,
    carry_over,
    extract,
    finish,
    plan,
    publish,
    read_recipients,
    run_all,
    validate,
)

pytestmark = pytest.mark.integration
DATABASE = "certsync_delta_record"


# carry_over in a process of its own, to be killed mid-copy.
WORKER = """
import sys
from certsync.config import EnvSource, load_settings
from certsync.pipeline import Services, carry_over
carry_over(Services(settings=load_settings(EnvSource())), run_id=int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def services(own_sync_env: dict[str, str]) -> Services:
    return Services(settings=load_settings(EnvSource(environ=own_sync_env)))


@pytest.fixture(scope="module")
def db(services, embedded_pg) -> Iterator[psycopg.Connection]:
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


def _whole_run(services: Services, db, when: datetime) -> int:
    key = f"record__{uuid.uuid4()}"
    run_all(services, dag_id="record", airflow_run_id=key, logical_date=when)
    return db.execute("SELECT run_id FROM certsync.sync_run WHERE airflow_run_id = %s", (key,)).fetchone()[0]


def _planned_run(
    services: Services, when: datetime, *, before_plan: Callable[[int], object] | None = None
) -> tuple[int, list[int]]:
    """A run up to its saved plan, stage by stage as the DAG runs them (`before_plan`: called with
    the run's id between validate and plan)."""
    run_id = begin(
        services,
        dag_id="record",
        airflow_run_id=f"record__{uuid.uuid4()}",
        logical_date=when,
        mode="delta",
        dry_run=False,
    )
    extract(services, run_id=run_id)
    read_recipients(services, run_id=run_id)
    validate(services, run_id=run_id)
    if before_plan is not None:
        before_plan(run_id)
    return run_id, plan(services, run_id=run_id)


def _results(db, run_id: int) -> set[tuple]:
    return set(
        db.execute(
            "SELECT object_guid, attribute, sha256, selected, reason FROM certsync.value_result WHERE run_id = %s",
            (run_id,),
        )
    )


def _unpublishable(db, run_id: int) -> set[tuple]:
    return set(
        db.execute(
            "SELECT object_guid, kind, recipient_id, reason FROM certsync.planned_action"
            " WHERE run_id = %s AND kind IN ('conflict', 'no_recipient')",
            (run_id,),
        )
    )


def _scope(db, run_id: int) -> tuple:
    return db.execute(
        "SELECT plan_scope, plan_base_run_id, carried_at IS NOT NULL FROM certsync.sync_run WHERE run_id = %s",
        (run_id,),
    ).fetchone()


def test_a_delta_plans_record_is_whole_once_carried_over(services, db, lab_at) -> None:
    first = _whole_run(services, db, lab_at + timedelta(days=3))
    assert _scope(db, first)[0::2] == ("full", True)  # a full plan is whole as saved
    whole, unpublishable = _results(db, first), _unpublishable(db, first)
    assert whole and unpublishable  # the population plants conflicts and users without a recipient

    run_id, batches = _planned_run(services, lab_at + timedelta(days=3, hours=1))
    assert _scope(db, run_id) == ("delta", first, False)
    planned = _results(db, run_id)
    assert len(planned) < len(whole) and planned <= whole  # only the users planned again, so far

    carried = carry_over(services, run_id=run_id)
    assert carried == {"results": len(whole) - len(planned), "actions": carried["actions"]}
    assert _results(db, run_id) == whole and _unpublishable(db, run_id) == unpublishable
    assert carry_over(services, run_id=run_id) == {"results": 0, "actions": 0}  # once per plan

    # A cleared plan starts the record over (its copy is deleted with it), and carries again.
    assert plan(services, run_id=run_id) == batches
    assert _scope(db, run_id)[2] is False and _results(db, run_id) == planned
    assert carry_over(services, run_id=run_id) == carried
    assert _results(db, run_id) == whole and _unpublishable(db, run_id) == unpublishable

    for batch in batches:
        publish(services, run_id=run_id, batch=batch)
    assert finish(services, run_id=run_id)["run"]["carried"] is True


def _wipe_a_mailbox(services: Services, emulator) -> None:
    """Someone else empties a writable mailbox's certificates in Exchange: its user is planned again."""
    identity = next(
        r["ExternalDirectoryObjectId"]
        for r in sorted(emulator.control.state()["recipients"], key=lambda r: r["ExternalDirectoryObjectId"])
        if r["RecipientTypeDetails"] == "UserMailbox"
        and (not r["IsDirSynced"] or r["IsExchangeCloudManaged"])
        and r["UserCertificate"]
    )
    services.exchange.set_certificates(
        cmdlet="Set-Mailbox", identity=identity, user_certificate=[], user_smime_certificate=[]
    )


def test_finish_makes_the_record_whole_when_carry_over_did_not_run(services, db, lab_at, own_tenant) -> None:
    """As after a clear of plan alone: the plan starts the record over, and carry_over, already
    done, does not run again."""
    base = _whole_run(services, db, lab_at + timedelta(days=4))
    _wipe_a_mailbox(services, own_tenant)
    run_id, batches = _planned_run(services, lab_at + timedelta(days=4, hours=1))
    assert _results(db, run_id) and _scope(db, run_id) == ("delta", base, False)
    for batch in batches:
        publish(services, run_id=run_id, batch=batch)
    assert finish(services, run_id=run_id)["run"]["carried"] is True
    assert _results(db, run_id) == _results(db, base)
    assert _unpublishable(db, run_id) == _unpublishable(db, base)


def test_a_run_that_died_before_its_record_was_whole_is_no_base(services, db, lab_at, own_tenant) -> None:
    _whole_run(services, db, lab_at + timedelta(days=5))
    _wipe_a_mailbox(services, own_tenant)
    run_id, _batches = _planned_run(services, lab_at + timedelta(days=5, hours=1))
    assert _results(db, run_id)  # the user planned again: the record is there, but not whole
    # Its processes die before carry_over and finish: the next run takes the run slot over.
    db.execute("UPDATE certsync.run_slot SET run_id = NULL")
    after = _whole_run(services, db, lab_at + timedelta(days=5, hours=2))
    assert _scope(db, after) == ("full", None, True)  # not planned from the run left half-recorded
    with contextlib.suppress(RunFailed):  # close it (superseded by now)
        finish(services, run_id=run_id)


def test_a_carry_over_killed_mid_copy_leaves_nothing_and_runs_again(
    own_sync_env, services, db, lab_at, own_tenant, embedded_pg
) -> None:
    first = _whole_run(services, db, lab_at + timedelta(days=6))
    whole = _results(db, first)
    _wipe_a_mailbox(services, own_tenant)
    run_id, batches = _planned_run(services, lab_at + timedelta(days=6, hours=1))
    planned = _results(db, run_id)
    with psycopg.connect(embedded_pg.dsn_for(DATABASE)) as blocker:
        # The actions' copy waits behind this lock, after the value results were copied.
        blocker.execute("LOCK TABLE certsync.planned_action IN SHARE MODE")
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(run_id)], env={**os.environ, **own_sync_env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            waiting = _waiting_on(db, "INSERT INTO certsync.planned_action", worker)
            # Meanwhile publish writes audit rows, whose key names the run: its check's lock is free.
            db.execute("SELECT FROM certsync.sync_run WHERE run_id = %s FOR KEY SHARE NOWAIT", (run_id,))
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.communicate(timeout=30)
        blocker.rollback()
    while db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (waiting,)).fetchone():
        time.sleep(0.05)  # the killed session ends (and rolls back) when Postgres notices
    assert _scope(db, run_id)[2] is False and _results(db, run_id) == planned

    assert carry_over(services, run_id=run_id)["results"] == len(whole) - len(planned)  # the retry
    assert _results(db, run_id) == whole
    for batch in batches:
        publish(services, run_id=run_id, batch=batch)
    finish(services, run_id=run_id)


def _waiting_on(db, statement: str, worker: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """The pid of the session that waits for a lock in `statement`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f"%{statement}%",),
        ).fetchone()
        if row:
            return int(row[0])
        assert worker.poll() is None, f"the worker ended first: {worker.communicate()[0][-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"nothing waited in {statement!r} within {timeout_s:.0f} s")


PLAN_TABLES = ("cert_verdict", "exo_recipient", "source_user", "source_value")  # sql/0021


def test_a_delta_plan_analyzes_the_tables_rewritten_before_it(services, db, lab_at) -> None:
    """sql/0021: a plan can start seconds after a stage rewrote a table it reads, before autovacuum
    analyzed it, and without statistics PostgreSQL joined the verdicts by a nested loop. A delta
    plan refreshes them first (pipeline._refresh_statistics). Autovacuum is off for those tables
    here, so only the plan can have analyzed them."""
    base = _whole_run(services, db, lab_at + timedelta(days=7))
    stale = []

    def rewrite_the_verdicts(_run_id: int) -> None:
        # As a re-validation under new trust files would: every verdict changed since its statistics.
        rows = db.execute("UPDATE certsync.cert_verdict SET detail = detail").rowcount
        db.execute("SELECT pg_stat_force_next_flush()")  # this session reports its counts at once
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _statistics(db, "cert_verdict")[1] < rows:
            time.sleep(0.2)
        stale.append(_statistics(db, "cert_verdict"))

    for table in PLAN_TABLES:
        db.execute(f"ALTER TABLE certsync.{table} SET (autovacuum_enabled = off)")
    try:
        run_id, batches = _planned_run(
            services, lab_at + timedelta(days=7, hours=1), before_plan=rewrite_the_verdicts
        )
        after = _statistics(db, "cert_verdict")
    finally:
        for table in PLAN_TABLES:
            db.execute(f"ALTER TABLE certsync.{table} RESET (autovacuum_enabled)")
    assert _scope(db, run_id)[:2] == ("delta", base)
    (before,) = stale
    assert before[1] >= 60, before  # all of them: over 50 rows and a tenth of the table
    assert after == (before[0] + 1, 0), (before, after)
    for batch in batches:
        publish(services, run_id=run_id, batch=batch)
    finish(services, run_id=run_id)


def _statistics(db, table: str) -> tuple[int, int]:
    """(Times `table` was analyzed by an ANALYZE statement, rows changed in it since)."""
    count, changed = db.execute(
        "SELECT analyze_count, n_mod_since_analyze FROM pg_stat_user_tables"
        " WHERE schemaname = 'certsync' AND relname = %s",
        (table,),
    ).fetchone()
    return int(count), int(changed)
