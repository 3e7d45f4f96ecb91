"""The schema is installed by its owner (`certsync db upgrade`); runs log in as certsync_app and refuse
a schema that is missing, behind, or a login strong enough to bypass the audit log's guards."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid

import psycopg
import pytest

from certsync.store import db
from certsync_lab.postgres import EmbeddedPostgres

pytestmark = pytest.mark.integration


def _fresh_database(pg: EmbeddedPostgres) -> str:
    return pg.ensure_database(f"roles_{uuid.uuid4().hex[:8]}")


def _as_app(owner_dsn: str) -> str:
    return owner_dsn.replace("postgresql://postgres@", f"postgresql://{db.APP_ROLE}@")


def _upgrade(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "certsync.cli", "db", "upgrade", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_db_upgrade_applies_every_migration_once(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    first = _upgrade("--owner-dsn", owner)
    assert first.returncode == 0, first.stderr
    assert "applied now: " + ", ".join(db.migration_ids()) in first.stdout
    again = _upgrade("--owner-dsn", owner)
    assert again.returncode == 0 and "applied now: nothing" in again.stdout
    db.check_schema(db.create_engine(_as_app(owner)))  # the app login finds it current


def test_db_upgrade_sets_the_app_password_from_its_connection(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    app_uri = _as_app(owner).replace(f"{db.APP_ROLE}@", f"{db.APP_ROLE}:n3w-s3cret@")
    result = _upgrade(
        env={"AIRFLOW_CONN_CERTSYNC_POSTGRES_OWNER": owner, "AIRFLOW_CONN_CERTSYNC_POSTGRES": app_uri}
    )
    assert result.returncode == 0, result.stderr
    assert "n3w-s3cret" not in result.stdout + result.stderr
    with psycopg.connect(embedded_pg.dsn) as conn:
        (stored,) = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (db.APP_ROLE,)
        ).fetchone()
    assert stored.startswith("SCRAM-SHA-256$")


def test_db_upgrade_without_owner_credentials_names_the_connection() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_CONN_CERTSYNC_POSTGRES_OWNER"}
    result = subprocess.run(
        [sys.executable, "-m", "certsync.cli", "db", "upgrade"], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0
    assert "certsync_postgres_owner" in result.stderr and "Traceback" not in result.stderr


def test_a_run_refuses_a_database_without_the_schema(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    with pytest.raises(db.SchemaError, match="not installed: run `certsync db upgrade`"):
        db.check_schema(db.create_engine(owner))


def test_a_run_refuses_a_schema_with_pending_migrations(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    db.migrate(owner)
    last = db.migration_ids()[-1]
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute("DELETE FROM _yoyo_migration WHERE migration_id = %s", (last,))
    with pytest.raises(db.SchemaError, match=f"1 migrations pending \\({last}\\)"):
        db.check_schema(db.create_engine(_as_app(owner)))


def test_a_run_refuses_to_log_in_as_the_owner_or_a_superuser(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    db.migrate(owner)
    with pytest.raises(db.SchemaError, match="superuser or the schema's owner; log in as certsync_app"):
        db.check_schema(db.create_engine(owner))


def test_the_app_login_may_append_to_the_audit_log_but_not_rewrite_it(embedded_pg: EmbeddedPostgres) -> None:
    owner = _fresh_database(embedded_pg)
    db.migrate(owner)
    with psycopg.connect(_as_app(owner)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (db.APP_ROLE,)
        for statement in ("UPDATE certsync.audit_log SET outcome = 'x'", "TRUNCATE certsync.audit_log"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()


def test_rows_written_in_bulk_must_name_what_they_reference(embedded_pg: EmbeddedPostgres) -> None:
    """sql/0022 and 0025: the bulk tables check their run (or certificate, or user) once per
    statement, COPY included, instead of a foreign key per row; a change of a reference is checked
    too, deleting a run deletes its working rows, deleting a user its values, and a certificate or a
    run that rows still name cannot be deleted."""
    owner = _fresh_database(embedded_pg)
    db.migrate(owner)
    insert = (
        "INSERT INTO certsync.value_result (run_id, object_guid, attribute, sha256, selected, detail)"
        " VALUES (%s, gen_random_uuid(), 'userCertificate', '\\x01', true, 'selected')"
    )
    with psycopg.connect(_as_app(owner)) as conn:
        (run,) = conn.execute(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
            " VALUES ('d', 'r', now(), 'full', false) RETURNING run_id"
        ).fetchone()
        conn.commit()
        conn.execute(insert, (run,))
        missing = f"value_result names sync_run.run_id {run + 1}, which does not exist"
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=missing):
            conn.execute(insert, (run + 1,))
        conn.rollback()
        conn.execute(insert, (run,))
        copy_in = (
            "COPY certsync.exo_recipient (recipient_id, primary_smtp, recipient_type, is_dir_synced,"
            " is_cloud_managed, seen_run_id) FROM STDIN"
        )
        with (
            pytest.raises(
                psycopg.errors.ForeignKeyViolation, match=f"exo_recipient names sync_run.run_id {run + 7}"
            ),
            conn.cursor() as cur,
            cur.copy(copy_in) as copy,
        ):
            copy.write_row(("a", "a@x.test", "UserMailbox", False, False, run))
            copy.write_row(("b", "b@x.test", "UserMailbox", False, False, run + 7))
        conn.rollback()
        conn.execute(insert, (run,))
        with pytest.raises(
            psycopg.errors.ForeignKeyViolation, match="value_result names a sync_run that does not"
        ):
            conn.execute("UPDATE certsync.value_result SET run_id = run_id + 1")
        conn.rollback()
        conn.execute(insert, (run,))
        conn.execute("UPDATE certsync.value_result SET detail = 'kept'")  # the run unchanged: no check
        blob, unknown = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
        conn.execute(
            "INSERT INTO certsync.cert_blob (sha256, value, first_run_id) VALUES (%s, 'a', %s)", (blob, run)
        )
        (user,) = conn.execute(
            "INSERT INTO certsync.source_user (object_guid, dn, sam_account_name, user_account_control,"
            " usn_changed, last_seen_run_id, changed_run_id)"
            " VALUES (gen_random_uuid(), 'CN=a', 'a', 512, 1, %s, %s) RETURNING object_guid",
            (run, run),
        ).fetchone()
        value = (
            "INSERT INTO certsync.source_value (object_guid, attribute, sha256, ordinal)"
            " VALUES (%s, 'userCertificate', %s, 0)"
        )
        conn.execute(value, (user, blob))
        conn.commit()
        with pytest.raises(
            psycopg.errors.ForeignKeyViolation, match=f"names cert_blob.sha256 ..{unknown.hex()}"
        ):
            conn.execute(value, (user, unknown))
        conn.rollback()
        # sql/0025: the source view, the certificates and the verdicts too
        with pytest.raises(
            psycopg.errors.ForeignKeyViolation, match=r"source_value names source_user\.object_guid"
        ):
            conn.execute(value, (uuid.uuid4(), blob))
        conn.rollback()
        with pytest.raises(
            psycopg.errors.ForeignKeyViolation, match=f"cert_blob names sync_run.run_id {run + 1}"
        ):
            conn.execute(
                "INSERT INTO certsync.cert_blob (sha256, value, first_run_id) VALUES (%s, 'b', %s)",
                (unknown, run + 1),
            )
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="source_user names a sync_run"):
            conn.execute("UPDATE certsync.source_user SET changed_run_id = %s", (run + 1,))
        conn.rollback()
    with psycopg.connect(owner) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="still named by a value or a verdict"):
            conn.execute("DELETE FROM certsync.cert_blob")
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="still named by a certificate, a user"):
            conn.execute("DELETE FROM certsync.sync_run")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM certsync.value_result").fetchone() == (1,)
        conn.execute("DELETE FROM certsync.source_user")  # and its values
        assert conn.execute("SELECT count(*) FROM certsync.source_value").fetchone() == (0,)
        conn.execute("DELETE FROM certsync.cert_blob")
        conn.execute("DELETE FROM certsync.sync_run")
        assert conn.execute("SELECT count(*) FROM certsync.value_result").fetchone() == (0,)
