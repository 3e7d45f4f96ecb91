"""The validate stage's statements fit PostgreSQL's default work_mem: reading a chunk of 10,000
pending values and saving its verdicts, or saving them again, writes no temporary files (a FETCH's
rows, a COPY's transition table and an upsert's sort go to disk past work_mem). PostgreSQL only:
the values are staged as the extract stages them, and their verdicts made as the validator makes a
parse failure's."""

from __future__ import annotations

import hashlib
import random
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from certsync.certificates.reasons import Reason
from certsync.certificates.verdict import Verdict
from certsync.config import database_dsn
from certsync.directory import DirectoryUser
from certsync.store import db, runs, source, validation
from certsync_lab.stack import app_connection, certsync_database

pytestmark = pytest.mark.integration

WHEN = datetime(2026, 6, 1, tzinfo=UTC)
DATABASE = "certsync_temp_files"
USERS, VALUES_EACH, VALUE_BYTES = 3_000, 4, 1_000  # a chunk of 10,000 values is 10 MB


@pytest.fixture(scope="module")
def superuser(embedded_pg):
    certsync_database(embedded_pg, DATABASE)
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {DATABASE} SET work_mem = '4MB'")  # PostgreSQL's default
        yield conn


@pytest.fixture(scope="module")
def engine(embedded_pg, superuser):
    engine = db.create_engine(database_dsn(app_connection(embedded_pg.port, DATABASE)))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def run_id(engine) -> int:
    rng = random.Random(7)
    users = [
        DirectoryUser(
            object_guid=uuid.UUID(int=n + 1),
            dn=f"CN=u{n},OU=People,DC=x",
            sam_account_name=f"u{n}",
            mail=f"u{n}@x.test",
            proxy_addresses=(),
            user_certificate=tuple(rng.randbytes(VALUE_BYTES) for _ in range(VALUES_EACH)),
            user_smime_certificate=(),
            user_account_control=512,
            usn_changed=n,
        )
        for n in range(USERS)
    ]
    with engine.begin() as conn:
        run_id = runs.begin_run(
            conn, dag_id="temp-files", airflow_run_id="temp-files", logical_date=WHEN, mode="full",
            dry_run=True, trust_fingerprint="-",
        )  # fmt: skip
        source.clear_staging(conn, run_id=run_id)
        source.stage_users(conn, run_id=run_id, users=users, page_size=500)
        source.merge_source(conn, run_id=run_id, full=True)
    return run_id


def _temp_files(superuser: psycopg.Connection) -> int:
    return superuser.execute(
        "SELECT temp_files FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()[0]


def _flushed(conn: sa.Connection) -> None:
    """End `conn`'s transaction with its statistics flushed (a backend reports them when idle)."""
    conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
    conn.commit()


def _refused(attribute: str, value: bytes, *, why: str = "ValueError") -> Verdict:
    return Verdict(
        sha256=hashlib.sha256(value).digest(),
        attribute=attribute,
        ok=False,
        reason=Reason.MALFORMED.value,
        rule="enterprise.parse",
        detail=f"{Reason.MALFORMED.sentence} cannot parse {attribute}: {why}: {value[:150].hex()}",
    )


def test_the_counter_sees_a_statement_past_work_mem(engine, superuser) -> None:
    """The measure below can fail: a sort larger than work_mem is counted."""
    before = _temp_files(superuser)
    with engine.connect() as conn:
        conn.execute(sa.text("SET LOCAL work_mem = '64kB'"))
        conn.execute(sa.text("SELECT g FROM generate_series(1, 20000) g ORDER BY g DESC")).all()
        _flushed(conn)
    assert _temp_files(superuser) > before


def test_validating_a_chunk_writes_no_temporary_files(engine, superuser, run_id) -> None:
    """Every pending value read in chunks of 10,000, and their verdicts saved a chunk at a time,
    as the validate stage does it; then saved again, as a retried try does (its COPY meets the
    earlier verdicts and an upsert replaces them)."""
    before = _temp_files(superuser)
    sizes = []
    with engine.connect() as reading, engine.connect() as saving:
        for chunk in validation.pending_chunks(reading, fingerprint="-", at=WHEN, shard=0, shards=1):
            sizes.append(len(chunk))
            for why in ("ValueError", "retried"):
                verdicts = [_refused(attribute, value, why=why) for attribute, value in chunk]
                validation.save_verdicts(saving, verdicts=verdicts, fingerprint="-", run_id=run_id, at=WHEN)
                saving.commit()
        _flushed(reading)
        _flushed(saving)
    saved = superuser.execute(
        "SELECT count(*) FILTER (WHERE detail LIKE '%: retried: %'), count(*) FROM certsync.cert_verdict"
        " WHERE trust_fingerprint = '-'"
    )
    assert sizes == [validation.CHUNK, USERS * VALUES_EACH - validation.CHUNK]
    assert saved.fetchone() == (USERS * VALUES_EACH, USERS * VALUES_EACH)
    assert _temp_files(superuser) == before
