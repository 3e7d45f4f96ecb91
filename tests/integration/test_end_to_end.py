"""The certsync DAG end to end with dag.test(): Samba AD DC -> embedded Postgres -> the Exchange
Online emulator over TLS with msal. The oracle is the population generator's own record of which
planted value must be accepted, independent of the validator under test."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from emulator_support import app_connections

from certsync.config import EnvSource
from certsync_lab.population import SeedUser
from certsync_lab.stack import sync_environment
from tests.integration.conftest import airflow_settings, certsync_dag

pytestmark = pytest.mark.integration
E2E_DATABASE = "certsync_e2e"

PLANTED_REASONS = {
    "expired",
    "not_yet_valid",
    "no_email_protection_eku",
    "unknown_issuer",
    "email_mismatch",
    "weak_key",
    "weak_signature",
    "revoked",
    "malformed",
    "over_limit",
}


@pytest.fixture(scope="module")
def certsync_env(
    sync_env: dict[str, str], populated_dc, embedded_pg, own_tenant, app_credential_files, checkpoint_dir
) -> Iterator[dict[str, str]]:
    """The session's settings over this module's tenant and a database of its own: other modules'
    runs (later logical dates) must not count as newer views here; audit checkpoints go to a file."""
    config = {
        **json.loads(sync_env["AIRFLOW_VAR_CERTSYNC_CONFIG"]),
        "audit_checkpoint_dir": str(checkpoint_dir),
    }
    connections = app_connections(
        dc=populated_dc,
        emulator=own_tenant,
        credentials=app_credential_files,
        pg=embedded_pg,
        database=E2E_DATABASE,
    )
    with airflow_settings(sync_environment(connections, config)) as env:
        yield env


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("audit-checkpoints")


@pytest.fixture(scope="module")
def dag(certsync_env):
    return certsync_dag()


@pytest.fixture(scope="module")
def db(certsync_env, embedded_pg) -> Iterator[psycopg.Connection]:
    with psycopg.connect(embedded_pg.dsn_for(E2E_DATABASE), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def first_run(dag, own_tenant, lab_at):
    own_tenant.control.clear_requests()
    run = dag.test(logical_date=lab_at)
    return run, own_tenant.control.requests()


def _set_calls(requests: list[dict]) -> list[dict]:
    return [r for r in requests if str(r.get("cmdlet") or "").startswith("Set-")]


def _valid_hashes(user: SeedUser, values: list[bytes]) -> set[bytes]:
    """What the recipient must hold: the valid values, none of a disabled account (withdrawn)."""
    digests = (hashlib.sha256(v) for v in values)
    return {d.digest() for d in digests if user.expected[d.hexdigest()] is None and not user.disabled}


def test_first_run_succeeds_and_publishes_every_change(first_run, db) -> None:
    run, requests = first_run
    assert run.state == "success"
    states = dict(
        db.execute(
            "SELECT p.state, count(*) FROM certsync.planned_action p JOIN certsync.sync_run s USING (run_id)"
            " WHERE s.airflow_run_id = %s GROUP BY 1",
            (run.run_id,),
        ).fetchall()
    )
    assert "pending" not in states and "failed" not in states
    assert states.get("published", 0) == len(_set_calls(requests)) > 0


def test_every_writable_recipient_holds_exactly_its_users_valid_certificates(
    first_run, own_tenant, lab_population: list[SeedUser]
) -> None:
    by_mail = {u.mail.lower(): u for u in lab_population if u.mail}
    checked = 0
    for recipient in own_tenant.control.state()["recipients"]:
        if recipient["IsDirSynced"] and not recipient["IsExchangeCloudManaged"]:
            continue
        user = by_mail[recipient["PrimarySmtpAddress"].lower()]
        for field, values in (
            ("UserCertificate", user.user_certificate),
            ("UserSMimeCertificate", user.user_smime_certificate),
        ):
            held = [hashlib.sha256(base64.b64decode(v)).digest() for v in recipient[field]]
            assert len(held) <= 15
            assert set(held) == _valid_hashes(user, values), f"{user.mail} {field}"
        checked += 1
    assert checked > 20


def test_directory_synced_recipients_are_conflicts_not_writes(first_run, own_tenant, db) -> None:
    _, requests = first_run
    synced = {
        r["ExternalDirectoryObjectId"]
        for r in own_tenant.control.state()["recipients"]
        if r["IsDirSynced"] and not r["IsExchangeCloudManaged"]
    }
    assert synced
    assert not {r.get("identity") for r in _set_calls(requests)} & synced
    conflicts = db.execute(
        "SELECT count(*) FROM certsync.planned_action WHERE kind = 'conflict' AND state = 'conflict'"
    ).fetchone()[0]
    assert conflicts > 0


def test_an_intent_and_an_outcome_per_publish_request(first_run, db) -> None:
    _, requests = first_run
    rows = db.execute(
        "SELECT count(*), count(DISTINCT client_request_id) FROM certsync.audit_log WHERE phase = 'intent'"
    ).fetchone()
    assert rows[0] == rows[1] == len(_set_calls(requests))
    sent = {r["client_request_id"] for r in _set_calls(requests)}
    for phase in ("intent", "outcome"):
        audited = db.execute("SELECT client_request_id FROM certsync.audit_log WHERE phase = %s", (phase,))
        assert {str(r[0]) for r in audited} == sent
    # Each intent was written before its outcome, and closed once.
    assert db.execute(
        "SELECT count(*) FROM certsync.audit_log o JOIN certsync.audit_log i ON i.seq = o.intent_seq"
        " WHERE o.phase = 'outcome' AND i.seq < o.seq AND i.client_request_id = o.client_request_id"
    ).fetchone()[0] == len(sent)


def test_summary_gives_a_reason_for_every_planted_defect(
    first_run, db, own_tenant, lab_population: list[SeedUser]
) -> None:
    summary = db.execute(
        "SELECT summary FROM certsync.sync_run WHERE airflow_run_id = %s", (first_run[0].run_id,)
    ).fetchone()[0]
    missing = set(PLANTED_REASONS) - set(summary["refused_by_reason"])
    assert not missing, f"no refusal counted for {missing}: {summary['refused_by_reason']}"
    assert summary["users"] == len(lab_population)
    # Users with valid certificates but no recipient in the tenant are reported, one by one.
    have_recipient = {r["PrimarySmtpAddress"].lower() for r in own_tenant.control.state()["recipients"]}
    orphans = [
        u
        for u in lab_population
        if u.mail and u.valid_count and not u.disabled and u.mail.lower() not in have_recipient
    ]
    assert summary["not_published_by_reason"].get("recipient_not_found", 0) == len(orphans)


def test_second_run_makes_no_set_call(first_run, dag, own_tenant, lab_at, db) -> None:
    audit_before = db.execute("SELECT count(*) FROM certsync.audit_log").fetchone()[0]
    own_tenant.control.clear_requests()
    run = dag.test(logical_date=lab_at + timedelta(hours=1))
    assert run.state == "success"
    assert _set_calls(own_tenant.control.requests()) == []
    assert db.execute("SELECT count(*) FROM certsync.audit_log").fetchone()[0] == audit_before


def test_audit_log_is_append_only_for_the_application_role(first_run, db) -> None:
    for statement in (
        "UPDATE certsync.audit_log SET outcome = 'accepted'",
        "DELETE FROM certsync.audit_log",
        "TRUNCATE certsync.audit_log",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("SET LOCAL ROLE certsync_app")
            db.execute(statement)
    # Even the owner is stopped by the guard triggers.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"), db.transaction():
        db.execute("DELETE FROM certsync.audit_log WHERE seq = 1")


@pytest.fixture(scope="module")
def owner_engine(embedded_pg):
    import sqlalchemy as sa

    engine = sa.create_engine(
        embedded_pg.dsn_for(E2E_DATABASE).replace("postgresql://", "postgresql+psycopg://")
    )
    yield engine
    engine.dispose()


def _tampered(engine, *statements: str, checkpoint: dict) -> list[str]:
    """What the verifier says (with the lab's public key and the run's signed checkpoint) after a
    superuser switched the guards off and ran `statements` (all rolled back afterwards)."""
    import sqlalchemy as sa

    from certsync.audit.checkpoints import Checkpoint
    from certsync.audit.rows import db_rows
    from certsync.audit.verify import verify_rows
    from certsync_lab.stack import lab_audit_key

    key = lab_audit_key()
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        conn.execute(sa.text("DROP INDEX certsync.audit_log_closed_once"))
        for statement in statements:
            conn.execute(sa.text(statement))
        report = verify_rows(
            db_rows(conn),
            public_keys={key.key_id: key.private.public_key()},
            checkpoints=[Checkpoint.from_json(checkpoint, where="the run's summary")],
        )
        transaction.rollback()
    return [f"row {p.seq}: {p.kind}" for p in report.problems]


def _head(db) -> str:
    seq, row_hash = db.execute(
        "SELECT seq, encode(row_hash, 'hex') FROM certsync.audit_log ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return f"{seq}:{row_hash}"


def test_hash_chain_is_intact_and_its_head_is_in_the_run_summary(first_run, db) -> None:
    assert db.execute("SELECT count(*) FROM certsync.audit_chain_breaks").fetchone()[0] == 0  # links only
    summary = db.execute(
        "SELECT summary FROM certsync.sync_run WHERE airflow_run_id = %s", (first_run[0].run_id,)
    ).fetchone()[0]
    assert summary["audit_head"] == _head(db)


def test_verifier_finds_altered_removed_inserted_rows_and_a_cut_tail(first_run, db, owner_engine) -> None:
    head = _head(db)
    last = int(head.split(":")[0])
    summary = db.execute(
        "SELECT summary FROM certsync.sync_run WHERE airflow_run_id = %s", (first_run[0].run_id,)
    ).fetchone()[0]
    checkpoint = summary["audit_checkpoint"]
    assert f"{checkpoint['seq']}:{checkpoint['head']}" == head
    assert _tampered(owner_engine, checkpoint=checkpoint) == []
    changed = _tampered(
        owner_engine, "UPDATE certsync.audit_log SET detail = 'edited' WHERE seq = 2", checkpoint=checkpoint
    )
    assert changed == ["row 2: altered"]
    assert (
        _tampered(owner_engine, "DELETE FROM certsync.audit_log WHERE seq = 3", checkpoint=checkpoint)[0]
        == "row 4: deleted"
    )
    inserted = ("INSERT INTO certsync.audit_log SELECT * FROM certsync.audit_log WHERE seq = 5").replace(
        "SELECT *",
        "SELECT seq + 1000, at, run_id, dag_id, airflow_run_id, object_guid, recipient_id,"
        " primary_smtp, cmdlet, action, user_certificate, user_smime_certificate, attempt, outcome,"
        " http_status, error_code, detail, client_request_id, prev_hash, row_hash, phase, intent_seq,"
        " action_no, task_try, settled_by_run_id, key_id, signature, public_key, key_endorsement",
    )
    assert _tampered(owner_engine, inserted, checkpoint=checkpoint)  # a copied row lands off the chain
    cut = f"DELETE FROM certsync.audit_log WHERE seq > {last - 2}"  # noqa: S608 - an int
    assert _tampered(owner_engine, cut, checkpoint=checkpoint) == [f"row {last - 1}: truncated"]


def test_each_run_appends_its_signed_checkpoint_and_verify_audit_checks_the_log(
    first_run, db, checkpoint_dir
) -> None:
    import json

    run, _requests = first_run
    summary = db.execute(
        "SELECT summary FROM certsync.sync_run WHERE airflow_run_id = %s", (run.run_id,)
    ).fetchone()[0]
    lines = (checkpoint_dir / "checkpoints.jsonl").read_text().splitlines()
    assert summary["audit_checkpoint"] in [json.loads(line) for line in lines]  # later runs append theirs
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["verify_audit"] == "success", states


def test_auditor_views_answer_from_the_history(first_run, db, embedded_pg) -> None:
    """As certsync_auditor: the timeline's open ranges are what each recipient holds now, the run's
    outcome, its refusals and each certificate's holders come out of the views."""
    run, _requests = first_run
    auditor = f"postgresql://certsync_auditor@127.0.0.1:{embedded_pg.port}/{E2E_DATABASE}"
    with psycopg.connect(auditor) as conn:
        now_held = conn.execute(
            "SELECT recipient_id, attribute, sha256 FROM certsync.recipient_certificate_timeline"
            " WHERE upper_inf(held) AND added_by_airflow_run_id = %s",
            (run.run_id,),
        ).fetchall()
        outcome = conn.execute(
            "SELECT state, published, dry_run, allow_mass_removal, audit_checkpoint_seq FROM certsync.run_outcomes"
            " WHERE airflow_run_id = %s",
            (run.run_id,),
        ).fetchone()
        refusals = conn.execute(
            "SELECT count(*) FROM certsync.refusals WHERE airflow_run_id = %s", (run.run_id,)
        ).fetchone()[0]
        holders = conn.execute("SELECT count(DISTINCT sha256) FROM certsync.certificate_history").fetchone()[
            0
        ]
        conn.execute("SELECT * FROM certsync.expiring_soon").fetchall()
    published = {
        (r, "userCertificate", bytes(h).hex())
        for r, hashes in db.execute("SELECT recipient_id, user_certificate FROM certsync.published_state")
        for h in hashes
    }
    assert {tuple(row) for row in now_held if row[1] == "userCertificate"} == published
    assert outcome[0] == "succeeded" and outcome[1] > 0 and outcome[2:4] == (False, False) and outcome[4]
    assert refusals > 0 and holders >= len({h for _r, _a, h in published})


def test_xcom_carries_only_small_references_and_no_secret(first_run, sync_env, app_credential_files) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    with engine.connect() as conn:
        values = [
            str(v) for (v,) in conn.execute(sa.text("SELECT value FROM xcom WHERE dag_id = 'certsync'"))
        ]
    assert values, "the run pushed no XCom at all"
    assert max(map(len, values)) < 2000
    _cert, _key, secret = app_credential_files
    ldap_password = EnvSource(environ=sync_env).connection("certsync_ldap").password
    assert not [v for v in values if secret in v or ldap_password in v]


def test_auditor_views_and_expiring_report(first_run, db, lab_at) -> None:
    horizon = timedelta(days=400)
    rows = db.execute(
        "SELECT primary_smtp, not_after FROM certsync.expiring_within(%s, %s)", (horizon, lab_at)
    ).fetchall()
    assert rows
    assert all(lab_at <= not_after < lab_at + horizon for _, not_after in rows)
    fewer = db.execute("SELECT count(*) FROM certsync.expiring_within(%s, %s)", (timedelta(days=30), lab_at))
    assert fewer.fetchone()[0] < len(rows)
    with db.transaction():
        db.execute("SET LOCAL ROLE certsync_auditor")
        reasons = {
            r for (r,) in db.execute("SELECT DISTINCT reason FROM certsync.value_verdicts WHERE NOT selected")
        }
        assert reasons >= {"expired", "malformed"}
        kinds = {k for (k,) in db.execute("SELECT DISTINCT kind FROM certsync.recipient_outcomes")}
        assert "conflict" in kinds
    with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
        db.execute("SET LOCAL ROLE certsync_auditor")
        db.execute("DELETE FROM certsync.sync_run")
