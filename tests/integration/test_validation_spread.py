"""The validate stage with more values pending than it checks in its own process: its validation
processes each read a range of them and save their verdicts on connections of their own. The
values are staged as the extract stages them (certificates of the lab's PKI, current, expired and
broken), in a database of this module's own."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import psycopg
import pytest

from certsync.certificates.validate import Validator
from certsync.certificates.verdict import verdict_rows
from certsync.config import EnvSource, load_settings
from certsync.directory import DirectoryUser
from certsync.failures import RunFailed
from certsync.pipeline import CHECKED_HERE, Services, begin, finish, validate
from certsync.store import source
from certsync_lab.pki import Pki

pytestmark = pytest.mark.integration
DATABASE = "certsync_spread"
USERS = 600  # 660 values: past CHECKED_HERE


@pytest.fixture(scope="module")
def services(own_sync_env) -> Services:
    return Services(settings=load_settings(EnvSource(environ=own_sync_env)))


@pytest.fixture(scope="module")
def staged(services: Services, lab_cache_dir, lab_at) -> tuple[int, list[DirectoryUser]]:
    """A run begun at lab_at whose source view holds USERS users with a current or an expired
    certificate each, and every tenth user a broken value too (a serial stream of its own: the
    lab's CAs, whose trust files the settings name, issue them)."""
    pki = Pki(seed=0, key_cache=lab_cache_dir / "pki-keys", serial_stream=11)
    old = {"not_before": lab_at - timedelta(days=400), "not_after": lab_at - timedelta(days=30)}
    users = [
        DirectoryUser(
            object_guid=uuid.UUID(int=n + 1),
            dn=f"CN=s{n},OU=People,DC=x",
            sam_account_name=f"s{n}",
            mail=f"s{n}@corp.example.test",
            proxy_addresses=(),
            user_certificate=(
                pki.issue(email=f"s{n}@corp.example.test", **(old if n % 3 == 0 else {})),
                *((f"broken {n}".encode(),) if n % 10 == 0 else ()),
            ),
            user_smime_certificate=(),
            user_account_control=512,
            usn_changed=n,
        )
        for n in range(USERS)
    ]
    run_id = begin(
        services, dag_id="spread", airflow_run_id=f"spread__{uuid.uuid4()}", logical_date=lab_at,
        mode="full", dry_run=True,
    )  # fmt: skip
    with services.engine.begin() as conn:
        source.clear_staging(conn, run_id=run_id)
        source.stage_users(conn, run_id=run_id, users=users, page_size=100)
        source.merge_source(conn, run_id=run_id, full=True)
    return run_id, users


def test_many_pending_values_are_read_checked_and_saved_by_the_validation_processes(
    services, staged, embedded_pg, lab_at, caplog
) -> None:
    run_id, users = staged
    items = [("userCertificate", value) for user in users for value in user.user_certificate]
    assert len(items) > CHECKED_HERE
    validator = Validator(trust=services.settings.trust.load())
    expected = sorted(verdict_rows(validator.check(attribute=a, value=v, at=lab_at) for a, v in items))

    with caplog.at_level(logging.INFO, logger="certsync.pipeline"):
        counts = validate(services, run_id=run_id)
    assert "each reading and saving a range" in caplog.text
    assert counts == {"validated": len(items), "refused": sum(1 for row in expected if not row[2])}
    assert {row[3] for row in expected} >= {None, "expired", "malformed"}

    with psycopg.connect(embedded_pg.dsn_for(DATABASE)) as db:
        stored = db.execute(
            "SELECT sha256, attribute, ok, reason, rule, detail, subject, issuer, serial, not_before,"
            " not_after, valid_until, emails, checked_run_id FROM certsync.cert_verdict"
            " ORDER BY sha256, attribute"
        ).fetchall()
    assert [(bytes(r[0]), *r[1:13]) for r in stored] == expected
    assert {r[13] for r in stored} == {run_id}

    # Nothing is left pending: the stage checks nothing again, and closes as a run without a plan.
    assert validate(services, run_id=run_id) == {"validated": 0, "refused": 0}
    with pytest.raises(RunFailed):
        finish(services, run_id=run_id)
