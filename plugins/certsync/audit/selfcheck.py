"""The check after every run: the audit log verified as an auditor would, with the public part of the
signing key, against the checkpoints kept outside the database (the checkpoint file when one is
configured, else the run's own signed checkpoint from its summary) and the signed cuts of months taken
out.

Incremental by default: a verification that finds the log intact signs a mark (kind `verified`:
the head it reached and the key in force there) and records it in certsync.audit_verification; the
next run verifies only the rows after the newest mark whose signature holds. Its cost follows the
rows a run added, not the history. Tampering with rows before the mark is found by a full
verification (`full=True`, the DAG's `full_audit_verify` param or `certsync audit verify`), which
runs by itself when the newest full one is older than `audit_full_verify_days`."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from certsync.audit import checkpoints
from certsync.audit.partitions import db_cuts
from certsync.audit.rows import db_rows
from certsync.audit.signing import AuditSigner, public_key
from certsync.audit.verify import Report, verify_rows

log = logging.getLogger(__name__)


class AuditBroken(RuntimeError):
    """The audit log does not verify: someone changed it, or a checkpoint no longer matches."""


def _checkpoints(engine: Engine, *, directory: Any) -> list[checkpoints.Checkpoint]:
    if directory is not None and (directory / checkpoints.FILE_NAME).exists():
        return checkpoints.read(directory / checkpoints.FILE_NAME)
    with engine.connect() as conn:  # no file: the newest checkpoint a run's summary carries
        row = conn.execute(
            sa.text(
                "SELECT run_id, summary -> 'audit_checkpoint' AS checkpoint FROM certsync.sync_run"
                " WHERE jsonb_typeof(summary -> 'audit_checkpoint') = 'object' ORDER BY run_id DESC LIMIT 1"
            )
        ).first()
    return (
        [checkpoints.Checkpoint.from_json(row.checkpoint, where=f"run {row.run_id}'s summary")] if row else []
    )


def _marks(engine: Engine, *, keys: dict[str, Any]) -> tuple[checkpoints.Checkpoint | None, datetime | None]:
    """The newest verification mark whose signature holds, and the time of the newest full one.
    A mark signed by a configured key that does not verify was written by someone without the key."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT verification_no, mode, mark FROM certsync.audit_verification ORDER BY verification_no DESC LIMIT 200"
            )
        ).all()
    newest, full_at = None, None
    for row in found:
        mark = checkpoints.Checkpoint.from_json(row.mark, where=f"verification {row.verification_no}")
        if mark.kind != checkpoints.VERIFIED or mark.key_id not in keys:
            continue  # another key's (rotated out): not trusted, not an attack either
        try:
            mark.check(keys, where=f"verification mark {row.verification_no} in certsync.audit_verification")
        except checkpoints.CheckpointError as exc:
            raise AuditBroken(f"audit verification record forged: {exc}") from None
        newest = newest or mark
        if mark.label == "full" and full_at is None:
            full_at = mark.at
    return newest, full_at


def _record(
    engine: Engine, *, signer: AuditSigner, report: Report, mode: str, seconds: float, resume: Any
) -> None:
    head_seq = report.last_seq if report.last_seq is not None else (resume.seq if resume else None)
    head = report.head if report.last_seq is not None else (resume.head if resume else None)
    if head_seq is None or head is None:
        return  # an empty log: nothing to mark
    with engine.begin() as conn:
        now = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
        mark = checkpoints.sign(
            kind=checkpoints.VERIFIED,
            seq=head_seq,
            head=head,
            at=now,
            key=signer.key,
            first_seq=report.first_seq,
            active_key=report.active_key if report.last_seq is not None else resume.active_key,
            label=mode,
        )
        conn.execute(
            sa.text(
                "INSERT INTO certsync.audit_verification (mode, from_seq, to_seq, row_count, seconds, mark)"
                " VALUES (:mode, :lo, :hi, :n, :s, CAST(:mark AS jsonb))"
            ),
            {
                "mode": mode,
                "lo": report.first_seq,
                "hi": head_seq,
                "n": report.rows,
                "s": seconds,
                "mark": json.dumps(mark.to_json()),
            },
        )


def after_run(
    engine: Engine, *, signer: AuditSigner, directory: Any, full: bool = False, full_every_days: int = 7
) -> Report:
    """Verify the rows after the last verification mark (all rows when `full`, when there is no
    mark, or when the last full verification is older than `full_every_days`); raise AuditBroken
    naming the first problem."""
    keys = {k.key_id: public_key(k.public_raw) for k in (signer.key, signer.previous) if k is not None}
    given = _checkpoints(engine, directory=directory)
    if not given:
        log.warning("no audit checkpoint yet (no run wrote an audit row); nothing to verify against")
        return Report()
    resume, full_at = _marks(engine, keys=keys)
    if full_at is None or (
        full_every_days > 0 and datetime.now(full_at.tzinfo) - full_at > timedelta(days=full_every_days)
    ):
        full = True
    resume = None if full else resume
    started = time.monotonic()
    with engine.connect() as conn:
        given = [*given, *db_cuts(conn)]
        try:
            report = verify_rows(
                db_rows(conn, after=resume.seq if resume else 0),
                public_keys=keys,
                checkpoints=given,
                resume=resume,
            )
        except checkpoints.CheckpointError as exc:
            raise AuditBroken(f"audit log cannot be verified: {exc}") from None
    if not report.intact:
        for problem in report.problems[:10]:
            log.error("audit %s", problem)
        raise AuditBroken(f"{report.summary()}: {report.problems[0]}")
    mode = "full" if resume is None else "incremental"
    seconds = time.monotonic() - started
    _record(engine, signer=signer, report=report, mode=mode, seconds=seconds, resume=resume)
    log.info("%s verification in %.2fs: %s", mode, seconds, report.summary())
    return report
