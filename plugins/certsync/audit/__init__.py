"""The audit log: signed rows (writer), their canonical encoding, signed checkpoints kept outside
the database, and the verifier an auditor runs with only the public key and a checkpoint.

See sql/0002_audit.sql, sql/0006_write_ahead_audit.sql and sql/0009_signed_audit.sql for the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


@dataclass(frozen=True, kw_only=True)
class ChainHead:
    seq: int
    row_hash: str  # hex

    def __str__(self) -> str:
        return f"{self.seq}:{self.row_hash}"

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        seq, _, row_hash = text.partition(":")
        if not seq.isdigit() or len(row_hash) != 64:
            raise ValueError(f"a chain head looks like <seq>:<64 hex digits>, not {text!r}")
        return cls(seq=int(seq), row_hash=row_hash.lower())


def chain_head(conn: Connection) -> ChainHead | None:
    import sqlalchemy as sa

    row = conn.execute(
        sa.text("SELECT seq, encode(row_hash, 'hex') AS h FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
    ).first()
    return ChainHead(seq=row.seq, row_hash=row.h) if row else None
