"""Publishing under the tenant's limits, against the real DC, PostgreSQL and emulator: a service that
is down stops a batch at once and says so (the retry resumes it), and a time-boxed run defers what
it could not send to the next run, additions first, with the backlog in its summary. In both cases
every request is audited (intent and closing row) and Exchange ends holding the valid certificates."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import psycopg
import pytest
from emulator_support import Clock, held_certificates

from certsync.config import EnvSource, load_settings
from certsync.failures import Unavailable
from certsync.pipeline import Services, run_all

pytestmark = pytest.mark.integration
DATABASE = "certsync_budget"
SET_CMDLETS = ("Set-Mailbox", "Set-MailUser", "Set-MailContact")


@pytest.fixture(scope="module")
def env(own_sync_env: dict[str, str]) -> dict[str, str]:
    """The session's settings over a database and a tenant of this module's own: its runs publish."""
    return own_sync_env


def _services(env: dict[str, str], **config) -> Services:
    settings = load_settings(EnvSource(environ=env))
    exchange = dataclasses.replace(settings.exchange, timeout_s=5.0, max_concurrency=2, breaker_threshold=3)
    return Services(settings=dataclasses.replace(settings, exchange=exchange, **config))


@pytest.fixture(scope="module")
def clock(lab_at) -> Clock:
    return Clock(lab_at + timedelta(hours=3))


@pytest.fixture(scope="module")
def db(env, embedded_pg):
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def baseline(env, own_tenant, clock, db) -> dict:
    own_tenant.control.reset_config()
    run_all(_services(env), dag_id="budget", airflow_run_id="budget-baseline", logical_date=clock.next())
    return held_certificates(own_tenant)


def _drift(env, emulator, baseline, count: int) -> list[str]:
    """Wipe the certificates of `count` writable recipients behind certsync's back."""
    writable = sorted(
        (r["ExternalDirectoryObjectId"], r["RecipientTypeDetails"])
        for r in emulator.control.state()["recipients"]
        if (not r["IsDirSynced"] or r["IsExchangeCloudManaged"])
        and baseline[r["ExternalDirectoryObjectId"]][0]
    )[:count]
    client = _services(env).exchange
    cmdlet = {"UserMailbox": "Set-Mailbox", "MailUser": "Set-MailUser", "MailContact": "Set-MailContact"}
    for identity, kind in writable:
        wiped = client.set_certificates(
            cmdlet=cmdlet[kind], identity=identity, user_certificate=[], user_smime_certificate=[]
        )
        assert wiped.kind == "accepted", wiped
    emulator.control.clear_requests()
    assert len(writable) == count
    return [identity for identity, _ in writable]


def _unclosed(db) -> int:
    return db.execute(
        "SELECT count(*) FROM certsync.audit_log i WHERE i.phase = 'intent'"
        " AND NOT EXISTS (SELECT FROM certsync.audit_log c WHERE c.intent_seq = i.seq)"
    ).fetchone()[0]


def test_exchange_down_stops_the_batch_at_once_and_the_retry_resumes(
    env, own_tenant, baseline, clock, db
) -> None:
    drifted = _drift(env, own_tenant, baseline, count=6)
    for cmdlet in SET_CMDLETS:
        own_tenant.control.inject_fault(cmdlet=cmdlet, count=10_000, status=503)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match=r"looks down: \d+ requests in a row failed"):
            run_all(_services(env), dag_id="budget", airflow_run_id="budget-down", logical_date=clock.next())
        took = time.monotonic() - started
    finally:
        own_tenant.control.reset_config()
    sets = [r for r in own_tenant.control.requests() if str(r.get("cmdlet") or "").startswith("Set-")]
    assert len(sets) <= 3 + 2, sets  # the breaker's threshold plus what was in flight, not 5 per action
    assert took < 60, took
    assert _unclosed(db) == 0
    run_all(_services(env), dag_id="budget", airflow_run_id="budget-after-down", logical_date=clock.next())
    assert all(held_certificates(own_tenant)[i] == baseline[i] for i in drifted)


def test_a_time_boxed_run_defers_the_rest_and_the_next_run_finishes(
    env, own_tenant, baseline, clock, db
) -> None:
    drifted = _drift(env, own_tenant, baseline, count=8)
    own_tenant.control.set_config(latency_ms=700)
    try:
        # Batches of 6 on a window of 2: the box ends inside the first batch (its last actions are
        # deferred in one statement) and before the second begins (deferred whole, nothing sent).
        summary = run_all(
            _services(env, publish_time_box_s=1, publish_batch_size=6), dag_id="budget", airflow_run_id="budget-boxed",
            logical_date=clock.next(),
        )  # fmt: skip
    finally:
        own_tenant.control.reset_config()
    deferred = sum(n for key, n in summary["actions"].items() if key.endswith(":deferred"))
    assert deferred > 0 and summary["backlog"]["deferred"] == deferred, summary
    state = db.execute("SELECT state FROM certsync.sync_run WHERE airflow_run_id = 'budget-boxed'").fetchone()
    assert state == ("succeeded",)  # deferred is not failed: the run does not fail for its time box
    kinds = db.execute(
        "SELECT p.kind, p.state FROM certsync.planned_action p JOIN certsync.sync_run s USING (run_id)"
        " WHERE s.airflow_run_id = 'budget-boxed' AND kind IN ('add', 'replace', 'remove') ORDER BY action_no"
    ).fetchall()
    assert ("published" in {s for _, s in kinds}) and deferred < len(kinds)
    assert {s for _, s in kinds} <= {"published", "deferred"}, kinds  # none left pending
    send_order = {"add": 0, "replace": 1, "remove": 2}  # additions first, removals last, across batches
    assert [k for k, _ in kinds] == sorted((k for k, _ in kinds), key=send_order.__getitem__), kinds
    assert _unclosed(db) == 0
    run_all(_services(env), dag_id="budget", airflow_run_id="budget-after-box", logical_date=clock.next())
    assert all(held_certificates(own_tenant)[i] == baseline[i] for i in drifted)
