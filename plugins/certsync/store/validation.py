"""Cached verdicts per distinct value and trust configuration."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.certificates.verdict import Verdict

# Values in the source view with no verdict that holds at the run's time for this trust
# configuration. A verdict holds from the time it was made (checked_at) until valid_until; verdicts
# are kept per check time, so a backfill (an older run time) adds its own verdict next to a newer
# run's instead of replacing it, and each run plans with the verdict of its own time.
PENDING = """
SELECT p.attribute, b.value
FROM (SELECT DISTINCT v.attribute, v.sha256
      FROM certsync.source_value v
      WHERE NOT EXISTS (
          SELECT FROM certsync.cert_verdict c
          WHERE c.sha256 = v.sha256 AND c.attribute = v.attribute AND c.trust_fingerprint = :fp
            AND c.checked_at <= :at AND (c.valid_until IS NULL OR :at < c.valid_until))
        AND get_byte(v.sha256, 0) % :shards = :shard) p
JOIN certsync.cert_blob b ON b.sha256 = p.sha256
"""

UPSERT = """
INSERT INTO certsync.cert_verdict (sha256, attribute, trust_fingerprint, ok, reason, rule, detail,
    subject, issuer, serial, not_before, not_after, valid_until, emails, checked_run_id, checked_at)
VALUES (:sha256, :attribute, :fp, :ok, :reason, :rule, :detail, :subject, :issuer, :serial,
    :not_before, :not_after, :valid_until, :emails, :run_id, :at)
ON CONFLICT (sha256, attribute, trust_fingerprint, checked_at) DO UPDATE SET
    ok = EXCLUDED.ok, reason = EXCLUDED.reason, rule = EXCLUDED.rule, detail = EXCLUDED.detail,
    subject = EXCLUDED.subject, issuer = EXCLUDED.issuer, serial = EXCLUDED.serial,
    not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,
    valid_until = EXCLUDED.valid_until, emails = EXCLUDED.emails,
    checked_run_id = EXCLUDED.checked_run_id, checked_at = EXCLUDED.checked_at
"""


def pending_chunks(
    conn: Connection, *, fingerprint: str, at: datetime, shard: int, shards: int, size: int = 10_000
) -> Iterator[list[tuple[str, bytes]]]:
    """(attribute, value) pairs to validate, `size` at a time from a server-side cursor, so memory
    does not grow with the directory; a value is content-addressed, so each comes once."""
    rows = conn.execute(
        sa.text(PENDING),
        {"fp": fingerprint, "at": at, "shard": shard, "shards": shards},
        execution_options={"yield_per": size},
    )
    for part in rows.partitions(size):
        yield [(r.attribute, bytes(r.value)) for r in part]


def save_verdicts(
    conn: Connection, *, verdicts: Iterable[Verdict], fingerprint: str, run_id: int, at: datetime
) -> int:
    params: Sequence[dict] = [
        {
            "sha256": v.sha256,
            "attribute": v.attribute,
            "fp": fingerprint,
            "ok": v.ok,
            "reason": None if v.ok else v.reason,
            "rule": v.rule,
            "detail": v.detail,
            "subject": v.subject,
            "issuer": v.issuer,
            "serial": v.serial,
            "not_before": v.not_before,
            "not_after": v.not_after,
            "valid_until": v.valid_until,
            "emails": list(v.emails),
            "run_id": run_id,
            "at": at,
        }
        for v in verdicts
    ]
    if params:
        conn.execute(sa.text(UPSERT), params)
    return len(params)
