"""The check after every run: the whole audit log verified as an auditor would, with the public part
of the signing key, against the checkpoints kept outside the database (the checkpoint file when one is
configured, else the run's own signed checkpoint from its summary)."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from certsync.audit import checkpoints
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


def after_run(engine: Engine, *, signer: AuditSigner, directory: Any) -> Report:
    """Verify every row; raise AuditBroken naming the first problem."""
    keys = {k.key_id: public_key(k.public_raw) for k in (signer.key, signer.previous) if k is not None}
    given = _checkpoints(engine, directory=directory)
    if not given:
        log.warning("no audit checkpoint yet (no run wrote an audit row); nothing to verify against")
        return Report()
    with engine.connect() as conn:
        try:
            report = verify_rows(db_rows(conn), public_keys=keys, checkpoints=given)
        except checkpoints.CheckpointError as exc:
            raise AuditBroken(f"audit log cannot be verified: {exc}") from None
    if not report.intact:
        for problem in report.problems[:10]:
            log.error("audit %s", problem)
        raise AuditBroken(f"{report.summary()}: {report.problems[0]}")
    log.info("%s", report.summary())
    return report
