"""How runs end, as an operator sees them in Airflow (dag.test() against the real DC, PostgreSQL and
the emulator): a publish failure fails the DAG run and reaches the configured notifier; the asset
event carries counts and comes only when something was published; a manual run without a logical
date works; a run whose process died is closed as abandoned by the next one; a misspelt
certsync_config key fails at once; systems that are down are retried, wrong settings are not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from certsync.config import connection_uri
from tests.integration.conftest import airflow_settings, certsync_dag

pytestmark = pytest.mark.integration
DATABASE = "certsync_outcomes"
FAILING_DATABASE = "certsync_outcomes_fail"
SET_CMDLETS = ("Set-Mailbox", "Set-MailUser", "Set-MailContact")


@pytest.fixture(scope="module")
def notified(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notify") / "failures.log"


@pytest.fixture(scope="module")
def env(own_sync_env: dict[str, str], embedded_pg, notified: Path) -> Iterator[dict[str, str]]:
    """The session's settings with databases and a tenant of this module's own, and our file notifier."""
    from certsync_lab.stack import certsync_database

    notifier = {"notifier": "certsync.airflow.adapter.LogNotifier", "kwargs": {"path": str(notified)}}
    changes = {
        **own_sync_env,
        "AIRFLOW_CONN_OUTCOMES_FAIL": connection_uri(certsync_database(embedded_pg, FAILING_DATABASE)),
        "AIRFLOW_VAR_CERTSYNC_NOTIFIER": json.dumps(notifier),
    }
    with airflow_settings(changes):
        yield changes


@pytest.fixture(scope="module")
def dag(env):
    return certsync_dag()


@pytest.fixture(scope="module")
def db(env, embedded_pg) -> Iterator[psycopg.Connection]:
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


DEFAULT_CONF = {
    "dry_run": False,
    "allow_mass_removal": False,
    "ldap_conn_id": "certsync_ldap",
    "exchange_conn_id": "certsync_exchange",
    "postgres_conn_id": "certsync_postgres",
}


def _test(dag, *, conf: dict | None = None, **kwargs):
    """dag.test() with every param given: in-process runs keep an earlier run's conf otherwise."""
    return dag.test(run_conf={**DEFAULT_CONF, **(conf or {})}, **kwargs)


def _record(db: psycopg.Connection, airflow_run_id: str) -> dict:
    row = db.execute(
        "SELECT run_id, state, date_source, run_type, triggered_by, allow_mass_removal, dry_run,"
        " logical_date, attempts, closed_by_run_id, summary FROM certsync.sync_run WHERE airflow_run_id = %s",
        (airflow_run_id,),
    ).fetchone()
    assert row is not None, f"no sync_run for {airflow_run_id}"
    keys = "run_id state date_source run_type triggered_by allow_mass_removal dry_run logical_date"
    return dict(zip([*keys.split(), "attempts", "closed_by_run_id", "summary"], row, strict=True))


def _asset_events(run_id: str) -> list[dict]:
    from airflow import settings
    from airflow.models.asset import AssetEvent, AssetModel

    with settings.Session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == "certsync://published", AssetEvent.source_run_id == run_id)
            .all()
        )
        return [dict(r.extra or {}) for r in rows]


def _task_states(run) -> dict[str, str]:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    with settings.Session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id).all()
        return {ti.task_id: (ti.state, ti.try_number) for ti in tis if ti.map_index in (-1, 0)}


@pytest.fixture(scope="module")
def manual_run(dag, db, env, own_tenant, lab_at):
    """`airflow dags trigger certsync` as Airflow 3 does it: no logical date, only the time it was
    queued for (set to the lab's time, for which the population was planted). One recipient is
    emptied first, so that the run has something to publish whatever ran before it."""
    _strip_one_recipient(env, own_tenant)
    return _test(
        dag, logical_date=None, run_after=lab_at + timedelta(days=1), conf={"allow_mass_removal": True}
    )


def test_a_manual_run_without_logical_date_runs_on_its_run_after(manual_run, db) -> None:
    assert manual_run.state == "success", _task_states(manual_run)
    record = _record(db, manual_run.run_id)
    assert record["state"] == "succeeded"
    assert record["date_source"] == "run_after"
    assert record["logical_date"] == manual_run.run_after
    # Who and what: Airflow's run type and user, and the override, are on the record.
    assert (record["run_type"], record["triggered_by"], record["allow_mass_removal"]) == (
        "manual",
        "dag_test",
        True,
    )
    assert record["summary"]["run"]["allow_mass_removal"] is True


def test_the_asset_event_carries_the_counts_of_a_run_that_published(manual_run, db) -> None:
    events = _asset_events(manual_run.run_id)
    record = _record(db, manual_run.run_id)
    published = sum(n for k, n in record["summary"]["actions"].items() if k.endswith(":published"))
    assert published > 0
    assert len(events) == 1
    assert events[0]["published"] == published and events[0]["sync_run_id"] == record["run_id"]
    assert events[0]["audit_head"] == record["summary"]["audit_head"]


def test_a_run_that_publishes_nothing_emits_no_asset_event(manual_run, dag, db, lab_at) -> None:
    # A first run settles whatever earlier modules changed in the shared directory or whatever time
    # alone changed (a certificate that expired); the run after it has nothing left to publish.
    settling = _test(dag, logical_date=lab_at + timedelta(days=2))
    assert settling.state == "success", _task_states(settling)
    run = _test(dag, logical_date=lab_at + timedelta(days=2, hours=1))
    assert run.state == "success", _task_states(run)
    record = _record(db, run.run_id)
    assert (record["state"], record["date_source"]) == ("succeeded", "logical_date")
    assert not any(k.endswith(":published") for k in record["summary"]["actions"])
    assert _asset_events(run.run_id) == []


def _strip_one_recipient(env: dict[str, str], emulator) -> str:
    """Empty the certificates of one writable recipient that holds some, through Exchange itself,
    so that the next run has a change to publish; returns its id."""
    from certsync.config import EnvSource, load_settings
    from certsync.exchange.recipients import Recipient
    from certsync.pipeline import Services

    for obj in emulator.control.state()["recipients"]:
        recipient = Recipient.from_exchange(obj)
        writable = not obj["IsDirSynced"] or obj["IsExchangeCloudManaged"]
        if writable and obj["UserCertificate"] and recipient.cmdlet:
            services = Services(settings=load_settings(EnvSource(environ=env)))
            outcome = services.exchange.set_certificates(
                cmdlet=recipient.cmdlet, identity=obj["ExternalDirectoryObjectId"], user_certificate=[],
                user_smime_certificate=[],
            )  # fmt: skip
            assert outcome.kind == "accepted", outcome
            return obj["ExternalDirectoryObjectId"]
    raise AssertionError("no writable recipient holds a certificate")


def _holds(emulator, identity: str) -> list:
    state = emulator.control.state()["recipients"]
    return next(r["UserCertificate"] for r in state if r["ExternalDirectoryObjectId"] == identity)


def test_a_publish_failure_fails_the_dag_run_and_reaches_the_notifier(
    manual_run, dag, env, own_tenant, embedded_pg, notified: Path, lab_at
) -> None:
    """With every Set-* refused, publish records the failures and finish fails the run; once
    Exchange accepts again, the next run publishes what failed and succeeds."""
    stripped = _strip_one_recipient(env, own_tenant)
    for cmdlet in SET_CMDLETS:
        own_tenant.control.inject_fault(
            cmdlet=cmdlet, count=10_000, status=400, exception_type="ValidationException", text="refused"
        )
    try:
        run = _test(dag, logical_date=None, run_after=lab_at + timedelta(days=1, hours=1),
                    conf={"postgres_conn_id": "outcomes_fail"})  # fmt: skip
    finally:
        own_tenant.control.reset_config()
    states = _task_states(run)
    assert run.state == "failed", states
    assert states["finish"] == ("failed", 1), "finish must fail once, without retries"
    assert states["publish"][0] == "success"
    with psycopg.connect(embedded_pg.dsn_for(FAILING_DATABASE)) as conn:
        state, summary = conn.execute(
            "SELECT state, summary FROM certsync.sync_run WHERE airflow_run_id = %s", (run.run_id,)
        ).fetchone()
    assert state == "failed"
    assert summary["failed_by_reason"], summary
    assert _asset_events(run.run_id) == []
    lines = notified.read_text().splitlines()
    assert [line for line in lines if run.run_id in line and "failed" in line], lines
    # Recovery: the failed change is still in the diff, and the next run makes it.
    again = _test(dag, logical_date=None, run_after=lab_at + timedelta(days=1, hours=2),
                  conf={"postgres_conn_id": "outcomes_fail"})  # fmt: skip
    assert again.state == "success", _task_states(again)
    assert _holds(own_tenant, stripped)
    assert _asset_events(again.run_id)[0]["published"] >= 1


# --- abandoned runs ---

BEGIN_THEN = textwrap.dedent(
    """
    import os, signal, sys, time
    from datetime import datetime
    from certsync.config import EnvSource, load_settings
    from certsync.pipeline import Services, begin

    services = Services(settings=load_settings(EnvSource()))
    run_id = begin(services, dag_id=sys.argv[1], airflow_run_id=sys.argv[2],
                   logical_date=datetime.fromisoformat(sys.argv[4]), mode="full", dry_run=True)
    print(run_id, flush=True)
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
    """
)


def _begin_elsewhere(dag_id: str, run_key: str, then: str, when) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BEGIN_THEN, dag_id, run_key, then, when.isoformat()],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"begin did not register a run: {line!r}"
    return proc, int(line)


def test_a_run_whose_process_died_is_closed_as_abandoned_by_the_next(
    manual_run, dag, db, env, lab_at
) -> None:
    """A command-line run killed mid-way is closed by the next begin (here another command-line
    run's); a run that is alive and working is not, and holds the run slot: another begin is
    refused naming it; an Airflow run whose worker was killed (Airflow knows no such DAG run any
    more) is closed by the DAG's next begin."""
    from certsync import pipeline
    from certsync.config import EnvSource, load_settings
    from certsync.store.runslot import RunBusy

    when = lab_at + timedelta(days=2, hours=12)
    dead_cli, dead_cli_id = _begin_elsewhere("certsync-cli", "cli__killed", "die", when)
    dead_cli.wait(timeout=30)
    alive, alive_id = _begin_elsewhere("certsync-cli", "cli__alive", "wait", when)
    try:
        record = _record(db, "cli__killed")
        assert (record["state"], record["closed_by_run_id"]) == ("abandoned", alive_id)
        assert record["summary"]["actions"] == {}
        services = pipeline.Services(settings=load_settings(EnvSource(environ=env)))
        with pytest.raises(RunBusy, match=rf"run {alive_id} \(certsync-cli / cli__alive\)"):
            pipeline.begin(
                services, dag_id="certsync-cli", airflow_run_id="cli__second", logical_date=when,
                mode="full", dry_run=True,
            )  # fmt: skip
        assert _record(db, "cli__alive")["state"] == "running", "a live run must not be closed"
    finally:
        alive.send_signal(signal.SIGKILL)
        alive.wait(timeout=30)
    dead_dag_run, dead_id = _begin_elsewhere("certsync", "scheduled__killed", "die", when)
    dead_dag_run.wait(timeout=30)
    assert _record(db, "scheduled__killed")["state"] == "running"
    run = _test(dag, logical_date=lab_at + timedelta(days=3), run_after=lab_at + timedelta(days=3))
    assert run.state == "success", _task_states(run)
    closer = _record(db, run.run_id)["run_id"]
    record = _record(db, "scheduled__killed")
    assert (record["state"], record["closed_by_run_id"]) == ("abandoned", closer)
    assert dead_id != alive_id != dead_cli_id


def test_a_resumed_run_is_its_own_record(manual_run, dag, db, lab_at) -> None:
    """Running the same DAG run again (a clear) resumes its sync_run: one more attempt, and the
    summary is this run's, not a neighbour's."""
    when = lab_at + timedelta(days=3)
    run = _test(dag, logical_date=when, run_after=when)  # the same DAG run id: Airflow re-runs it
    assert run.state == "success", _task_states(run)
    record = _record(db, run.run_id)
    assert record["attempts"] == 2 and record["state"] == "succeeded"
    # The command-line run that was alive before was killed since: a later begin closed it.
    assert _record(db, "cli__alive")["state"] == "abandoned"
    assert (
        record["summary"]["users"]
        == db.execute(
            "SELECT count(*) FROM certsync.staging_user WHERE run_id = %s", (record["run_id"],)
        ).fetchone()[0]
    )


# --- settings errors versus systems that are down ---


def test_a_misspelt_config_key_fails_begin_at_once(dag, db, env, notified: Path) -> None:
    from certsync.airflow import adapter

    config = {**json.loads(env["AIRFLOW_VAR_CERTSYNC_CONFIG"]), "removal_treshold": 10}
    runs_before = db.execute("SELECT count(*) FROM certsync.sync_run").fetchone()[0]
    os.environ["AIRFLOW_VAR_CERTSYNC_CONFIG"] = json.dumps(config)
    adapter._services_for.cache_clear()  # settings are read once per process
    try:
        run = _test(dag, logical_date=None)
    finally:
        os.environ["AIRFLOW_VAR_CERTSYNC_CONFIG"] = env["AIRFLOW_VAR_CERTSYNC_CONFIG"]
        adapter._services_for.cache_clear()
    states = _task_states(run)
    assert run.state == "failed"
    assert states["begin"] == ("failed", 1), "a settings error must not be retried"
    assert db.execute("SELECT count(*) FROM certsync.sync_run").fetchone()[0] == runs_before
    assert any(run.run_id in line for line in notified.read_text().splitlines())


def _conn(env: dict[str, str], name: str, **changes) -> str:
    from dataclasses import replace

    from certsync.config import EnvSource

    conn = EnvSource(environ=env).connection(name)
    if changes.pop("secret_only", False):  # a client secret instead of the certificate credential
        extra = {k: v for k, v in conn.extra.items() if k not in ("certificate_file", "private_key_file")}
        changes["extra"] = extra
    return connection_uri(replace(conn, **changes))


@pytest.mark.parametrize(
    ("conn_name", "changes", "kind", "message"),
    [
        ("certsync_exchange", {"port": 1}, "Unavailable", "Exchange Online is unreachable"),
        ("certsync_ldap", {"port": 1}, "Unavailable", "the directory is unreachable"),
        ("certsync_postgres", {"port": 1}, "Unavailable", "PostgreSQL is unreachable"),
        ("certsync_ldap", {"password": "wrong-password"}, "AirflowFailException", "'ldap_bad_password'"),
        ("certsync_exchange", {"password": "wrong", "secret_only": True}, "AirflowFailException", "'ex_bad_"),
    ],
)
def test_begin_retries_what_is_down_and_fails_at_once_on_wrong_settings(
    env, lab_at, conn_name, changes, kind, message
) -> None:
    """An unreachable system is Unavailable (Airflow retries it with backoff); a wrong setting is
    AirflowFailException (no retry). Either way one clear line, not a driver's traceback."""
    from certsync import pipeline
    from certsync.airflow.adapter import run_stage

    param = {"certsync_exchange": "exchange_conn_id", "certsync_ldap": "ldap_conn_id"}.get(
        conn_name, "postgres_conn_id"
    )
    alias = {"certsync_exchange": "ex_bad", "certsync_ldap": "ldap_bad"}.get(conn_name, "pg_bad")
    alias += "_" + "_".join(sorted(changes))
    os.environ[f"AIRFLOW_CONN_{alias.upper()}"] = _conn(env, conn_name, **changes)
    try:
        with pytest.raises(Exception) as raised:
            run_stage(
                pipeline.begin,
                conn_ids={param: alias},
                dag_id="outcomes",
                airflow_run_id=f"outcomes__{alias}",
                logical_date=lab_at,
                mode="full",
                dry_run=True,
            )
    finally:
        del os.environ[f"AIRFLOW_CONN_{alias.upper()}"]
    assert type(raised.value).__name__ == kind, raised.value
    text = str(raised.value)
    assert message in text and len(text.splitlines()) == 1, text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_token_endpoint_errors_are_retried(env, own_tenant, lab_at) -> None:
    from certsync import pipeline
    from certsync.config import EnvSource, load_settings
    from certsync.failures import Unavailable

    services = pipeline.Services(settings=load_settings(EnvSource(environ=env)))
    own_tenant.control.inject_fault(cmdlet="token", count=50, status=503)
    try:
        with pytest.raises(Unavailable, match="connection 'certsync_exchange'"):
            pipeline.preflight(services)
    finally:
        own_tenant.control.reset_config()


def test_postgres_gone_mid_run_is_a_clear_retryable_error(env, embedded_pg) -> None:
    """A stage whose database vanishes raises one line naming PostgreSQL (retried), not a
    psycopg traceback."""
    from certsync import pipeline
    from certsync.airflow.adapter import run_stage

    os.environ["AIRFLOW_CONN_PG_GONE"] = _conn(env, "certsync_postgres", port=1)
    try:
        with pytest.raises(Exception) as raised:
            run_stage(pipeline.validate, conn_ids={"postgres_conn_id": "pg_gone"}, run_id=1)
    finally:
        del os.environ["AIRFLOW_CONN_PG_GONE"]
    assert type(raised.value).__name__ == "Unavailable"
    assert str(raised.value).startswith("validate: PostgreSQL is unreachable"), raised.value
