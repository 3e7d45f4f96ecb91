"""Cost of the signed audit log: signing rows as the writer does, and verifying a long history.

    .venv/bin/python bench/bench_audit.py                       # 100,000 signed, 1,000,000 verified
    .venv/bin/python bench/bench_audit.py --sign 20000 --verify 200000

Figures:
- sign: the writer's work per row outside the database (canonical encoding, SHA-256, Ed25519 sign),
  per 100,000 rows, one core; and the whole append (advisory lock, head read, two inserts per
  Set-*, commit) per 100,000 rows against an embedded PostgreSQL, measured on --append rows.
- verify: `verify_rows` over rows read from PostgreSQL with the plain streaming SELECT the command
  uses (encode, SHA-256 and Ed25519 verify of every row, in one process), per 1,000,000 rows; the
  in-memory part (no database) is shown apart. The history spans twelve month partitions (sql/0014).
- verify_audit: the DAG's check (certsync.audit.selfcheck.after_run) in full over the same history,
  then incremental after one more run's --run-rows rows appended by the writer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from certsync.audit import checkpoints, encoding, writer
from certsync.audit.rows import db_rows
from certsync.audit.selfcheck import after_run
from certsync.audit.signing import AuditSigner, SigningKey
from certsync.audit.verify import verify_rows
from certsync_lab.postgres import EmbeddedPostgres
from certsync_lab.stack import certsync_database

AT = datetime(2025, 6, 1, tzinfo=UTC)
SPAN = timedelta(days=360)  # the loaded history is spread over twelve months


def _fields(n: int, run_id: int) -> dict:
    """Row n of a history of Set-* requests: an intent (even n) and its outcome (odd n)."""
    pair = n // 2
    return {
        "run_id": run_id,
        "dag_id": "certsync",
        "airflow_run_id": "scheduled__2026-06-01T00:00:00+00:00",
        "object_guid": uuid.UUID(int=pair + 1),
        "recipient_id": f"3f2b{pair:028x}",
        "primary_smtp": f"user{pair}@example.test",
        "cmdlet": "Set-Mailbox",
        "action": "replace",
        "user_certificate": [bytes([n % 256]) * 32, bytes([(n + 1) % 256]) * 32],
        "user_smime_certificate": [],
        "attempt": 1,
        "outcome": "accepted" if n % 2 else None,
        "http_status": 200 if n % 2 else None,
        "detail": "ok" if n % 2 else None,
        "client_request_id": uuid.UUID(int=10**9 + pair),
        "phase": "outcome" if n % 2 else "intent",
        "intent_seq": n if n % 2 else None,
        "action_no": n // 2,
        "task_try": 1,
    }


def signed_rows(count: int, key: SigningKey, run_id: int):
    """`count` signed rows as the writer makes them (a key row first), chained in memory, their
    times spread evenly over SPAN from AT."""
    prev, step = b"", SPAN / count
    for seq in range(1, count + 1):
        fields = {"run_id": run_id, "dag_id": "certsync", "airflow_run_id": "bench", "task_try": 1,
                  "phase": "key", "public_key": key.public_raw} if seq == 1 else _fields(seq, run_id)  # fmt: skip
        row = {name: fields.get(name) for name in encoding.COLUMNS}
        row.update(seq=seq, at=AT + step * seq, prev_hash=prev, key_id=key.key_id)
        digest = encoding.row_hash(row)
        row.update(row_hash=digest, signature=key.sign(encoding.signed_message(digest)))
        prev = digest
        yield row


def bench_sign(count: int, key: SigningKey) -> float:
    start = time.perf_counter()
    for _row in signed_rows(count, key, 1):
        pass
    return time.perf_counter() - start


def load(engine: sa.Engine, rows, run_id: int) -> int:
    """Bulk-load signed rows with COPY (the bench's history; the writer appends one by one)."""
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        raw = conn.connection.driver_connection
        n = 0
        with (
            raw.cursor() as cur,
            cur.copy(f"COPY certsync.audit_log ({', '.join(encoding.COLUMNS)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row([row[c] for c in encoding.COLUMNS])
                n += 1
    return n


def bench_append(engine: sa.Engine, key: SigningKey, run_id: int, count: int) -> float:
    signing = engine.execution_options(**{writer.SIGNER_OPTION: AuditSigner(key=key)})
    start = time.perf_counter()
    for n in range(count // 2):
        with signing.begin() as conn:  # one Set-*: intent and outcome, each committed
            intent = writer.append(conn, {**_fields(2 * n, run_id)})
        with signing.begin() as conn:
            writer.append(conn, {**_fields(2 * n + 1, run_id), "intent_seq": intent})
    return time.perf_counter() - start


def make_partitions(engine: sa.Engine) -> None:
    """The month partitions of the loaded history (the owner's function, as a run's begin calls it)."""
    with engine.begin() as conn:
        for month in range(13):
            first = (AT.replace(day=15) + timedelta(days=30.5 * month)).date()
            conn.execute(sa.text("SELECT certsync.audit_log_ensure_partition(:m)"), {"m": first})


def bench_verify_audit(engine: sa.Engine, key: SigningKey, run_id: int, run_rows: int, head: sa.Row) -> None:
    """verify_audit as the DAG runs it: full, then incremental after one more run."""
    signer = AuditSigner(key=key)
    with tempfile.TemporaryDirectory() as directory:
        checkpoints.append(
            Path(directory), checkpoints.sign(seq=head[0], head=bytes(head[1]), at=AT, key=key)
        )
        start = time.perf_counter()
        full = after_run(engine, signer=signer, directory=Path(directory), full=True)
        full_s = time.perf_counter() - start
        print(f"verify_audit full: {full.rows} rows in {full_s:.1f}s")
        bench_append(engine, key, run_id, run_rows)
        with engine.connect() as conn:
            now = conn.execute(
                sa.text("SELECT seq, row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
            ).one()
        checkpoints.append(Path(directory), checkpoints.sign(seq=now[0], head=bytes(now[1]), at=AT, key=key))
        start = time.perf_counter()
        incremental = after_run(engine, signer=signer, directory=Path(directory))
        inc_s = time.perf_counter() - start
        assert incremental.resumed is not None and incremental.intact
        print(
            f"verify_audit incremental: {incremental.rows} new rows after a history of {full.rows} in {inc_s:.2f}s"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sign", type=int, default=100_000, help="rows signed in memory")
    parser.add_argument("--append", type=int, default=10_000, help="rows appended through PostgreSQL")
    parser.add_argument("--verify", type=int, default=1_000_000, help="rows verified from PostgreSQL")
    parser.add_argument("--run-rows", type=int, default=2_000, help="rows one run adds (incremental verify)")
    args = parser.parse_args(argv)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    key = SigningKey.generate()
    seconds = bench_sign(args.sign, key)
    print(
        f"sign in memory: {args.sign} rows in {seconds:.1f}s = {seconds * 100_000 / args.sign:.1f}s per 100,000 rows"
    )
    with tempfile.TemporaryDirectory() as home, EmbeddedPostgres(data_dir=Path(home) / "data") as pg:
        certsync_database(pg, "bench")
        engine = sa.create_engine(pg.dsn_for("bench").replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            run_id = conn.execute(sa.text(
                "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
                " VALUES ('certsync', 'bench', now(), 'full', false) RETURNING run_id")).scalar_one()  # fmt: skip
        seconds = bench_append(engine, key, run_id, args.append)
        print(f"append through PostgreSQL: {args.append} rows in {seconds:.1f}s ="
              f" {seconds * 100_000 / args.append:.1f}s per 100,000 rows")  # fmt: skip
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
            conn.execute(sa.text("DELETE FROM certsync.audit_log"))
        make_partitions(engine)
        start = time.perf_counter()
        load(engine, signed_rows(args.verify, key, run_id), run_id)
        print(f"history of {args.verify} rows made and loaded in {time.perf_counter() - start:.0f}s")
        with engine.connect() as conn:
            head = conn.execute(
                sa.text(
                    "SELECT max(seq), (SELECT row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1) FROM certsync.audit_log"
                )
            ).one()
            checkpoint = checkpoints.sign(seq=head[0], head=bytes(head[1]), at=AT, key=key)
            keys = {key.key_id: key.private.public_key()}
            start = time.perf_counter()
            sum(1 for _row in db_rows(conn))  # reading alone
            read_s = time.perf_counter() - start
            conn.rollback()
            start = time.perf_counter()
            report = verify_rows(db_rows(conn), public_keys=keys, checkpoints=[checkpoint])
            total_s = time.perf_counter() - start
        assert report.intact, report.problems[:3]
        per = 1_000_000 / args.verify
        print(f"verify from PostgreSQL: {report.rows} rows in {total_s:.1f}s (reading {read_s:.1f}s)"
              f" = {total_s * per:.0f}s per 1,000,000 rows ({(total_s - read_s) * per:.0f}s of it hashing and"
              " signature checks)")  # fmt: skip
        bench_verify_audit(engine, key, run_id, args.run_rows, head)
        engine.dispose()
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
