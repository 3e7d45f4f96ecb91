"""Retention of the per-run working tables: what a run staged, decided and planned is kept for
`retention_days` (certsync_config, default 90; 0 keeps everything), then deleted.

Kept regardless: the audit log (signed, the evidence), the run records (sync_run with its summary),
the persistent source view, certificate blobs and verdicts, the published state and the newest run's
snapshot and plan. Runs still open are never pruned. After pruning, the auditors' views still answer
from the audit log (timelines, certificate history, run outcomes); refusals and value verdicts of a
pruned run are gone with its working rows.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

# Per-run working tables, each keyed by its run column.
WORKING_TABLES = (
    ("staging_value", "run_id"),
    ("staging_user", "run_id"),
    ("staging_rejected", "run_id"),
    ("staging_gone", "run_id"),
    ("value_result", "run_id"),
    ("planned_action", "run_id"),
    ("exo_recipient", "seen_run_id"),
)


def prunable_runs(conn: Connection, *, keep_days: int, now: datetime) -> list[int]:
    """Closed runs that started before the cut, except the newest closed run."""
    return list(
        conn.execute(
            sa.text(
                "SELECT run_id FROM certsync.sync_run WHERE state <> 'running' AND started_at < :cut"
                " AND run_id < (SELECT max(run_id) FROM certsync.sync_run WHERE state <> 'running')"
                " ORDER BY run_id"
            ),
            {"cut": now - timedelta(days=keep_days)},
        ).scalars()
    )


def prune(conn: Connection, *, keep_days: int, now: datetime) -> dict[str, int]:
    """Delete the working rows of runs older than `keep_days`; returns rows deleted per table."""
    if keep_days <= 0:
        return {}
    runs = prunable_runs(conn, keep_days=keep_days, now=now)
    if not runs:
        return {}
    existing = set(
        conn.execute(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'certsync'")
        ).scalars()
    )
    deleted = {}
    for table, column in WORKING_TABLES:
        if table in existing:  # a schema from before a table's migration lacks it
            deleted[table] = conn.execute(
                sa.text(f"DELETE FROM certsync.{table} WHERE {column} = ANY(:runs)"),  # noqa: S608 - fixed names
                {"runs": runs},
            ).rowcount
    log.info(
        "retention: working rows of %d runs older than %d days deleted: %s", len(runs), keep_days, deleted
    )
    return deleted
