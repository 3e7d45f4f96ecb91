"""Publish-side persistence: the actions of a batch, the audit log, and the published state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.exchange.client import Outcome
from certsync.store.db import hash_list
from certsync.store.runs import RunInfo


@dataclass(frozen=True, kw_only=True)
class PendingAction:
    action_no: int
    object_guid: uuid.UUID
    recipient_id: str
    primary_smtp: str
    cmdlet: str
    kind: str
    user_certificate: tuple[bytes, ...]  # sha256 of each value, newest first
    user_smime_certificate: tuple[bytes, ...]


def pending_actions(conn: Connection, *, run_id: int, batch: int) -> list[PendingAction]:
    rows = conn.execute(
        sa.text(
            "SELECT action_no, object_guid, recipient_id, primary_smtp, cmdlet, kind, user_certificate,"
            " user_smime_certificate FROM certsync.planned_action"
            " WHERE run_id = :r AND batch = :b AND state = 'pending' ORDER BY action_no"
        ),
        {"r": run_id, "b": batch},
    )
    return [
        PendingAction(
            **{
                **r._mapping,
                "user_certificate": hash_list(r.user_certificate),
                "user_smime_certificate": hash_list(r.user_smime_certificate),
            }
        )
        for r in rows
    ]


def values_by_hash(conn: Connection, hashes: list[bytes]) -> dict[bytes, bytes]:
    rows = conn.execute(
        sa.text("SELECT sha256, value FROM certsync.cert_blob WHERE sha256 = ANY(:h)"), {"h": hashes}
    )
    return {bytes(r.sha256): bytes(r.value) for r in rows}


def newer_view_published(conn: Connection, *, run: RunInfo, recipient_id: str) -> bool:
    """True when a run with a later logical date already published this recipient, or planned from
    a newer view of everything (whatever became of its publishing): an older run (a late backfill, a
    cleared task of a run before it) must not overwrite that newer view."""
    return bool(
        conn.execute(
            sa.text(
                "SELECT 1 FROM certsync.published_state WHERE recipient_id = :id AND logical_date > :d"
                " UNION ALL SELECT 1 FROM certsync.sync_run WHERE planned_at IS NOT NULL AND NOT dry_run"
                " AND logical_date > :d AND run_id <> :run_id LIMIT 1"
            ),
            {"id": recipient_id, "d": run.logical_date, "run_id": run.run_id},
        ).first()
    )


def attempts_so_far(conn: Connection, *, run_id: int, recipient_id: str) -> int:
    """Attempts this run already made for this recipient (a retried task continues the count)."""
    return conn.execute(
        sa.text("SELECT count(*) FROM certsync.audit_log WHERE run_id = :r AND recipient_id = :id"),
        {"r": run_id, "id": recipient_id},
    ).scalar_one()


def record_attempt(
    conn: Connection, *, run: RunInfo, action: PendingAction, attempt: int, outcome: Outcome
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO certsync.audit_log (run_id, dag_id, airflow_run_id, object_guid, recipient_id,"
            " primary_smtp, cmdlet, action, user_certificate, user_smime_certificate, attempt, outcome,"
            " http_status, error_code, detail, client_request_id, seq, prev_hash, row_hash)"
            " VALUES (:run_id, :dag_id, :airflow_run_id, :object_guid, :recipient_id, :primary_smtp,"
            " :cmdlet, :action, :uc, :us, :attempt, :outcome, :status, :code, :detail, :crid,"
            " 0, '', '')"  # seq and hashes are set by the chaining trigger
        ),
        {
            "run_id": run.run_id,
            "dag_id": run.dag_id,
            "airflow_run_id": run.airflow_run_id,
            "object_guid": action.object_guid,
            "recipient_id": action.recipient_id,
            "primary_smtp": action.primary_smtp,
            "cmdlet": action.cmdlet,
            "action": action.kind,
            "uc": list(action.user_certificate),
            "us": list(action.user_smime_certificate),
            "attempt": attempt,
            "outcome": "failed" if outcome.kind == "retry" else outcome.kind,
            "status": outcome.status,
            "code": outcome.code,
            "detail": (outcome.detail or "")[:2000] or None,
            "crid": outcome.client_request_id,
        },
    )


def mark_published(conn: Connection, *, run: RunInfo, action: PendingAction) -> None:
    """Exchange accepted: record what it now holds, so a re-planned run finds nothing left to do,
    and move the published state, but never back to an older run's view."""
    values = {
        "id": action.recipient_id,
        "guid": action.object_guid,
        "uc": list(action.user_certificate),
        "us": list(action.user_smime_certificate),
        "run_id": run.run_id,
        "d": run.logical_date,
    }
    conn.execute(
        sa.text(
            "UPDATE certsync.exo_recipient SET user_certificate = :uc, user_smime_certificate = :us"
            " WHERE recipient_id = :id"
        ),
        values,
    )
    conn.execute(
        sa.text(
            "INSERT INTO certsync.published_state AS p (recipient_id, object_guid, user_certificate,"
            " user_smime_certificate, run_id, logical_date, published_at)"
            " VALUES (:id, :guid, :uc, :us, :run_id, :d, now())"
            " ON CONFLICT (recipient_id) DO UPDATE SET object_guid = EXCLUDED.object_guid,"
            " user_certificate = EXCLUDED.user_certificate,"
            " user_smime_certificate = EXCLUDED.user_smime_certificate, run_id = EXCLUDED.run_id,"
            " logical_date = EXCLUDED.logical_date, published_at = EXCLUDED.published_at"
            " WHERE p.logical_date <= EXCLUDED.logical_date"
        ),
        values,
    )


def set_action_state(
    conn: Connection, *, run_id: int, action_no: int, state: str, reason: str | None = None
) -> None:
    conn.execute(
        sa.text(
            "UPDATE certsync.planned_action SET state = :s, reason = coalesce(:reason, reason)"
            " WHERE run_id = :r AND action_no = :n"
        ),
        {"s": state, "reason": reason, "r": run_id, "n": action_no},
    )
