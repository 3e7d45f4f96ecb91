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


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Who started a run, how its time was chosen, and which overrides it carries."""

    date_source: str = "logical_date"  # or run_after: a manual run without a logical date
    run_type: str | None = None  # Airflow's run type, or "cli"
    triggered_by: str | None = None  # Airflow's triggering user, or the command line's OS user
    allow_mass_removal: bool = False


def begin_run(
    conn: Connection,
    *,
    dag_id: str,
    airflow_run_id: str,
    logical_date: datetime,
    mode: str,
    dry_run: bool,
    trust_fingerprint: str,
    record: RunRecord | None = None,
) -> int:
    """Register the run; a retried, cleared or resumed run gets its existing id back (and counts
    one more attempt), with the overrides of its latest start."""
    record = record or RunRecord()
    return conn.execute(
        sa.text(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run,"
            " trust_fingerprint, date_source, run_type, triggered_by, allow_mass_removal)"
            " VALUES (:dag_id, :run_id, :d, :mode, :dry, :fp, :src, :rtype, :who, :mass)"
            " ON CONFLICT (dag_id, airflow_run_id) DO UPDATE SET state = 'running', finished_at = NULL,"
            " closed_by_run_id = NULL, attempts = certsync.sync_run.attempts + 1,"
            " trust_fingerprint = EXCLUDED.trust_fingerprint, dry_run = EXCLUDED.dry_run,"
            " allow_mass_removal = EXCLUDED.allow_mass_removal,"
            " triggered_by = coalesce(EXCLUDED.triggered_by, certsync.sync_run.triggered_by) RETURNING run_id"
        ),
        {
            "dag_id": dag_id,
            "run_id": airflow_run_id,
            "d": logical_date,
            "mode": mode,
            "dry": dry_run,
            "fp": trust_fingerprint,
            "src": record.date_source,
            "rtype": record.run_type,
            "who": record.triggered_by,
            "mass": record.allow_mass_removal,
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
            conn,
            "SELECT outcome, count(*) FROM certsync.audit_log WHERE run_id = :r"
            " AND coalesce(phase, '') NOT IN ('intent', 'key') GROUP BY 1",
            run_id,
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


# --- liveness: a stage that works on a run holds a shared lease on it (a session advisory lock, so a
# dead process drops it with its connection); a run that nobody holds and nothing else vouches for
# is abandoned.

_LEASE = "SELECT pg_advisory_lock_shared(hashtext('certsync.run_lease'), CAST(:r AS integer))"
_UNLEASE = "SELECT pg_advisory_unlock_shared(hashtext('certsync.run_lease'), CAST(:r AS integer))"


def take_lease(conn: Connection, run_id: int) -> None:
    """Hold the run's lease on this connection's session until release_lease or the session ends."""
    conn.execute(sa.text(_LEASE), {"r": run_id})
    conn.commit()


def release_lease(conn: Connection, run_id: int) -> None:
    conn.execute(sa.text(_UNLEASE), {"r": run_id})
    conn.commit()


def leased(conn: Connection, run_id: int) -> bool:
    """Whether some live session holds the run's lease (probed without waiting)."""
    free = conn.execute(
        sa.text("SELECT pg_try_advisory_lock(hashtext('certsync.run_lease'), CAST(:r AS integer))"),
        {"r": run_id},
    ).scalar_one()
    if free:
        conn.execute(
            sa.text("SELECT pg_advisory_unlock(hashtext('certsync.run_lease'), CAST(:r AS integer))"),
            {"r": run_id},
        )
    return not free


@dataclass(frozen=True, kw_only=True)
class OpenRun:
    run_id: int
    dag_id: str
    airflow_run_id: str


def open_runs(conn: Connection, *, dag_id: str | None = None) -> list[OpenRun]:
    """Runs still marked running (of one DAG, or all), oldest first."""
    rows = conn.execute(
        sa.text(
            "SELECT run_id, dag_id, airflow_run_id FROM certsync.sync_run WHERE state = 'running'"
            " AND (CAST(:dag AS text) IS NULL OR dag_id = :dag) ORDER BY run_id"
        ),
        {"dag": dag_id},
    )
    return [OpenRun(**row._mapping) for row in rows]


def close_abandoned(conn: Connection, *, run_id: int) -> bool:
    """Close a run whose process died as `abandoned`, with the summary of what it got done;
    False when it was no longer running (someone else closed or resumed it)."""
    summary = summarize(conn, run_id)
    closed = conn.execute(
        sa.text(
            "UPDATE certsync.sync_run SET state = 'abandoned', finished_at = now(),"
            " summary = CAST(:summary AS jsonb) WHERE run_id = :r AND state = 'running'"
        ),
        {"r": run_id, "summary": json.dumps(summary)},
    )
    return closed.rowcount == 1


def note_closed_by(conn: Connection, *, run_ids: list[int], closed_by: int) -> None:
    """Which run found and closed these abandoned ones."""
    conn.execute(
        sa.text("UPDATE certsync.sync_run SET closed_by_run_id = :by WHERE run_id = ANY(:ids)"),
        {"by": closed_by, "ids": run_ids},
    )


def run_record(conn: Connection, run_id: int) -> dict[str, Any]:
    """The run's record as the summary shows it: overrides, trigger, time source, attempts."""
    row = conn.execute(
        sa.text(
            "SELECT dry_run, allow_mass_removal, run_type, triggered_by, date_source, attempts,"
            " planned_at IS NOT NULL AS planned, carried_at IS NOT NULL AS carried"
            " FROM certsync.sync_run WHERE run_id = :r"
        ),
        {"r": run_id},
    ).one()
    return dict(row._mapping)


def failed_by_reason(conn: Connection, run_id: int) -> dict[str, int]:
    """The run's failed actions per reason (the last outcome's error code, or out_of_attempts)."""
    return _counts(
        conn,
        "SELECT coalesce(reason, 'unknown'), count(*) FROM certsync.planned_action"
        " WHERE run_id = :r AND state = 'failed' GROUP BY 1 ORDER BY 2 DESC",
        run_id,
    )


NEWER_RUN = """
SELECT run_id FROM certsync.sync_run
WHERE logical_date > :d AND run_id <> :r AND NOT dry_run AND planned_at IS NOT NULL
UNION ALL
SELECT run_id FROM certsync.published_state WHERE logical_date > :d
LIMIT 1
"""


def supersede_if_older(conn: Connection, run: RunInfo) -> int | None:
    """Mark the run superseded when a run with a later logical date already planned or published,
    and return that run's id (None when this run is still the newest view). Called under the run
    lock, so no newer run can plan between the check and the stage's writes."""
    newer = conn.execute(sa.text(NEWER_RUN), {"d": run.logical_date, "r": run.run_id}).scalar()
    if newer is None:
        return None
    conn.execute(
        sa.text(
            "UPDATE certsync.sync_run SET state = 'superseded',"
            " summary = coalesce(summary, '{}'::jsonb) || jsonb_build_object('superseded_by', :n)"
            " WHERE run_id = :r AND state <> 'superseded'"
        ),
        {"n": newer, "r": run.run_id},
    )
    return int(newer)


def is_superseded(conn: Connection, run_id: int) -> bool:
    state = conn.execute(sa.text("SELECT state FROM certsync.sync_run WHERE run_id = :r"), {"r": run_id})
    return state.scalar_one() == "superseded"


def superseded_by(conn: Connection, run_id: int) -> int | None:
    """The newer run that superseded this one, as recorded when it was marked."""
    found = conn.execute(
        sa.text("SELECT (summary ->> 'superseded_by')::bigint FROM certsync.sync_run WHERE run_id = :r"),
        {"r": run_id},
    )
    return found.scalar()
