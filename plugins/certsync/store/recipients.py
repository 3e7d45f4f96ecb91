"""Each run's snapshot of Exchange Online: which read to make (full or delta) and how its result
becomes the run's snapshot (sql/0017)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.exchange.changes import ReadPlan, RecipientRead
from certsync.store import planning
from certsync.store.db import copy_rows

# The latest earlier read whose snapshot is still there (retention and purge_old_snapshots delete
# snapshots, never the read records).
LAST_READ = """
SELECT r.run_id, r.tenant, r.newest_change, r.full_run_id, r.full_read_at
FROM certsync.exo_read r
WHERE r.run_id < :r AND EXISTS (SELECT FROM certsync.exo_recipient e WHERE e.seen_run_id = r.run_id)
ORDER BY r.run_id DESC LIMIT 1
"""
# Recipients a write since the base snapshot was told do not exist (publisher: "not_found:...").
NOT_FOUND = """
SELECT DISTINCT recipient_id FROM certsync.planned_action
WHERE run_id >= :b AND run_id < :r AND state = 'failed' AND reason LIKE 'not_found:%'
  AND recipient_id IS NOT NULL
ORDER BY 1
"""


@dataclass(frozen=True, kw_only=True)
class Start:
    """The read a run makes, and what a delta starts from."""

    plan: ReadPlan
    tenant: str
    base_run_id: int | None = None
    base_newest: datetime | None = None
    full_run_id: int | None = None
    full_read_at: datetime | None = None


def choose(
    conn: Connection,
    *,
    run_id: int,
    tenant: str,
    full_every: timedelta | None,
    overlap: timedelta,
    now: datetime,
) -> Start:
    """Delta when the run asks for one and an earlier read of the same tenant left a snapshot, a
    newest WhenChanged and a full read recent enough (`full_every`); otherwise full, with why."""
    requested = conn.execute(
        sa.text("SELECT mode FROM certsync.sync_run WHERE run_id = :r"), {"r": run_id}
    ).scalar_one()
    last = conn.execute(sa.text(LAST_READ), {"r": run_id}).first()
    why = None
    if requested != "delta":
        why = "requested"
    elif last is None:
        why = "no earlier read"
    elif last.tenant != tenant:
        why = "another tenant or endpoint"
    elif last.newest_change is None:
        why = "the earlier read had recipients without WhenChanged"
    elif full_every is not None and now - last.full_read_at >= full_every:
        why = f"last full read older than {full_every}"
    if why is not None:
        return Start(plan=ReadPlan(mode="full", why=why), tenant=tenant)
    since = last.newest_change - overlap
    recheck = conn.execute(sa.text(NOT_FOUND), {"b": last.run_id, "r": run_id}).scalars()
    return Start(
        plan=ReadPlan(
            mode="delta", why=f"changed since {since.isoformat()}", since=since, recheck=tuple(recheck)
        ),
        tenant=tenant,
        base_run_id=last.run_id,
        base_newest=last.newest_change,
        full_run_id=last.full_run_id,
        full_read_at=last.full_read_at,
    )


def save(conn: Connection, *, run_id: int, start: Start, read: RecipientRead) -> int:
    """Make the run's snapshot from `read` (whole for a full read, merged into the base's snapshot
    for a delta) and record the read; returns the recipients in the snapshot."""
    if read.mode == "full":
        count = planning.save_recipients(conn, run_id=run_id, recipients=read.recipients)
        newest, full_run_id = read.newest, run_id
        full_read_at = conn.execute(sa.text("SELECT now()")).scalar_one()
    else:
        assert start.base_run_id is not None and start.full_run_id is not None
        count = _merge(conn, run_id=run_id, base_run_id=start.base_run_id, read=read)
        newest = max(filter(None, (start.base_newest, read.newest)), default=None)
        full_run_id, full_read_at = start.full_run_id, start.full_read_at
    _record(
        conn, run_id=run_id, start=start, read=read, count=count,
        newest=None if read.unstamped else newest, full_run_id=full_run_id, full_read_at=full_read_at,
    )  # fmt: skip
    return count


def _merge(conn: Connection, *, run_id: int, base_run_id: int, read: RecipientRead) -> int:
    """The base's snapshot with the recipients read replacing theirs: one INSERT ... SELECT for the
    unchanged ones, one COPY for the changed."""
    ids = [r.recipient_id for r in read.recipients] + sorted(read.gone)
    params = {"r": run_id, "b": base_run_id, "ids": ids}
    conn.execute(sa.text("DELETE FROM certsync.exo_recipient WHERE seen_run_id = :r"), params)
    kept = conn.execute(
        sa.text(
            "INSERT INTO certsync.exo_recipient (recipient_id, primary_smtp, recipient_type, is_dir_synced,"
            " is_cloud_managed, user_certificate, user_smime_certificate, seen_run_id)"
            " SELECT recipient_id, primary_smtp, recipient_type, is_dir_synced, is_cloud_managed,"
            "  user_certificate, user_smime_certificate, :r FROM certsync.exo_recipient"
            " WHERE seen_run_id = :b AND NOT recipient_id = ANY(CAST(:ids AS text[]))"
        ),
        params,
    ).rowcount
    changed = copy_rows(
        conn,
        "COPY certsync.exo_recipient (recipient_id, primary_smtp, recipient_type, is_dir_synced,"
        " is_cloud_managed, user_certificate, user_smime_certificate, seen_run_id) FROM STDIN",
        (
            (r.recipient_id, r.primary_smtp, r.recipient_type, r.is_dir_synced, r.is_cloud_managed,
             list(r.user_certificate), list(r.user_smime_certificate), run_id)
            for r in read.recipients
        ),
    )  # fmt: skip
    return kept + changed


def _record(
    conn: Connection, *, run_id: int, start: Start, read: RecipientRead, count: int,
    newest: datetime | None, full_run_id: int, full_read_at: datetime | None,
) -> None:  # fmt: skip
    conn.execute(
        sa.text(
            "INSERT INTO certsync.exo_read (run_id, mode, why, tenant, base_run_id, changed_since,"
            "  newest_change, full_run_id, full_read_at, read, recipients)"
            " VALUES (:r, :mode, :why, :tenant, :base, :since, :newest, :full, :full_at, :read, :count)"
            " ON CONFLICT (run_id) DO UPDATE SET mode = EXCLUDED.mode, why = EXCLUDED.why,"
            "  tenant = EXCLUDED.tenant, base_run_id = EXCLUDED.base_run_id,"
            "  changed_since = EXCLUDED.changed_since, newest_change = EXCLUDED.newest_change,"
            "  full_run_id = EXCLUDED.full_run_id, full_read_at = EXCLUDED.full_read_at,"
            "  read = EXCLUDED.read, recipients = EXCLUDED.recipients, read_at = now()"
        ),
        {
            "r": run_id,
            "mode": read.mode,
            "why": read.why,
            "tenant": start.tenant,
            "base": start.base_run_id if read.mode == "delta" else None,
            "since": read.since if read.mode == "delta" else None,
            "newest": newest,
            "full": full_run_id,
            "full_at": full_read_at,
            "count": count,
            "read": len(read.recipients),
        },
    )
