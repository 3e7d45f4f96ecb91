"""Write-ahead auditing and one run at a time, against the real DC, PostgreSQL and emulator.

A worker process runs `certsync.pipeline.run_all` and is killed with SIGKILL at each point of a
publish: before its intent commits (the test holds the audit chain's lock, so the insert waits),
between the intent and Exchange applying the write (the emulator holds the request, then refuses it),
and after Exchange applied it but before the answer arrived (the emulator holds the answer). Also:
PostgreSQL stopped mid-publish, a client timeout whose write Exchange applied late, two runs at
once, the same run key twice, and an older run after a newer one.

After each recovery: every Set-* in the emulator's request log has exactly one intent row and one
closing row (outcome or settlement), no write is sent again once applied, no intent is left open,
and Exchange holds what a clean run left there (the valid certificates).
"""

from __future__ import annotations

import dataclasses
import json
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
from emulator_support import Clock, held_certificates

from certsync import publisher
from certsync.config import EnvSource, connection_uri, load_settings
from certsync.pipeline import Services, run_all
from certsync.store import publishing

pytestmark = pytest.mark.integration
DATABASE = "certsync_recovery"
TIMEOUT_S = 2.0  # the workers' Exchange client timeout: settling waits for it after a death
DRIFTED = 3  # mailboxes whose certificates are wiped in Exchange before each scenario

WORKER = """
import dataclasses, logging, sys
from datetime import datetime
from certsync.config import EnvSource, load_settings
from certsync.pipeline import Services, run_all

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
settings = load_settings(EnvSource())
exchange = dataclasses.replace(settings.exchange, timeout_s=float(sys.argv[3]))
services = Services(settings=dataclasses.replace(settings, exchange=exchange))
run_all(services, dag_id="recovery", airflow_run_id=sys.argv[1], logical_date=datetime.fromisoformat(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def env(own_sync_env: dict[str, str]) -> dict[str, str]:
    # One request in flight: each kill point is a point in one request's life. With several in
    # flight, which request a hold or fault catches is a race (concurrency: test_publish_budget).
    exchange = EnvSource(environ=own_sync_env).connection("certsync_exchange")
    assert exchange is not None
    exchange = dataclasses.replace(exchange, extra={**exchange.extra, "max_concurrency": 1})
    return {**own_sync_env, "AIRFLOW_CONN_CERTSYNC_EXCHANGE": connection_uri(exchange)}


def _services(env: dict[str, str], **config) -> Services:
    settings = load_settings(EnvSource(environ=env))
    exchange = dataclasses.replace(settings.exchange, timeout_s=TIMEOUT_S)
    return Services(settings=dataclasses.replace(settings, exchange=exchange, **config))


@pytest.fixture(scope="module")
def db(env, embedded_pg) -> Iterator[psycopg.Connection]:
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def clock(lab_at) -> Clock:
    return Clock(lab_at + timedelta(hours=1))  # inside the CRLs' validity


@pytest.fixture(scope="module")
def baseline(env, own_tenant, clock, db) -> dict:
    """A clean run first: what Exchange holds afterwards is the valid certificates (the oracle)."""
    own_tenant.control.reset_config()
    run_all(_services(env), dag_id="recovery", airflow_run_id="baseline", logical_date=clock.next())
    assert not _open_intents(db)
    return held_certificates(own_tenant)


def _drift(env, emulator, baseline, count: int = DRIFTED) -> list[str]:
    """Wipe the certificates of `count` writable mailboxes behind certsync's back; returns their ids."""
    mailboxes = sorted(
        r["ExternalDirectoryObjectId"]
        for r in emulator.control.state()["recipients"]
        if r["RecipientTypeDetails"] == "UserMailbox"
        and (not r["IsDirSynced"] or r["IsExchangeCloudManaged"])
        and baseline[r["ExternalDirectoryObjectId"]][0]
    )[:count]
    client = _services(env).exchange
    for identity in mailboxes:
        wiped = client.set_certificates(
            cmdlet="Set-Mailbox", identity=identity, user_certificate=[], user_smime_certificate=[]
        )
        assert wiped.kind == "accepted", wiped
    emulator.control.clear_requests()
    assert len(mailboxes) == count
    return mailboxes


def _open_intents(db) -> list[tuple]:
    with db.transaction():  # one snapshot for both reads: a publisher writes intents meanwhile
        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        found = db.execute(
            "SELECT i.seq, i.recipient_id, i.user_certificate FROM certsync.audit_log i"
            " WHERE i.phase = 'intent' AND NOT EXISTS"
            " (SELECT FROM certsync.audit_log c WHERE c.intent_seq = i.seq) ORDER BY i.seq"
        ).fetchall()
        tracked = db.execute("SELECT seq FROM certsync.open_intent ORDER BY seq").fetchall()
    assert [seq for (seq,) in tracked] == [row[0] for row in found]  # the index the publisher reads
    return found


def _set_calls(emulator) -> list[dict]:
    return [r for r in emulator.control.requests() if str(r.get("cmdlet") or "").startswith("Set-")]


def _check_recovered(db, emulator, baseline, drifted: list[str]) -> list[dict]:
    """The invariants after recovery; returns the Set-* requests of the scenario."""
    calls = _set_calls(emulator)
    assert not _open_intents(db)
    for call in calls:
        rows = db.execute(
            "SELECT phase, count(*) FROM certsync.audit_log WHERE client_request_id = %s GROUP BY 1",
            (call["client_request_id"],),
        ).fetchall()
        phases = dict(rows)
        assert phases.get("intent") == 1, (call, phases)
        assert phases.get("outcome", 0) + phases.get("settlement", 0) == 1, (call, phases)
    for identity in drifted:
        sent = [c for c in calls if c["identity"] == identity]
        applied = [i for i, c in enumerate(sent) if c["status"] == 200]
        assert len(applied) == 1 and applied[0] == len(sent) - 1, (identity, sent)  # nothing after it
    assert {c["identity"] for c in calls} <= set(drifted)
    assert held_certificates(emulator) == baseline
    return calls


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    """A test that fails while its worker publishes must not leave it writing into the next test."""
    yield
    while _STARTED:
        worker = _STARTED.pop()
        if worker.poll() is None:
            _kill(worker)


def _worker(
    env: dict[str, str], run_key: str, when: datetime, *, timeout_s: float = TIMEOUT_S, **config
) -> subprocess.Popen:
    config_env = {}
    if config:
        merged = {**json.loads(env["AIRFLOW_VAR_CERTSYNC_CONFIG"]), **config}
        config_env = {"AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps(merged)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, run_key, when.isoformat(), str(timeout_s)],
        env={**os.environ, **env, **config_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _STARTED.append(worker)
    return worker


def _wait_for(
    what: str, check: Callable[[], object], timeout_s: float = 120.0, worker: subprocess.Popen | None = None
) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if worker is not None and worker.poll() is not None:
            raise AssertionError(f"the worker ended before {what}: {worker.communicate()[0][-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _holds_left(emulator) -> int:
    return sum(rule["count"] for rule in emulator.control.config()["holds"])


def _kill(worker: subprocess.Popen) -> str:
    worker.send_signal(signal.SIGKILL)
    output, _ = worker.communicate(timeout=30)
    return output


def _resume(env, run_key: str, when: datetime) -> None:
    """The retry: the same run key again, in this process."""
    run_all(_services(env), dag_id="recovery", airflow_run_id=run_key, logical_date=when)


def _intent_of(db, seq: int) -> tuple:
    return db.execute(
        "SELECT recipient_id, user_certificate FROM certsync.audit_log WHERE seq = %s", (seq,)
    ).fetchone()


def _closing(db, identity: str) -> list[tuple]:
    return db.execute(
        "SELECT c.phase, c.outcome FROM certsync.audit_log c JOIN certsync.audit_log i ON i.seq = c.intent_seq"
        " WHERE i.recipient_id = %s AND i.run_id = (SELECT max(run_id) FROM certsync.sync_run) ORDER BY c.seq",
        (identity,),
    ).fetchall()


def test_killed_before_the_intent_commits(env, db, own_tenant, baseline, clock, embedded_pg) -> None:
    drifted = _drift(env, own_tenant, baseline)
    when, key = clock.next(), f"before-intent-{uuid.uuid4()}"
    with psycopg.connect(embedded_pg.dsn_for(DATABASE)) as blocker:
        blocker.execute("SELECT pg_advisory_xact_lock(hashtext('certsync.audit_log'))")  # the chain's lock
        worker = _worker(env, key, when)
        waiting = _wait_for(
            "the intent insert to wait for the chain lock",
            lambda: db.execute(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%certsync.audit_log%'"  # the writer's chain lock, then its insert
            ).fetchone(),
            worker=worker,
        )
        _kill(worker)
        blocker.rollback()
    _wait_for(
        "the killed session to end",
        lambda: not db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", waiting).fetchone(),
    )
    assert not _open_intents(db)  # the intent never committed ...
    assert _set_calls(own_tenant) == []  # ... and so nothing was sent
    _resume(env, key, when)
    calls = _check_recovered(db, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)


def test_killed_between_intent_and_request(env, db, own_tenant, baseline, clock) -> None:
    drifted = _drift(env, own_tenant, baseline)
    when, key = clock.next(), f"between-{uuid.uuid4()}"
    # The first Set-Mailbox is held 5 s, then refused: the worker dies before Exchange applies anything.
    own_tenant.control.hold(cmdlet="Set-Mailbox", count=1, before_ms=5000, then_status=503)
    try:
        worker = _worker(env, key, when)
        _wait_for("an open intent", lambda: _open_intents(db), worker=worker)
        # An intent commits just before its request leaves: kill once Exchange holds the request.
        _wait_for("Exchange to hold the request", lambda: not _holds_left(own_tenant), worker=worker)
        _kill(worker)
        # Publishing is concurrent: the held request is the one Exchange refused, whichever intent it has.
        refused = _wait_for(
            "the held request to be refused",
            lambda: [c for c in _set_calls(own_tenant) if c["status"] == 503],
            timeout_s=30,
        )
        identity = refused[0]["identity"]  # type: ignore[index]
    finally:
        own_tenant.control.set_config(holds=[], faults=[])
    assert held_certificates(own_tenant)[identity] != baseline[identity]  # not applied
    _resume(env, key, when)
    calls = _check_recovered(db, own_tenant, baseline, drifted)
    assert [c["status"] for c in calls if c["identity"] == identity] == [503, 200]
    assert _closing(db, identity) == [("settlement", "not_applied"), ("outcome", "accepted")]
    assert len(calls) == len(drifted) + 1


def _killed_after_apply(env, db, own_tenant, baseline, key: str, when: datetime) -> tuple[list[str], str]:
    """A run killed after Exchange applied its first write and before the answer came: the drifted
    mailboxes, and the recipient of the intent left open."""
    drifted = _drift(env, own_tenant, baseline)
    own_tenant.control.hold(cmdlet="Set-Mailbox", count=1, after_ms=6000)  # applied, answer late
    try:
        worker = _worker(env, key, when)
        (_seq, identity, _certs), *_ = _wait_for("an open intent", lambda: _open_intents(db), worker=worker)
        _wait_for(
            "Exchange to apply it", lambda: held_certificates(own_tenant)[identity] == baseline[identity]
        )
        _kill(worker)
        assert _open_intents(db)  # applied in Exchange, no outcome recorded
        _wait_for("the held answer", lambda: _set_calls(own_tenant), timeout_s=15)
    finally:
        own_tenant.control.set_config(holds=[])
    return drifted, identity


def test_killed_after_exchange_applied_before_the_outcome(env, db, own_tenant, baseline, clock) -> None:
    when, key = clock.next(), f"after-apply-{uuid.uuid4()}"
    drifted, identity = _killed_after_apply(env, db, own_tenant, baseline, key, when)
    _resume(env, key, when)
    calls = _check_recovered(db, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)  # the applied write was settled, not sent again
    assert _closing(db, identity) == [("settlement", "applied")]


def test_an_intent_another_task_settled_meanwhile_is_left_to_it(env, db, own_tenant, baseline, clock) -> None:
    """Two cleared publish tasks of a run can both list an intent open; the one that settles it
    second finds it closed (the audit log refuses a second closing row) and goes on."""
    when, key = clock.next(), f"settled-twice-{uuid.uuid4()}"
    drifted, identity = _killed_after_apply(env, db, own_tenant, baseline, key, when)
    services = _services(env)
    with services.engine.connect() as conn:
        (intent,) = publishing.open_intents(conn)  # as both tasks read it
    assert publisher.settle(services, intent, by_run_id=intent.run_id, task_try=2) is True
    assert publisher.settle(services, intent, by_run_id=intent.run_id, task_try=2) is None
    assert _closing(db, identity) == [("settlement", "applied")]
    _resume(env, key, when)
    calls = _check_recovered(db, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)


def test_postgres_stopped_mid_publish(env, db, own_tenant, baseline, clock, embedded_pg) -> None:
    drifted = _drift(env, own_tenant, baseline)
    when, key = clock.next(), f"pg-restart-{uuid.uuid4()}"
    own_tenant.control.hold(cmdlet="Set-Mailbox", count=1, after_ms=3000)
    db.close()
    try:
        with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as watcher:
            worker = _worker(env, key, when)
            (_seq, identity, _c), *_ = _wait_for("an open intent", lambda: _open_intents(watcher))
        embedded_pg.stop()  # while Exchange applies the write and holds its answer
        worker.wait(timeout=120)  # the worker cannot record the outcome and stops
        assert worker.returncode != 0
        embedded_pg.start()
    finally:
        own_tenant.control.set_config(holds=[])
        if not embedded_pg.running():
            embedded_pg.start()
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        # Publishing is concurrent: requests in flight beside the held one may be open too.
        open_ids = [r[1] for r in _open_intents(conn)]
        assert identity in open_ids and len(open_ids) == len(set(open_ids)) <= len(drifted)
        _resume(env, key, when)
        calls = _check_recovered(conn, own_tenant, baseline, drifted)
        assert len(calls) == len(drifted)
        assert _closing(conn, identity) == [("settlement", "applied")]
        for other in open_ids:  # each settled by reading back, then (if not applied) sent again
            assert _closing(conn, other)[0][0] == "settlement", other


@pytest.fixture
def db_again(embedded_pg) -> Iterator[psycopg.Connection]:
    """A fresh connection (the module's may have been closed by the restart test)."""
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


def test_client_timeout_with_a_late_applied_write(env, db_again, own_tenant, baseline, clock) -> None:
    db = db_again
    drifted = _drift(env, own_tenant, baseline)
    own_tenant.control.hold(cmdlet="Set-Mailbox", count=1, before_ms=(TIMEOUT_S + 1.0) * 1000)
    try:
        run_all(
            _services(env),
            dag_id="recovery",
            airflow_run_id=f"late-{uuid.uuid4()}",
            logical_date=clock.next(),
        )
    finally:
        own_tenant.control.set_config(holds=[])
    calls = _check_recovered(db, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)  # the timed-out write was applied late: read back, not resent
    settled = db.execute(
        "SELECT outcome, error_code FROM certsync.audit_log WHERE phase = 'settlement'"
        " AND run_id = (SELECT max(run_id) FROM certsync.sync_run)"
    ).fetchall()
    assert settled == [("applied", "ReadTimeout")]  # the client's own exception: no answer in time


def test_normal_run_reads_nothing_back(env, db_again, own_tenant, baseline, clock) -> None:
    drifted = _drift(env, own_tenant, baseline)
    run_all(
        _services(env), dag_id="recovery", airflow_run_id=f"normal-{uuid.uuid4()}", logical_date=clock.next()
    )
    _check_recovered(db_again, own_tenant, baseline, drifted)
    requests = own_tenant.control.requests()
    read_backs = [r for r in requests if r.get("cmdlet") == "Get-Recipient" and r.get("identity")]
    extra_per_changed = len(read_backs) / len(drifted)
    print(f"\nextra requests per changed recipient (normal case): {extra_per_changed}")
    assert extra_per_changed == 0


def test_two_runs_started_together_never_interleave(env, db_again, own_tenant, baseline, clock) -> None:
    drifted = _drift(env, own_tenant, baseline)
    first, second = clock.next(), clock.next()
    # The first run's first write is held in Exchange while the second run starts, so the second
    # finds the first still at work however slowly a loaded machine starts it (started side by
    # side, one once began only after the other had finished).
    held_s = 20.0
    own_tenant.control.hold(cmdlet="Set-Mailbox", count=1, before_ms=held_s * 1000)
    try:
        one = _worker(env, f"together-0-{uuid.uuid4()}", first, timeout_s=held_s + 30)
        _wait_for("Exchange to hold the first run's write", lambda: not _holds_left(own_tenant), worker=one)
        two = _worker(env, f"together-1-{uuid.uuid4()}", second)
        outputs = [w.communicate(timeout=600)[0] for w in (one, two)]
    finally:
        own_tenant.control.set_config(holds=[])
    assert [one.returncode, two.returncode] == [0, 0], outputs
    assert "waits for run" in outputs[1], outputs[1][-3000:]
    calls = _check_recovered(db_again, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)


def test_a_second_run_is_refused_naming_the_holder(env, db_again, own_tenant, baseline, clock) -> None:
    from certsync.store import runlock

    services = _services(env)
    holder = db_again.execute("SELECT max(run_id) FROM certsync.sync_run").fetchone()[0]
    with runlock.hold(services.engine, run_id=holder, stage="test", wait_s=0):
        worker = _worker(env, f"refused-{uuid.uuid4()}", clock.next(), run_lock_wait_s=0)
        output = worker.communicate(timeout=300)[0]
    assert worker.returncode != 0
    assert f"run {holder} (recovery / " in output and "holds the certsync run lock" in output, output[-3000:]
    assert "UniqueViolation" not in output


def test_a_begin_that_waited_for_another_sees_the_slot_it_claimed(env, db_again, clock) -> None:
    """Two begins at once: the second waits on the slot row, and once the first commits it must
    see the first run as the holder (not a free slot, as a join over the run's row it could not
    see yet would say): a backfill's runs start together like this."""
    import threading

    from certsync.store import runs, runslot

    engine = _services(env).engine
    first = engine.connect()
    try:
        with first.begin():
            runslot.lock(first)
            run_id = runs.begin_run(
                first, dag_id="recovery", airflow_run_id=f"slot-{uuid.uuid4()}", logical_date=clock.next(),
                mode="full", dry_run=True, trust_fingerprint="test",
            )  # fmt: skip
            runslot.claim(first, run_id=run_id, waiting="first", holder=None, live=None)
            seen: list[runslot.Holder | None] = []

            def second() -> None:
                with engine.begin() as conn:
                    seen.append(runslot.lock(conn))

            waiter = threading.Thread(target=second)
            waiter.start()
            time.sleep(1.0)  # the second begin now waits for the slot row
        waiter.join(timeout=30)
        assert [(h.run_id, h.closed) if h else None for h in seen] == [(run_id, False)]
    finally:
        first.close()
        db_again.execute("UPDATE certsync.run_slot SET run_id = NULL")
        db_again.execute(
            "UPDATE certsync.sync_run SET state = 'abandoned', finished_at = now() WHERE run_id = %s",
            (run_id,),
        )


def test_the_same_run_key_twice_waits_and_does_not_crash(env, db_again, own_tenant, baseline, clock) -> None:
    drifted = _drift(env, own_tenant, baseline)
    when, key = clock.next(), f"twice-{uuid.uuid4()}"
    workers = [_worker(env, key, when) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert not any("UniqueViolation" in o for o in outputs)
    calls = _check_recovered(db_again, own_tenant, baseline, drifted)
    assert len(calls) == len(drifted)


def test_an_older_run_after_a_newer_one_is_superseded(env, db_again, own_tenant, baseline, clock) -> None:
    newer = clock.next()
    run_all(_services(env), dag_id="recovery", airflow_run_id=f"newer-{uuid.uuid4()}", logical_date=newer)
    drifted = _drift(env, own_tenant, baseline)
    key = f"older-{uuid.uuid4()}"
    summary = run_all(
        _services(env), dag_id="recovery", airflow_run_id=key, logical_date=newer - timedelta(seconds=30)
    )
    assert _set_calls(own_tenant) == []
    state = db_again.execute(
        "SELECT state FROM certsync.sync_run WHERE airflow_run_id = %s", (key,)
    ).fetchone()
    assert state == ("superseded",)
    assert summary["not_published_by_reason"].get("superseded") == len(drifted), summary
    run_all(
        _services(env), dag_id="recovery", airflow_run_id=f"newest-{uuid.uuid4()}", logical_date=clock.next()
    )
    _check_recovered(db_again, own_tenant, baseline, drifted)


def test_the_chain_covers_the_new_rows(env, db_again, embedded_pg, baseline) -> None:
    import sqlalchemy as sa

    from certsync.audit.checkpoints import sign
    from certsync.audit.rows import db_rows
    from certsync.audit.verify import verify_rows
    from certsync_lab.stack import lab_audit_key

    key = lab_audit_key()

    def verify(conn) -> list[str]:
        head = conn.execute(
            sa.text("SELECT seq, row_hash, now() AS at FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
        ).one()
        checkpoint = sign(seq=head.seq, head=bytes(head.row_hash), at=head.at, key=key)
        report = verify_rows(
            db_rows(conn), public_keys={key.key_id: key.private.public_key()}, checkpoints=[checkpoint]
        )
        return [f"row {p.seq}: {p.kind}" for p in report.problems]

    engine = sa.create_engine(embedded_pg.dsn_for(DATABASE).replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            assert verify(conn) == []
            seq = conn.execute(
                sa.text("SELECT min(seq) FROM certsync.audit_log WHERE phase = 'settlement'")
            ).scalar()
            conn.rollback()
            transaction = conn.begin()
            conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
            conn.execute(
                sa.text(
                    "UPDATE certsync.audit_log SET outcome = CASE outcome WHEN 'applied' THEN 'not_applied'"
                    " ELSE 'applied' END WHERE seq = :s"
                ),
                {"s": seq},
            )
            assert verify(conn) == [f"row {seq}: altered"]
            transaction.rollback()
    finally:
        engine.dispose()


def test_a_plan_uses_the_verdicts_of_its_own_time(env, db_again, own_tenant, baseline, clock) -> None:
    """A newer run validates; an older run re-validates the same values at its own time before the
    newer one plans: the newer plan still uses the verdicts of its time (here, past the CRLs' next
    update, nothing is valid), never the older run's. Dry runs, so that Exchange keeps its state.
    The run slot keeps runs from interleaving now, so the test hands the slot over by hand: the
    verdicts must not depend on that alone."""
    from certsync.failures import RunFailed
    from certsync.pipeline import begin, extract, finish, plan, read_recipients, validate

    services = _services(env)

    def start(key: str, when: datetime) -> int:
        return begin(
            services, dag_id="recovery", airflow_run_id=key, logical_date=when, mode="full", dry_run=True
        )

    newer = start(f"verdicts-newer-{uuid.uuid4()}", clock.now + timedelta(days=40))
    extract(services, run_id=newer)
    read_recipients(services, run_id=newer)
    validate(services, run_id=newer)
    db_again.execute("UPDATE certsync.run_slot SET run_id = NULL")
    older = start(f"verdicts-older-{uuid.uuid4()}", clock.next())
    extract(services, run_id=older)
    validate(services, run_id=older)  # (verdicts used to be one row per value: this overwrote them)
    db_again.execute("UPDATE certsync.run_slot SET run_id = %s", (newer,))
    plan(services, run_id=newer)
    selected = db_again.execute(
        "SELECT count(*) FILTER (WHERE selected), count(*) FROM certsync.value_result WHERE run_id = %s",
        (newer,),
    ).fetchone()
    assert selected[0] == 0 < selected[1]
    changes = db_again.execute(
        "SELECT count(*) FROM certsync.planned_action WHERE run_id = %s AND state = 'pending'", (newer,)
    ).fetchone()[0]
    assert changes > 0  # it would take away what the older verdicts call valid
    # Close both (frees the slot): never published, the newer one has actions pending, the older no plan.
    for run_id in (newer, older):
        with pytest.raises(RunFailed):
            finish(services, run_id=run_id)
