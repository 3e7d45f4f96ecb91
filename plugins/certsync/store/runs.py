"""Sync runs: registration (idempotent per DAG run), completion, and the run summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    run_id: int
    dag_id: str
    airflow_run_id: str
    logical_date: datetime
    dry_run: bool
    trust_fingerprint: str


def begin_run(
    conn: Connection,
    *,
    dag_id: str,
    airflow_run_id: str,
    logical_date: datetime,
    mode: str,
    dry_run: bool,
    trust_fingerprint: str,
) -> int:
    """Register the run; a retried or cleared run gets its existing id back."""
    return conn.execute(
        sa.text(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run,"
            " trust_fingerprint) VALUES (:dag_id, :run_id, :d, :mode, :dry, :fp)"
            " ON CONFLICT (dag_id, airflow_run_id) DO UPDATE SET state = 'running', finished_at = NULL,"
            " trust_fingerprint = EXCLUDED.trust_fingerprint, dry_run = EXCLUDED.dry_run RETURNING run_id"
        ),
        {
            "dag_id": dag_id,
            "run_id": airflow_run_id,
            "d": logical_date,
            "mode": mode,
            "dry": dry_run,
            "fp": trust_fingerprint,
        },
    ).scalar_one()


def run_info(conn: Connection, run_id: int) -> RunInfo:
    row = conn.execute(
        sa.text(
            "SELECT run_id, dag_id, airflow_run_id, logical_date, dry_run, trust_fingerprint FROM certsync.sync_run"
            " WHERE run_id = :r"
        ),
        {"r": run_id},
    ).one()
    return RunInfo(**row._mapping)


def _counts(conn: Connection, sql: str, run_id: int) -> dict[str, int]:
    return {str(k): int(v) for k, v in conn.execute(sa.text(sql), {"r": run_id})}


def summarize(conn: Connection, run_id: int) -> dict[str, Any]:
    """Counts per outcome and reason, from the run's own rows (so a re-run summary is the same)."""
    return {
        "users": conn.execute(
            sa.text("SELECT count(*) FROM certsync.staging_user WHERE run_id = :r"), {"r": run_id}
        ).scalar_one(),
        "directory_entries_skipped": conn.execute(
            sa.text("SELECT count(*) FROM certsync.staging_rejected WHERE run_id = :r"), {"r": run_id}
        ).scalar_one(),
        "values": _counts(
            conn,
            "SELECT CASE WHEN selected THEN 'selected' ELSE 'refused' END, count(*)"
            " FROM certsync.value_result WHERE run_id = :r GROUP BY 1",
            run_id,
        ),
        "refused_by_reason": _counts(
            conn,
            "SELECT reason, count(*) FROM certsync.value_result WHERE run_id = :r AND NOT selected"
            " GROUP BY 1 ORDER BY 2 DESC",
            run_id,
        ),
        "actions": _counts(
            conn,
            "SELECT kind || ':' || state, count(*) FROM certsync.planned_action WHERE run_id = :r GROUP BY 1",
            run_id,
        ),
        "not_published_by_reason": _counts(
            conn,
            "SELECT coalesce(reason, state), count(*) FROM certsync.planned_action"
            " WHERE run_id = :r AND state <> 'published' GROUP BY 1",
            run_id,
        ),
        "publish_attempts": _counts(
            conn, "SELECT outcome, count(*) FROM certsync.audit_log WHERE run_id = :r GROUP BY 1", run_id
        ),
    }


def finish_run(conn: Connection, *, run_id: int, state: str, summary: dict[str, Any]) -> None:
    conn.execute(
        sa.text(
            "UPDATE certsync.sync_run SET state = :s, finished_at = now(), summary = CAST(:summary AS jsonb)"
            " WHERE run_id = :r"
        ),
        {"s": state, "summary": json.dumps(summary), "r": run_id},
    )
