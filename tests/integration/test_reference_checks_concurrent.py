"""sql/0028: the per-statement reference checks (0022, 0025) hold when a delete and an insert of
rows naming what it deletes run at the same time, as the foreign keys they replaced did: whichever
comes second waits for the first to end, then sees its rows. sql/0029 and 0030: TRUNCATE and a
changed key are refused, as with the keys."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa

from certsync.config import database_dsn
from certsync.store import db
from certsync_lab.postgres import EmbeddedPostgres
from certsync_lab.stack import certsync_database

pytestmark = pytest.mark.integration

WAIT_S = 10.0
VERDICT = (
    "INSERT INTO certsync.cert_verdict (sha256, attribute, trust_fingerprint, ok, detail, checked_run_id,"
    " checked_at) VALUES (%s, 'userCertificate', 'fp', true, 'Valid.', %s, now())"
)


@dataclass(frozen=True)
class Named:
    """A database with a run, a certificate and a user, and the logins that write to it."""

    owner: str
    app: str
    run: int
    blob: bytes
    user: uuid.UUID


@pytest.fixture
def named(embedded_pg: EmbeddedPostgres) -> Iterator[Named]:
    name = f"refs_{uuid.uuid4().hex[:8]}"
    app = database_dsn(certsync_database(embedded_pg, name))  # migrated, as `certsync db upgrade` does
    owner = embedded_pg.dsn_for(name)
    blob = hashlib.sha256(b"a").digest()
    with psycopg.connect(owner) as conn:
        (run,) = conn.execute(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
            " VALUES ('d', 'r', now(), 'full', false) RETURNING run_id"
        ).fetchone()
        conn.execute(
            "INSERT INTO certsync.cert_blob (sha256, value, first_run_id) VALUES (%s, 'a', %s)", (blob, run)
        )
        (user,) = conn.execute(
            "INSERT INTO certsync.source_user (object_guid, dn, sam_account_name, user_account_control,"
            " usn_changed, last_seen_run_id, changed_run_id)"
            " VALUES (gen_random_uuid(), 'CN=a', 'a', 512, 1, %s, %s) RETURNING object_guid",
            (run, run),
        ).fetchone()
    yield Named(owner, app, run, blob, user)


class Blocked:
    """A statement run on its own connection in a thread, which the test sees waiting for a lock."""

    def __init__(self, dsn: str, statement: Callable[[psycopg.Connection], object]) -> None:
        self.conn = psycopg.connect(dsn)
        self.pid = self.conn.info.backend_pid
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(statement,), daemon=True)
        self._thread.start()

    def _run(self, statement: Callable[[psycopg.Connection], object]) -> None:
        try:
            statement(self.conn)
            self.conn.commit()
        except BaseException as exc:  # handed to the test, which asserts on it
            self.error = exc
            self.conn.rollback()

    def waiting(self, observer: psycopg.Connection) -> bool:
        """Whether the statement is still waiting for a lock, polled until it waits or ends."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and self._thread.is_alive():
            row = observer.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (self.pid,)
            ).fetchone()
            if row and row[0] == "Lock":
                return True
            time.sleep(0.05)
        return False

    def result(self) -> BaseException | None:
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the statement did not end once its lock was free"
        self.conn.close()
        return self.error


def _name_the_certificate(conn: psycopg.Connection, named: Named) -> None:
    """A value of the user naming the certificate, in `conn`'s transaction."""
    conn.execute(
        "INSERT INTO certsync.source_value (object_guid, attribute, sha256, ordinal)"
        " VALUES (%s, 'userCertificate', %s, 0)",
        (named.user, named.blob),
    )


def _observer(named: Named) -> psycopg.Connection:
    return psycopg.connect(named.owner, autocommit=True)


def test_a_certificate_deleted_while_a_value_names_it_waits_then_is_refused(named: Named) -> None:
    with psycopg.connect(named.app) as writer, _observer(named) as observer:
        _name_the_certificate(writer, named)
        delete = Blocked(
            named.owner,
            lambda c: c.execute("DELETE FROM certsync.cert_blob WHERE sha256 = %s", (named.blob,)),
        )
        assert delete.waiting(observer), "the delete did not wait for the transaction naming the certificate"
        writer.commit()
        error = delete.result()
        assert isinstance(error, psycopg.errors.ForeignKeyViolation), error
        assert "still named by a value or a verdict" in str(error)
        assert observer.execute("SELECT count(*) FROM certsync.cert_blob").fetchone() == (1,)


def test_a_verdict_naming_a_certificate_being_deleted_waits_then_is_refused(named: Named) -> None:
    with psycopg.connect(named.owner) as deleter, _observer(named) as observer:
        deleter.execute("DELETE FROM certsync.cert_blob WHERE sha256 = %s", (named.blob,))
        insert = Blocked(
            named.app,
            lambda c: c.execute(VERDICT, (named.blob, named.run)),
        )
        assert insert.waiting(observer), (
            "the insert did not wait for the transaction deleting its certificate"
        )
        deleter.commit()
        error = insert.result()
        assert isinstance(error, psycopg.errors.ForeignKeyViolation), error
        assert f"names cert_blob.sha256 \\x{named.blob.hex()}, which does not exist" in str(error)
        assert observer.execute("SELECT count(*) FROM certsync.cert_verdict").fetchone() == (0,)


def test_a_run_deleted_while_its_rows_are_written_deletes_them_too(named: Named) -> None:
    with psycopg.connect(named.owner) as conn:  # a run nothing outliving it names
        (run,) = conn.execute(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
            " VALUES ('d', 'other', now(), 'full', false) RETURNING run_id"
        ).fetchone()
    with psycopg.connect(named.app) as writer, _observer(named) as observer:
        writer.execute(
            "INSERT INTO certsync.value_result (run_id, object_guid, attribute, sha256, selected, detail)"
            " VALUES (%s, gen_random_uuid(), 'userCertificate', '\\x01', true, 'selected')",
            (run,),
        )
        delete = Blocked(
            named.owner, lambda c: c.execute("DELETE FROM certsync.sync_run WHERE run_id = %s", (run,))
        )
        assert delete.waiting(observer), "the delete did not wait for the transaction writing the run's rows"
        writer.commit()
        assert delete.result() is None
        assert observer.execute("SELECT count(*) FROM certsync.value_result").fetchone() == (0,)


def test_a_user_deleted_while_its_values_are_written_deletes_them_too(named: Named) -> None:
    with psycopg.connect(named.app) as writer, _observer(named) as observer:
        _name_the_certificate(writer, named)
        delete = Blocked(
            named.app,
            lambda c: c.execute("DELETE FROM certsync.source_user WHERE object_guid = %s", (named.user,)),
        )
        assert delete.waiting(observer), (
            "the delete did not wait for the transaction writing the user's values"
        )
        writer.commit()
        assert delete.result() is None
        assert observer.execute("SELECT count(*) FROM certsync.source_value").fetchone() == (0,)


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_reference_checks_refuse_a_snapshot_kept_for_the_transaction(named: Named, level: str) -> None:
    """Under these levels a check would not see a delete committed after the transaction began."""
    with psycopg.connect(named.app) as conn:
        conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match=f"READ COMMITTED only, not {level}"):
            _name_the_certificate(conn, named)
        conn.rollback()
        conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match=r"delete from certsync\.source_user"):
            conn.execute("DELETE FROM certsync.source_user")


def test_a_certificate_or_user_that_values_name_cannot_be_truncated_alone(named: Named) -> None:
    """sql/0029: TRUNCATE deletes no row one by one; it is refused while rows naming the table
    remain, unless the same command truncates them too, as with the keys."""
    with psycopg.connect(named.owner) as conn:
        _name_the_certificate(conn, named)
        conn.execute(VERDICT, (named.blob, named.run))
        conn.commit()
        for truncated, table, naming in (
            ("cert_blob", "cert_blob", "source_value"),
            ("source_user", "source_user", "source_value"),
            ("cert_blob, certsync.source_value", "cert_blob", "cert_verdict"),
        ):
            with pytest.raises(
                psycopg.errors.ForeignKeyViolation,
                match=rf"truncating certsync\.{table} leaves the rows of certsync\.{naming}",
            ):
                conn.execute(f"TRUNCATE certsync.{truncated}")
            conn.rollback()
        assert conn.execute("SELECT count(*) FROM certsync.cert_blob").fetchone() == (1,)
        conn.execute(
            "TRUNCATE certsync.cert_blob, certsync.source_user, certsync.source_value, certsync.cert_verdict"
        )
        conn.commit()
        assert conn.execute(
            "SELECT (SELECT count(*) FROM certsync.cert_blob), (SELECT count(*) FROM certsync.source_user)"
        ).fetchone() == (0, 0)


def test_the_keys_rows_name_never_change(named: Named) -> None:
    """sql/0030: a run's number, a certificate's SHA-256 and a user's objectGUID are refused a new
    value (a key refused it while rows named it); the rest of those rows may change."""
    with psycopg.connect(named.app) as conn:
        for table, key, new, params in (
            ("sync_run", "run_id", "DEFAULT", ()),  # an identity: the only new value it may take
            ("cert_blob", "sha256", "%s", (hashlib.sha256(b"other").digest(),)),
            ("source_user", "object_guid", "%s", (uuid.uuid4(),)),
        ):
            with pytest.raises(
                psycopg.errors.ForeignKeyViolation,
                match=rf"certsync\.{table}\.{key} is a key other rows name",
            ):
                conn.execute(f"UPDATE certsync.{table} SET {key} = {new}", params)  # noqa: S608 - fixed names
            conn.rollback()
        conn.execute("UPDATE certsync.source_user SET display_name = 'A', object_guid = object_guid")
        assert conn.execute("SELECT display_name FROM certsync.source_user").fetchone() == ("A",)


def test_certsync_writes_under_read_committed_whatever_the_login_defaults_to(named: Named) -> None:
    """A login whose default is REPEATABLE READ has its own sessions refused, not certsync's."""
    with psycopg.connect(named.owner, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL(
                "ALTER ROLE {} IN DATABASE {} SET default_transaction_isolation = 'repeatable read'"
            ).format(psycopg.sql.Identifier(db.APP_ROLE), psycopg.sql.Identifier(conn.info.dbname))
        )
    with psycopg.connect(named.app) as conn, pytest.raises(psycopg.errors.FeatureNotSupported):
        _name_the_certificate(conn, named)
    engine = db.create_engine(named.app)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT current_setting('transaction_isolation')")).scalar() == (
                "read committed"
            )
            _name_the_certificate(conn.connection.driver_connection, named)
    finally:
        engine.dispose()
    with _observer(named) as observer:
        assert observer.execute("SELECT count(*) FROM certsync.source_value").fetchone() == (1,)
