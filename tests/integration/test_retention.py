"""Retention: the working rows of old closed runs are deleted by policy; open runs, the newest closed
run, recent runs and everything auditors need (run records, audit log) stay."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from certsync.store import retention
from certsync_lab.stack import certsync_database

DATABASE = "retention"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _run(conn: sa.Connection, name: str, *, days_ago: int, state: str) -> int:
    run_id = conn.execute(
        sa.text(
            "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run, started_at, state)"
            " VALUES ('certsync', :n, :t, 'full', false, :t, :s) RETURNING run_id"
        ),
        {"n": name, "t": NOW - timedelta(days=days_ago), "s": state},
    ).scalar_one()
    guid = uuid.uuid4()
    conn.execute(
        sa.text(
            "INSERT INTO certsync.staging_user (run_id, object_guid, dn, sam_account_name, user_account_control,"
            " usn_changed) VALUES (:r, :g, 'CN=x', 'x', 512, 1)"
        ),
        {"r": run_id, "g": guid},
    )
    conn.execute(
        sa.text(
            "INSERT INTO certsync.planned_action (run_id, action_no, object_guid, kind) VALUES (:r, 1, :g, 'add')"
        ),
        {"r": run_id, "g": guid},
    )
    return run_id


def test_old_closed_runs_lose_their_working_rows_and_nothing_else(embedded_pg) -> None:
    certsync_database(embedded_pg, DATABASE)
    app = sa.create_engine(f"postgresql+psycopg://certsync_app@127.0.0.1:{embedded_pg.port}/{DATABASE}")
    with app.begin() as conn:
        old = _run(conn, "old", days_ago=200, state="succeeded")
        old_open = _run(conn, "old-open", days_ago=150, state="running")
        recent = _run(conn, "recent", days_ago=10, state="failed")
        newest_closed = _run(conn, "newest", days_ago=120, state="succeeded")  # newest by run id
        deleted = retention.prune(conn, keep_days=90, now=NOW)
        left = dict(
            conn.execute(sa.text("SELECT run_id, count(*) FROM certsync.staging_user GROUP BY run_id")).all()
        )
        runs = conn.execute(sa.text("SELECT count(*) FROM certsync.sync_run")).scalar()
        assert retention.prune(conn, keep_days=0, now=NOW) == {}
    app.dispose()
    assert deleted["staging_user"] == 1 and deleted["planned_action"] == 1
    assert set(left) == {old_open, recent, newest_closed} and old not in left
    assert runs == 4
