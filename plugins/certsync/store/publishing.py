"""Publish-side persistence: the actions of a batch, the audit log, and the published state."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.audit import writer
from certsync.exchange.outcomes import Outcome
from certsync.store.db import execute_or_hold, hash_list
from certsync.store.runs import RunInfo

# The name under which the audit log refuses a second closing row for one intent (sql/0031).
INTENT_CLOSED_ONCE = "audit_log_closed_once"


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


def newer_views(conn: Connection, *, run: RunInfo, recipient_ids: list[str]) -> set[str]:
    """The recipients (of those given) that an older run must not overwrite: a run with a later
    logical date already published them, or planned from a newer view of everything (whatever became
    of its publishing; then all of them). A late backfill or a cleared task of an earlier run must
    not overwrite that newer view."""
    newer_run = conn.execute(
        sa.text(
            "SELECT 1 FROM certsync.sync_run WHERE planned_at IS NOT NULL AND NOT dry_run"
            " AND logical_date > :d AND run_id <> :run_id LIMIT 1"
        ),
        {"d": run.logical_date, "run_id": run.run_id},
    ).first()
    if newer_run:
        return set(recipient_ids)
    rows = conn.execute(
        sa.text(
            "SELECT recipient_id FROM certsync.published_state"
            " WHERE recipient_id = ANY(:ids) AND logical_date > :d"
        ),
        {"ids": recipient_ids, "d": run.logical_date},
    )
    return {r.recipient_id for r in rows}


def attempts_so_far(conn: Connection, *, run_id: int, recipient_ids: list[str]) -> dict[str, int]:
    """Requests this run already sent (or meant to send) each recipient: a retried task continues
    the count. Rows from before write-ahead auditing count one each, intents count one each."""
    rows = conn.execute(
        sa.text(
            "SELECT recipient_id, count(*) AS n FROM certsync.audit_log"
            " WHERE run_id = :r AND recipient_id = ANY(:ids) AND (phase IS NULL OR phase = 'intent')"
            " GROUP BY recipient_id"
        ),
        {"r": run_id, "ids": recipient_ids},
    )
    return {r.recipient_id: int(r.n) for r in rows}


# The values dicts below name a few columns by shorter keys.
_COLUMN_OF = {
    "uc": "user_certificate",
    "us": "user_smime_certificate",
    "status": "http_status",
    "code": "error_code",
    "crid": "client_request_id",
    "settled_by": "settled_by_run_id",
}


@dataclass(frozen=True, kw_only=True)
class Intent:
    """An intent row: what one Set-* request was about to send, to whom, for which run and try."""

    seq: int
    run_id: int
    dag_id: str
    airflow_run_id: str
    logical_date: datetime
    action_no: int
    object_guid: uuid.UUID
    recipient_id: str
    primary_smtp: str
    cmdlet: str
    action: str
    user_certificate: tuple[bytes, ...]
    user_smime_certificate: tuple[bytes, ...]
    attempt: int
    client_request_id: uuid.UUID
    task_try: int
    batch: int | None  # of its planned action, when that row still exists
    age_s: float  # seconds since the intent committed, by the database's clock


def _insert(conn: Connection, values: dict) -> int:
    """Append a signed row (seq, time and chain columns are the writer's, see certsync.audit.writer)."""
    return writer.append(conn, {_COLUMN_OF.get(k, k): v for k, v in values.items()})


def record_intent(
    conn: Connection,
    *,
    run: RunInfo,
    action: PendingAction,
    attempt: int,
    task_try: int,
    request_id: uuid.UUID,
) -> Intent:
    """Write (the caller commits) the intent of one request before it is sent."""
    values = {
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
        "outcome": None,
        "status": None,
        "code": None,
        "detail": None,
        "crid": request_id,
        "phase": "intent",
        "intent_seq": None,
        "action_no": action.action_no,
        "task_try": task_try,
        "settled_by": None,
    }
    seq = _insert(conn, values)
    return Intent(
        seq=seq,
        run_id=run.run_id,
        dag_id=run.dag_id,
        airflow_run_id=run.airflow_run_id,
        logical_date=run.logical_date,
        action_no=action.action_no,
        object_guid=action.object_guid,
        recipient_id=action.recipient_id,
        primary_smtp=action.primary_smtp,
        cmdlet=action.cmdlet,
        action=action.kind,
        user_certificate=action.user_certificate,
        user_smime_certificate=action.user_smime_certificate,
        attempt=attempt,
        client_request_id=request_id,
        task_try=task_try,
        batch=None,
        age_s=0.0,
    )


def _closing_values(intent: Intent, *, task_try: int) -> dict:
    return {
        "run_id": intent.run_id,
        "dag_id": intent.dag_id,
        "airflow_run_id": intent.airflow_run_id,
        "object_guid": intent.object_guid,
        "recipient_id": intent.recipient_id,
        "primary_smtp": intent.primary_smtp,
        "cmdlet": intent.cmdlet,
        "action": intent.action,
        "uc": list(intent.user_certificate),
        "us": list(intent.user_smime_certificate),
        "attempt": intent.attempt,
        "crid": intent.client_request_id,
        "intent_seq": intent.seq,
        "action_no": intent.action_no,
        "task_try": task_try,
        "settled_by": None,
    }


def record_outcome(conn: Connection, *, intent: Intent, outcome: Outcome, task_try: int) -> None:
    """Close an intent with Exchange's answer: accepted, conflict, rejected (a final refusal) or failed
    (retryable); the detail names the kind of answer and carries Exchange's warnings."""
    _insert(
        conn,
        {
            **_closing_values(intent, task_try=task_try),
            "phase": "outcome",
            "outcome": outcome.audit_outcome,
            "status": outcome.status,
            "code": outcome.code,
            "detail": outcome.audit_detail,
        },
    )


def closed_meanwhile(exc: sa.exc.IntegrityError) -> bool:
    """Whether `exc` is the audit log refusing a second closing row for an intent (sql/0031's
    audit_pairing): another task settled it after this one listed it open."""
    orig = exc.orig
    return (
        isinstance(orig, psycopg.errors.UniqueViolation) and orig.diag.constraint_name == INTENT_CLOSED_ONCE
    )


def record_settlement(
    conn: Connection,
    *,
    intent: Intent,
    applied: bool,
    by_run_id: int,
    task_try: int,
    detail: str,
    status: int | None = None,
    code: str | None = None,
) -> None:
    """Close an intent whose answer was lost, with what reading the recipient back showed."""
    _insert(
        conn,
        {
            **_closing_values(intent, task_try=task_try),
            "phase": "settlement",
            "outcome": "applied" if applied else "not_applied",
            "status": status,
            "code": code,
            "detail": detail[:2000],
            "settled_by": by_run_id,
        },
    )


OPEN_INTENTS = """
SELECT i.seq, i.run_id, i.dag_id, i.airflow_run_id, s.logical_date, i.action_no, i.object_guid,
       i.recipient_id, i.primary_smtp, i.cmdlet, i.action, i.user_certificate, i.user_smime_certificate,
       i.attempt, i.client_request_id, i.task_try, p.batch,
       extract(epoch FROM clock_timestamp() - i.at)::float AS age_s
FROM certsync.open_intent o
JOIN certsync.audit_log i ON i.seq = o.seq AND i.at = o.at
JOIN certsync.sync_run s ON s.run_id = i.run_id
LEFT JOIN certsync.planned_action p ON p.run_id = i.run_id AND p.action_no = i.action_no
WHERE i.phase = 'intent' AND NOT EXISTS (SELECT FROM certsync.audit_log c WHERE c.intent_seq = i.seq)
ORDER BY i.seq
"""
# open_intent (sql/0020) only finds the candidates, so that the history is not scanned on every
# batch; whether an intent is open is decided by the audit log itself.


def open_intents(conn: Connection) -> list[Intent]:
    """Intents no outcome or settlement closes yet: requests whose fate nobody recorded."""
    return [
        Intent(
            **{
                **r._mapping,
                "user_certificate": hash_list(r.user_certificate),
                "user_smime_certificate": hash_list(r.user_smime_certificate),
            }
        )
        for r in conn.execute(sa.text(OPEN_INTENTS))
    ]


def settle_applied(conn: Connection, *, intent: Intent, snapshot_run_ids: tuple[int, ...]) -> None:
    """The intent's write is in Exchange: its action is published, and the published state and the
    given runs' snapshots say what the recipient holds now."""
    run = RunInfo(
        run_id=intent.run_id,
        dag_id=intent.dag_id,
        airflow_run_id=intent.airflow_run_id,
        logical_date=intent.logical_date,
        dry_run=False,
        trust_fingerprint="",
    )
    action = PendingAction(
        action_no=intent.action_no,
        object_guid=intent.object_guid,
        recipient_id=intent.recipient_id,
        primary_smtp=intent.primary_smtp,
        cmdlet=intent.cmdlet,
        kind=intent.action,
        user_certificate=intent.user_certificate,
        user_smime_certificate=intent.user_smime_certificate,
    )
    for run_id in snapshot_run_ids:
        mark_published(conn, run=dataclasses.replace(run, run_id=run_id), action=action, state_run=run)
    conn.execute(
        sa.text(
            "UPDATE certsync.planned_action SET state = 'published', reason = NULL"
            " WHERE run_id = :r AND action_no = :n AND state IN ('pending', 'failed')"
        ),
        {"r": intent.run_id, "n": intent.action_no},
    )


# Exchange accepted: the run's snapshot says what the recipient holds now, and the published state
# moves (never back to an older run's view). One statement, one round trip.
_MARK_PUBLISHED = """
WITH snapshot AS (
    UPDATE certsync.exo_recipient SET user_certificate = :uc, user_smime_certificate = :us
    WHERE recipient_id = :id AND seen_run_id = :snapshot
){state}
INSERT INTO certsync.published_state AS p (recipient_id, object_guid, user_certificate,
    user_smime_certificate, run_id, logical_date, published_at)
VALUES (:id, :guid, :uc, :us, :run_id, :d, now())
ON CONFLICT (recipient_id) DO UPDATE SET object_guid = EXCLUDED.object_guid,
    user_certificate = EXCLUDED.user_certificate, user_smime_certificate = EXCLUDED.user_smime_certificate,
    run_id = EXCLUDED.run_id, logical_date = EXCLUDED.logical_date, published_at = EXCLUDED.published_at
WHERE p.logical_date <= EXCLUDED.logical_date
"""
_ACTION_PUBLISHED = """, action AS (
    UPDATE certsync.planned_action SET state = 'published', reason = coalesce(:reason, reason)
    WHERE run_id = :snapshot AND action_no = :n
)"""


def _published_values(run: RunInfo, action: PendingAction, sender: RunInfo) -> dict:
    return {
        "id": action.recipient_id,
        "guid": action.object_guid,
        "uc": list(action.user_certificate),
        "us": list(action.user_smime_certificate),
        "run_id": sender.run_id,
        "snapshot": run.run_id,
        "d": sender.logical_date,
    }


def mark_published(
    conn: Connection, *, run: RunInfo, action: PendingAction, state_run: RunInfo | None = None
) -> None:
    """Exchange accepted: record what it now holds in `run`'s snapshot, so a re-planned run finds
    nothing left to do, and move the published state (as of `state_run`, the run that sent it, by
    default `run`), but never back to an older run's view."""
    values = _published_values(run, action, state_run or run)
    conn.execute(sa.text(_MARK_PUBLISHED.format(state="")), values)


_RECORD_PUBLISHED = sa.text(_MARK_PUBLISHED.format(state=_ACTION_PUBLISHED))


def record_published(conn: Connection, *, run: RunInfo, action: PendingAction, reason: str | None) -> None:
    """mark_published for the run that sent it, and its action's state 'published', at once."""
    values = {**_published_values(run, action, run), "n": action.action_no, "reason": reason}
    execute_or_hold(conn, _RECORD_PUBLISHED, values)


def skip_batch(conn: Connection, *, run_id: int, batch: int, reason: str) -> int:
    """Mark a batch's pending actions skipped (the run was superseded): nothing of it is sent."""
    return conn.execute(
        sa.text(
            "UPDATE certsync.planned_action SET state = 'skipped', reason = :reason"
            " WHERE run_id = :r AND batch = :b AND state = 'pending'"
        ),
        {"r": run_id, "b": batch, "reason": reason},
    ).rowcount


def defer_actions(conn: Connection, *, run_id: int, action_nos: list[int]) -> int:
    """Defer these pending actions to the next run: the run's publish time box is used up."""
    return conn.execute(
        sa.text(
            "UPDATE certsync.planned_action SET state = 'deferred', reason = 'time_box'"
            " WHERE run_id = :r AND action_no = ANY(:ns) AND state = 'pending'"
        ),
        {"r": run_id, "ns": action_nos},
    ).rowcount


_SET_ACTION_STATE = sa.text(
    "UPDATE certsync.planned_action SET state = :s, reason = coalesce(:reason, reason)"
    " WHERE run_id = :r AND action_no = :n"
)


def set_action_state(
    conn: Connection, *, run_id: int, action_no: int, state: str, reason: str | None = None
) -> None:
    execute_or_hold(conn, _SET_ACTION_STATE, {"s": state, "reason": reason, "r": run_id, "n": action_no})


def publishing_for_s(conn: Connection, *, run_id: int) -> float:
    """Seconds since this run's first request (0 before it sent any), by the database's clock."""
    elapsed = conn.execute(
        sa.text(
            "SELECT extract(epoch FROM clock_timestamp() - min(at))::float FROM certsync.audit_log"
            " WHERE run_id = :r AND phase = 'intent'"
        ),
        {"r": run_id},
    ).scalar()
    return float(elapsed or 0.0)


def backlog(conn: Connection, *, run_id: int) -> dict[str, float | int] | None:
    """Actions a time-boxed run deferred, and the seconds the next run needs for them at this run's
    pace (accepted requests over the span of its requests)."""
    row = conn.execute(
        sa.text(
            "SELECT (SELECT count(*) FROM certsync.planned_action WHERE run_id = :r AND state = 'deferred')"
            " AS deferred, count(*) FILTER (WHERE outcome = 'accepted') AS accepted,"
            " extract(epoch FROM max(at) - min(at))::float AS span_s"
            " FROM certsync.audit_log WHERE run_id = :r"
        ),
        {"r": run_id},
    ).one()
    if not row.deferred:
        return None
    pace = row.accepted / row.span_s if row.span_s else 0.0
    return {
        "deferred": int(row.deferred),
        "pace_per_s": round(pace, 2),
        "estimated_s": round(row.deferred / pace) if pace else None,
    }
