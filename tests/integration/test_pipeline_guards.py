"""The pipeline's guards against real services: bad settings stop a run before anything is written,
transient Exchange failures are retried with every attempt audited, dry runs and the removal
threshold publish nothing, and secrets stay out of everything the run leaves behind."""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator
from datetime import timedelta

import ldap3
import psycopg
import pytest
import sqlalchemy as sa

from certsync.certificates.validate import Validator
from certsync.config import ConfigError, EnvSource, load_settings
from certsync.failures import RunFailed, Unavailable
from certsync.pipeline import (
    RemovalThresholdExceeded,
    Services,
    begin,
    extract,
    finish,
    plan,
    publish,
    read_recipients,
    run_all,
    validate,
)
from certsync.plan import Plan, SourceUser, build_plan
from certsync.store import planning, validation
from certsync_lab.pki import Pki
from certsync_lab.population import SeedUser
from certsync_lab.samba import SambaDC

pytestmark = pytest.mark.integration
# Its runs publish: a database and a tenant of its own (own_sync_env).
DATABASE = "certsync_guards"


def _services(env: dict[str, str], **changes: str) -> Services:
    return Services(settings=load_settings(EnvSource(environ={**env, **changes})))


def _run(services: Services, when, **kwargs):
    return run_all(
        services, dag_id="guards", airflow_run_id=f"guards__{uuid.uuid4()}", logical_date=when, **kwargs
    )


@pytest.fixture(scope="module")
def db(own_sync_env, embedded_pg):
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def settled(own_sync_env, lab_at):
    """One full run first, so each test starts from a tenant that equals the directory."""
    services = _services(own_sync_env)
    _run(services, lab_at + timedelta(days=1))
    return services


def _run_count(db) -> int:
    return db.execute("SELECT count(*) FROM certsync.sync_run").fetchone()[0]


def _conn_json(env: dict[str, str], name: str, **changes) -> str:
    uri_env = EnvSource(environ=env).connection(name)
    data = {
        "conn_type": uri_env.conn_type,
        "host": uri_env.host,
        "port": uri_env.port,
        "login": uri_env.login,
        "password": uri_env.password,
        "extra": dict(uri_env.extra),
    }
    return json.dumps({**data, **changes})


def _begin(services: Services, when) -> int:
    """A new run of its own (a fresh run key) at `when`."""
    return begin(
        services,
        dag_id="guards",
        airflow_run_id=f"guards__{uuid.uuid4()}",
        logical_date=when,
        mode="full",
        dry_run=False,
    )


def _stages_to_validation(services: Services, when) -> dict[str, int]:
    run_id = _begin(services, when)
    extract(services, run_id=run_id)
    validated = validate(services, run_id=run_id)
    # Close the run (failed: it stopped before its plan) to free the run slot for the next one.
    with pytest.raises(RunFailed):
        finish(services, run_id=run_id)
    return validated


def test_validation_redoes_only_what_time_or_trust_changed(settled, own_sync_env, db, lab_at) -> None:
    # An hour after the settled run nothing has expired: every verdict is reused.
    assert _stages_to_validation(settled, lab_at + timedelta(days=1, hours=1))["validated"] == 0
    # Another profile is another trust configuration: every distinct value is validated again.
    config = {**json.loads(own_sync_env["AIRFLOW_VAR_CERTSYNC_CONFIG"]), "profile": "strict"}
    strict = _services(own_sync_env, AIRFLOW_VAR_CERTSYNC_CONFIG=json.dumps(config))
    distinct = db.execute(
        "SELECT count(*) FROM (SELECT DISTINCT sha256, attribute FROM certsync.source_value) d"
    )
    assert (
        _stages_to_validation(strict, lab_at + timedelta(days=1, hours=2))["validated"]
        == distinct.fetchone()[0]
    )


def test_pending_values_stream_in_chunks(settled, db, lab_at) -> None:
    """Validation reads what it checks a chunk at a time (its memory must not grow with the
    directory): the chunks hold every distinct value once, none more than the chunk size."""
    distinct = db.execute(
        "SELECT count(*) FROM (SELECT DISTINCT sha256, attribute FROM certsync.source_value) d"
    ).fetchone()[0]
    with settled.engine.connect() as conn:
        chunks = list(
            validation.pending_chunks(
                conn, fingerprint="no-verdict-yet", at=lab_at, shard=0, shards=1, size=40
            )
        )
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= 40
    values = [(attribute, hashlib.sha256(value).digest()) for c in chunks for attribute, value in c]
    assert len(values) == len(set(values)) == distinct


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_validation_shards_split_the_pending_values_between_them(settled, db, lab_at, shards) -> None:
    """The DAG's validate tasks each take a shard (a range of SHA-256 first bytes): together they
    read every pending value exactly once."""

    def pending(shard: int, of: int) -> list[tuple[str, bytes]]:
        with settled.engine.connect() as conn:
            chunks = validation.pending_chunks(
                conn, fingerprint="no-verdict-yet", at=lab_at, shard=shard, shards=of
            )
            return sorted((a, hashlib.sha256(v).digest()) for chunk in chunks for a, v in chunk)

    every = [pending(shard, shards) for shard in range(shards)]
    whole = pending(0, 1)
    assert sum(1 for part in every if part) >= 2  # the shards share the work
    assert sorted(item for part in every for item in part) == whole


def test_saved_verdicts_hold_every_field_and_a_retry_replaces_them(settled, db, lab_at) -> None:
    """Verdicts go in by COPY: each stored column is the validator's, and saving again for the same
    run time (a retried try: the COPY fails on the key, an upsert takes over) replaces the rows
    instead of failing or doubling."""
    with settled.engine.connect() as conn:
        items = next(validation.pending_chunks(conn, fingerprint="copy-test", at=lab_at, shard=0, shards=1))
        run_id = conn.execute(sa.text("SELECT max(run_id) FROM certsync.sync_run")).scalar_one()
    validator = Validator(trust=settled.settings.trust.load())
    verdicts = [validator.check(attribute=a, value=v, at=lab_at) for a, v in items]
    assert {v.ok for v in verdicts} == {True, False}
    columns = "sha256, attribute, ok, reason, rule, detail, subject, issuer, serial, not_before, not_after, valid_until, emails"  # fmt: skip
    with settled.engine.connect() as conn:
        for detail in ("first try", None):
            saving = [v._replace(detail=detail or v.detail) for v in verdicts]
            with conn.begin():
                saved = validation.save_verdicts(conn, verdicts=saving, fingerprint="copy-test", run_id=run_id, at=lab_at)  # fmt: skip
    stored = db.execute(
        f"SELECT {columns}, checked_run_id, checked_at FROM certsync.cert_verdict"  # noqa: S608
        " WHERE trust_fingerprint = 'copy-test' ORDER BY sha256, attribute"
    ).fetchall()
    db.execute("DELETE FROM certsync.cert_verdict WHERE trust_fingerprint = 'copy-test'")
    assert saved == len(verdicts) == len(stored)
    expected = sorted(validation.verdict_rows(verdicts))
    assert [(bytes(r[0]), *r[1:13]) for r in stored] == expected
    assert {(r[13], r[14]) for r in stored} == {(run_id, lab_at)}


@pytest.mark.parametrize("some", [False, True], ids=["every user", "every other user"])
def test_a_value_checked_at_several_times_is_planned_with_one_verdict(
    settled, db, lab_at, some: bool
) -> None:
    """cert_verdict keeps one verdict per check time (a run at a later time checks a value again):
    the plan reads each value once, with the newest verdict that holds at the run's time, whether
    it reads every user or only some (a delta plan looks each value's verdict up instead). The
    valid values come to Python; the refused ones' results are stored by the same statement."""
    run_id, fingerprint = db.execute(
        "SELECT run_id, trust_fingerprint FROM certsync.sync_run WHERE planned_at IS NOT NULL ORDER BY run_id DESC"
    ).fetchone()
    db.execute("CREATE TEMP TABLE older AS SELECT * FROM certsync.cert_verdict WHERE trust_fingerprint = %s", (fingerprint,))  # fmt: skip
    db.execute(
        "UPDATE older SET checked_at = checked_at - interval '1 hour', detail = 'older',"
        " emails = '{older@example.com}'"
    )
    db.execute("INSERT INTO certsync.cert_verdict SELECT * FROM older")
    try:
        with settled.engine.connect() as conn, conn.begin() as tx:
            at = lab_at + timedelta(days=1, hours=1)
            every = [r[0] for r in db.execute("SELECT object_guid FROM certsync.source_user ORDER BY 1")]
            only = every[::2] if some else None
            planning.start_plan(conn, run_id=run_id)
            users = list(
                planning.users_to_plan(conn, run_id=run_id, fingerprint=fingerprint, at=at, only=only)
            )
            verdicts = [v for u in users for v in u.verdicts]
            refused = conn.execute(
                sa.text("SELECT object_guid, selected, detail FROM certsync.value_result WHERE run_id = :r"),
                {"r": run_id},
            ).all()
            tx.rollback()
        listed = only if some else every
        assert [u.object_guid for u in users] == listed
        values = db.execute(
            "SELECT count(*) FROM certsync.source_value WHERE object_guid = ANY(%s)", (listed,)
        ).fetchone()[0]
        assert verdicts and refused and len(verdicts) + len(refused) == values
        assert all(v.ok and "older@example.com" not in v.emails for v in verdicts)
        assert all(not selected and detail != "older" for _, selected, detail in refused)
        assert {guid for guid, *_ in refused} <= set(listed)
    finally:
        db.execute(
            "DELETE FROM certsync.cert_verdict c USING older o WHERE (c.sha256, c.attribute,"
            " c.trust_fingerprint, c.checked_at) = (o.sha256, o.attribute, o.trust_fingerprint, o.checked_at)"
        )
        db.execute("DROP TABLE older")


RUN_RESULTS = sa.text(
    "SELECT object_guid, attribute, sha256, selected, reason, rule, detail FROM certsync.value_result WHERE run_id = :r"
)


@pytest.mark.parametrize("part_size", [1, 3])
def test_the_plan_reads_users_in_parts_and_stores_their_results_as_it_plans_them(
    settled, db, part_size: int
) -> None:
    """A full plan reads its users in parts of objectGUID ranges (a delta plan: of the users it
    lists), the next part's statements sent while the plan works on this one: the users come in
    the same order and with the same verdicts as in one part, and every result the plan gives
    (selected or why not), with the refused values' own, is stored by the time the users run out:
    the same rows save_plan stores for a plan of users read without it."""
    run_id, fingerprint, at = db.execute(
        "SELECT run_id, trust_fingerprint, logical_date FROM certsync.sync_run WHERE planned_at IS NOT NULL"
        " ORDER BY run_id DESC"
    ).fetchone()
    read = functools.partial(planning.users_to_plan, run_id=run_id, fingerprint=fingerprint, at=at)
    with settled.engine.connect() as conn, conn.begin() as tx:
        planning.start_plan(conn, run_id=run_id)
        whole = list(read(conn, part_size=10**9))
        planning.start_plan(conn, run_id=run_id)
        listed = {u.object_guid for u in whole[::2]}
        some = list(read(conn, only=listed, part_size=part_size))  # as a delta plan reads
        planning.start_plan(conn, run_id=run_id)
        result = Plan()
        recipients = planning.recipients(conn, run_id=run_id)
        parted: list[SourceUser] = []

        def kept(users: Iterable[SourceUser]) -> Iterator[SourceUser]:  # what the plan was given
            for user in users:
                parted.append(user)
                yield user

        users = read(conn, part_size=part_size, plan=result)
        build_plan(kept(users), recipients=recipients, published={}, into=result)
        stored = conn.execute(RUN_RESULTS, {"r": run_id}).all()
        # Planned from users read without the plan, save_plan stores the results instead.
        planning.start_plan(conn, run_id=run_id)
        unread = build_plan(read(conn), recipients=recipients, published={})
        planning.save_plan(conn, run_id=run_id, plan=unread, batch_size=100)
        saved = conn.execute(RUN_RESULTS, {"r": run_id}).all()
        tx.rollback()
    assert unread.stored_results == len(unread.results) and sorted(saved) == sorted(stored)
    values = db.execute("SELECT count(*) FROM certsync.source_value").fetchone()[0]
    assert len(whole) > 3 * part_size and any(not u.verdicts for u in whole)
    assert [u.object_guid for u in whole] == sorted(u.object_guid for u in whole)
    assert parted == whole
    assert some == [u for u in whole if u.object_guid in listed]
    planned = {r.object_guid for r in result.results}
    assert planned == {u.object_guid for u in whole if u.verdicts}
    assert result.stored_results == len(result.results)
    mine = [
        (r.object_guid, r.attribute, r.sha256, r.reason is None, r.reason, r.rule, r.detail)
        for r in result.results
    ]
    assert len(mine) == sum(len(u.verdicts) for u in whole)
    rows = {tuple(row[:3]): tuple(row) for row in stored}
    assert len(rows) == len(stored) == values
    assert [rows.pop(key[:3]) for key in mine] == mine
    assert rows and not any(selected for _, _, _, selected, *_ in rows.values())  # the refused values'


@pytest.mark.parametrize(
    ("variable", "changes", "named", "error"),
    [
        ("AIRFLOW_CONN_CERTSYNC_LDAP", {"password": "wrong-password"}, "certsync_ldap", ConfigError),
        ("AIRFLOW_CONN_CERTSYNC_LDAP", {"port": 1}, "certsync_ldap", Unavailable),
        ("AIRFLOW_CONN_CERTSYNC_EXCHANGE", {"login": "unknown-client"}, "certsync_exchange", ConfigError),
        ("AIRFLOW_CONN_CERTSYNC_POSTGRES", {"port": 1}, "certsync_postgres", Unavailable),
    ],
)
def test_bad_setting_stops_before_anything_is_written(
    settled, own_sync_env, db, lab_at, variable, changes, named, error
):
    """A wrong setting is a ConfigError; a system that cannot be reached is Unavailable (retried)."""
    conn_id = variable.removeprefix("AIRFLOW_CONN_").lower()
    services = _services(own_sync_env, **{variable: _conn_json(own_sync_env, conn_id, **changes)})
    before = _run_count(db)
    with pytest.raises(error, match=named) as caught:
        begin(
            services, dag_id="guards", airflow_run_id="bad", logical_date=lab_at, mode="full", dry_run=False
        )
    assert _run_count(db) == before
    assert "wrong-password" not in str(caught.value)


def test_missing_trust_anchor_file_is_named(own_sync_env) -> None:
    config = {
        **json.loads(own_sync_env["AIRFLOW_VAR_CERTSYNC_CONFIG"]),
        "trust_anchors": "/nonexistent/anchors.pem",
    }
    services = _services(own_sync_env, AIRFLOW_VAR_CERTSYNC_CONFIG=json.dumps(config))
    with pytest.raises(ConfigError, match=r"certsync_config.*anchors\.pem"):
        begin(services, dag_id="guards", airflow_run_id="bad", logical_date=None, mode="full", dry_run=False)


def _give_new_certificate(dc: SambaDC, pki: Pki, user: SeedUser, when) -> bytes:
    der = pki.issue(
        email=user.mail, not_before=when - timedelta(days=1), not_after=when + timedelta(days=365)
    )
    conn = dc.connect()
    conn.search(dc.users_ou, f"(sAMAccountName={user.sam_account_name})", attributes=["distinguishedName"])
    conn.modify(conn.entries[0].entry_dn, {"userCertificate": [(ldap3.MODIFY_ADD, [der])]})
    conn.unbind()
    return der


def _writable_user(
    emulator, population: list[SeedUser], recipient_type: str | None, nth: int = 0
) -> SeedUser:
    """The nth user without planted defects whose recipient (of that type) certsync may write."""
    by_mail = {u.mail.lower(): u for u in population if u.mail and not u.defects}
    found = [
        by_mail[r["PrimarySmtpAddress"].lower()]
        for r in emulator.control.state()["recipients"]
        if (not r["IsDirSynced"] or r["IsExchangeCloudManaged"])
        and recipient_type in (None, r["RecipientTypeDetails"])
        and r["PrimarySmtpAddress"].lower() in by_mail
    ]
    if len(found) > nth:
        return found[nth]
    raise AssertionError(f"no writable {recipient_type} in the population")


def test_transient_failures_are_retried_and_every_attempt_audited(
    settled, populated_dc, lab_pki, lab_population, own_tenant, db, lab_at
) -> None:
    when = lab_at + timedelta(days=2)
    user = _writable_user(own_tenant, lab_population, "UserMailbox")
    _give_new_certificate(populated_dc, lab_pki, user, when)
    own_tenant.control.inject_fault(cmdlet="Set-Mailbox", count=1, status=503)
    own_tenant.control.inject_fault(cmdlet="Set-Mailbox", count=1, status=429, retry_after=1)
    try:
        _run(settled, when)
    finally:
        own_tenant.control.set_config(faults=[])
    rows = db.execute(
        "SELECT attempt, outcome, http_status FROM certsync.audit_log WHERE primary_smtp = %s AND phase = 'outcome'"
        " ORDER BY seq DESC LIMIT 3",
        (user.mail,),
    ).fetchall()
    assert sorted(rows) == [(1, "failed", 503), (2, "failed", 429), (3, "accepted", 200)]


def test_dry_run_plans_but_publishes_nothing(
    settled, populated_dc, lab_pki, lab_population, own_tenant, db, lab_at
) -> None:
    when = lab_at + timedelta(days=3)
    user = _writable_user(own_tenant, lab_population, None, nth=1)
    _give_new_certificate(populated_dc, lab_pki, user, when)
    own_tenant.control.clear_requests()
    summary = _run(settled, when, dry_run=True)
    assert not [r for r in own_tenant.control.requests() if str(r.get("cmdlet")).startswith("Set-")]
    assert summary["actions"].get("replace:dry_run", 0) + summary["actions"].get("add:dry_run", 0) >= 1
    _run(settled, when + timedelta(hours=1))  # a real run afterwards catches up
    assert [r for r in own_tenant.control.requests() if str(r.get("cmdlet")).startswith("Set-")]


def test_replanning_a_published_run_changes_nothing(
    settled, populated_dc, lab_pki, lab_population, own_tenant, lab_at
) -> None:
    """Clearing plan and publish of a finished run (or retrying them) must not publish twice."""
    when = lab_at + timedelta(days=4)
    _give_new_certificate(
        populated_dc, lab_pki, _writable_user(own_tenant, lab_population, None, nth=2), when
    )
    run_id = _begin(settled, when)
    extract(settled, run_id=run_id)
    read_recipients(settled, run_id=run_id)
    validate(settled, run_id=run_id)
    batches = plan(settled, run_id=run_id)
    assert batches
    own_tenant.control.clear_requests()
    for batch in batches:
        publish(settled, run_id=run_id, batch=batch)
    assert len(_set_calls(own_tenant)) == 1
    for batch in plan(settled, run_id=run_id):  # the clear: plan again, publish again
        publish(settled, run_id=run_id, batch=batch)
    assert plan(settled, run_id=run_id) == [0]  # one batch, with nothing left in it to send
    assert len(_set_calls(own_tenant)) == 1
    finish(settled, run_id=run_id)  # frees the run slot for the next run


def _set_calls(emulator) -> list[dict]:
    return [r for r in emulator.control.requests() if str(r.get("cmdlet")).startswith("Set-")]


def test_late_backfill_never_overwrites_a_newer_view(
    settled, populated_dc, lab_pki, lab_population, own_tenant, lab_at
) -> None:
    newest = lab_at + timedelta(days=5)
    _run(settled, newest)
    older = newest - timedelta(days=2)
    user = _writable_user(own_tenant, lab_population, None, nth=3)
    _give_new_certificate(populated_dc, lab_pki, user, older)  # valid at both times
    own_tenant.control.clear_requests()
    summary = _run(settled, older)  # an older logical date, run late: superseded, sends nothing
    assert _set_calls(own_tenant) == []
    assert summary["not_published_by_reason"].get("superseded") == 1, summary
    assert summary["superseded_by"] is not None


def test_a_change_an_older_run_read_on_its_rerun_is_published_by_the_next_run(
    settled, populated_dc, lab_pki, lab_population, own_tenant, lab_at
) -> None:
    """An operator reprocesses an older interval after a newer run planned: the rerun reads a
    directory change (a delta, under the older run's id) and is superseded, so it sends nothing.
    The next run plans against the newer run's plan, and must still find that change."""
    older, newer, later = (lab_at + timedelta(days=d) for d in (6, 7, 8))
    key = f"guards__{uuid.uuid4()}"
    run_all(settled, dag_id="guards", airflow_run_id=key, logical_date=older)
    _run(settled, newer)
    user = _writable_user(own_tenant, lab_population, None, nth=4)
    _give_new_certificate(populated_dc, lab_pki, user, older)
    own_tenant.control.clear_requests()
    rerun = run_all(settled, dag_id="guards", airflow_run_id=key, logical_date=older)
    assert rerun["not_published_by_reason"].get("superseded") == 1, rerun
    assert _set_calls(own_tenant) == []
    _run(settled, later)
    written = {r["identity"] for r in _set_calls(own_tenant)}
    recipient = next(
        r["ExternalDirectoryObjectId"]
        for r in own_tenant.control.state()["recipients"]
        if r["PrimarySmtpAddress"].lower() == user.mail.lower()
    )
    assert written == {recipient}, written


def test_removal_threshold_stops_mass_removal(settled, own_sync_env, own_tenant, db, lab_at) -> None:
    services = _services(
        own_sync_env,
        AIRFLOW_VAR_CERTSYNC_CONFIG=json.dumps(
            {**json.loads(own_sync_env["AIRFLOW_VAR_CERTSYNC_CONFIG"]), "removal_threshold": 0}
        ),
    )
    # Ten years on every certificate has expired: publishing would clear every recipient.
    own_tenant.control.clear_requests()
    with pytest.raises(RemovalThresholdExceeded, match="removal_threshold=0"):
        _run(services, lab_at + timedelta(days=3650))
    assert not [r for r in own_tenant.control.requests() if str(r.get("cmdlet")).startswith("Set-")]


def test_secrets_never_reach_database_rows(
    settled, own_sync_env, db, app_credential_files, populated_dc
) -> None:
    _cert, key_file, secret = app_credential_files
    key_line = key_file.read_text().splitlines()[1]
    dump = "\n".join(
        str(row)
        for table in ("sync_run", "audit_log", "planned_action", "value_result", "cert_verdict")
        for row in db.execute(f"SELECT * FROM certsync.{table}")  # noqa: S608 - fixed table names
    )
    for secret_text in (secret, populated_dc.password, key_line):
        assert secret_text not in dump
    assert populated_dc.password not in repr(settled.settings)


def test_client_secret_credential_works_as_well_as_a_certificate(
    own_sync_env, populated_dc, own_tenant, app_credential_files
) -> None:
    from certsync.config import connection_uri
    from certsync.pipeline import preflight
    from certsync_lab.stack import lab_connections

    _cert, _key, secret = app_credential_files
    exchange = lab_connections(samba=populated_dc, emulator=own_tenant, credential=secret)[
        "certsync_exchange"
    ]
    services = _services(own_sync_env, AIRFLOW_CONN_CERTSYNC_EXCHANGE=connection_uri(exchange))
    assert services.settings.exchange.certificate_file is None
    assert len(preflight(services)) == 64  # the trust fingerprint: every check passed


def test_cli_logs_and_output_carry_no_secret(own_sync_env, populated_dc, app_credential_files) -> None:
    import os
    import subprocess
    import sys

    _cert, key_file, secret = app_credential_files
    result = subprocess.run(
        [sys.executable, "-m", "certsync.cli", "-v", "run", "--dry-run"],
        env={**os.environ, **own_sync_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "INFO" in output and "dry run" in output
    for secret_text in (secret, populated_dc.password, key_file.read_text().splitlines()[1]):
        assert secret_text not in output


def test_exchange_refusal_of_a_synced_recipient_is_a_conflict_not_a_retry(settled, own_tenant) -> None:
    """If a recipient turns synced after the snapshot, the write's refusal is classified as a conflict."""
    synced = next(
        r
        for r in own_tenant.control.state()["recipients"]
        if r["IsDirSynced"] and not r["IsExchangeCloudManaged"] and r["RecipientTypeDetails"] == "UserMailbox"
    )
    outcome = settled.exchange.set_certificates(
        cmdlet="Set-Mailbox",
        identity=synced["ExternalDirectoryObjectId"],
        user_certificate=[],
        user_smime_certificate=[],
    )
    assert outcome.kind == "conflict", outcome
    unknown = settled.exchange.set_certificates(
        cmdlet="Set-Mailbox", identity=str(uuid.uuid4()), user_certificate=[], user_smime_certificate=[]
    )
    assert unknown.kind == "not_found" and unknown.code == "ManagementObjectNotFoundException", unknown
    assert unknown.audit_outcome == "rejected", unknown
