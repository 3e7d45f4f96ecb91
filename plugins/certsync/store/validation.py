"""Cached verdicts per distinct value and trust configuration."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.certificates.verdict import Verdict, VerdictRow, verdict_rows
from certsync.store.db import copy_rows

# Values in the source view with no verdict that holds at the run's time for this trust
# configuration. A verdict holds from the time it was made (checked_at) until valid_until; verdicts
# are kept per check time, so a backfill (an older run time) adds its own verdict next to a newer
# run's instead of replacing it, and each run plans with the verdict of its own time.
# A shard is a range of the values' SHA-256 (by first byte), which PostgreSQL estimates from the
# column's statistics: a computed shard key (first byte modulo the shards) it took for 0.5% of the
# values, and looked each up in the verdicts on its own (1.0 s for 190,000 values, 0.25 s hashed).
PENDING = """
SELECT p.attribute, b.value
FROM (SELECT DISTINCT v.attribute, v.sha256
      FROM certsync.source_value v
      WHERE NOT EXISTS (
          SELECT FROM certsync.cert_verdict c
          WHERE c.sha256 = v.sha256 AND c.attribute = v.attribute AND c.trust_fingerprint = %(fp)s
            AND c.checked_at <= %(at)s AND (c.valid_until IS NULL OR %(at)s < c.valid_until))
        AND v.sha256 >= %(low)s {below}) p
JOIN certsync.cert_blob b ON b.sha256 = p.sha256
"""

# Verdicts arrive by COPY straight into cert_verdict. Only a retried try can find a verdict of the
# same value and check time there (its earlier try saved it): then the COPY fails, and the chunk
# goes through a per-transaction table and an upsert instead, so the retry's verdict replaces the
# earlier one. The upsert for every chunk cost a fifth of the stage's database time.
COPY_VERDICTS = """COPY certsync.cert_verdict (sha256, attribute, trust_fingerprint, ok, reason, rule, detail,
    subject, issuer, serial, not_before, not_after, valid_until, emails, checked_run_id, checked_at) FROM STDIN"""

NEW_VERDICTS = """
CREATE TEMPORARY TABLE new_verdict (  -- the columns of certificates.verdict.VerdictRow, in order
    sha256 bytea, attribute text, ok boolean, reason text, rule text, detail text, subject text,
    issuer text, serial text, not_before timestamptz, not_after timestamptz,
    valid_until timestamptz, emails text[]
) ON COMMIT DROP
"""

COPY_NEW = "COPY new_verdict FROM STDIN"

UPSERT = """
INSERT INTO certsync.cert_verdict (sha256, attribute, trust_fingerprint, ok, reason, rule, detail,
    subject, issuer, serial, not_before, not_after, valid_until, emails, checked_run_id, checked_at)
SELECT DISTINCT ON (sha256, attribute) sha256, attribute, :fp, ok, reason, rule, detail, subject,
    issuer, serial, not_before, not_after, valid_until, emails, :run_id, :at
FROM new_verdict
ON CONFLICT (sha256, attribute, trust_fingerprint, checked_at) DO UPDATE SET
    ok = EXCLUDED.ok, reason = EXCLUDED.reason, rule = EXCLUDED.rule, detail = EXCLUDED.detail,
    subject = EXCLUDED.subject, issuer = EXCLUDED.issuer, serial = EXCLUDED.serial,
    not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,
    valid_until = EXCLUDED.valid_until, emails = EXCLUDED.emails,
    checked_run_id = EXCLUDED.checked_run_id, checked_at = EXCLUDED.checked_at
"""


# Values read, checked and saved at a time by the validate stage.
CHUNK = 10_000
# Rows per FETCH and per verdict COPY or upsert. PostgreSQL holds a FETCH's rows whole before it
# sends them, gives each COPY's reference checks (sql/0022) its rows as a transition table, and
# sorts an upsert's: past work_mem (4 MB by default) each goes to temporary files. A 100,000-user
# first run wrote 233 MB of them with a statement per chunk, 8 MB (the pending query's DISTINCT)
# with a statement per 2,000 rows.
STATEMENT_ROWS = 2_000


def pending_chunks(
    conn: Connection, *, fingerprint: str, at: datetime, shard: int, shards: int, size: int = CHUNK
) -> Iterator[list[tuple[str, bytes]]]:
    """(attribute, value) pairs to validate, `size` at a time from a server-side cursor, so memory
    does not grow with the directory; a value is content-addressed, so each comes once. Fetched
    STATEMENT_ROWS at a time."""
    params: dict[str, object] = {"fp": fingerprint, "at": at, "low": bytes([shard * 256 // shards])}
    high, below = (shard + 1) * 256 // shards, ""
    if high < 256:  # the last shard has no upper bound
        params["high"], below = bytes([high]), "AND v.sha256 < %(high)s"
    # The driver's own binary cursor: a certificate travels as its bytes, not hex-encoded by the
    # server and decoded by the client, and as a plain tuple, not a SQLAlchemy row.
    with conn.connection.driver_connection.cursor(name="certsync_pending", binary=True) as rows:
        rows.execute(PENDING.format(below=below), params)
        chunk: list[tuple[str, bytes]] = []
        while page := rows.fetchmany(min(STATEMENT_ROWS, size - len(chunk))):
            chunk += page
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def save_rows(
    conn: Connection, *, rows: Sequence[VerdictRow], fingerprint: str, run_id: int, at: datetime
) -> int:
    """Store verdict rows (from verdict_rows) checked by `run_id` at `at`, STATEMENT_ROWS a
    statement; returns how many."""
    if not rows:
        return 0
    parts = [rows[start : start + STATEMENT_ROWS] for start in range(0, len(rows), STATEMENT_ROWS)]
    try:
        with conn.begin_nested():
            for part in parts:
                copy_rows(
                    conn, COPY_VERDICTS, ((*row[:2], fingerprint, *row[2:], run_id, at) for row in part)
                )
    except psycopg.errors.UniqueViolation:
        conn.execute(sa.text(NEW_VERDICTS))
        for part in parts:  # the upsert sorts its rows (DISTINCT ON): a part at a time, too
            copy_rows(conn, COPY_NEW, part)
            conn.execute(sa.text(UPSERT), {"fp": fingerprint, "run_id": run_id, "at": at})
            conn.execute(sa.text("TRUNCATE new_verdict"))
        conn.execute(sa.text("DROP TABLE new_verdict"))  # another save may follow in this transaction
    return len(rows)


__all__ = ["pending_chunks", "save_rows", "save_verdicts", "verdict_rows"]


def save_verdicts(
    conn: Connection, *, verdicts: Iterable[Verdict], fingerprint: str, run_id: int, at: datetime
) -> int:
    return save_rows(conn, rows=verdict_rows(verdicts), fingerprint=fingerprint, run_id=run_id, at=at)
