"""Verification of the hash-chained audit log.

The chain itself is kept by the database (see sql/0002_audit.sql): each row's hash covers its
content and the previous row's hash. The view `certsync.audit_chain_breaks` finds altered, removed
or inserted rows inside the chain; what it cannot see is a cut tail or a chain rewritten from
scratch by someone who can switch the guards off. For that, every run hands its chain head (last
sequence number and hash) to places outside the table (the Airflow log, XCom, the run summary):
checking against a head kept elsewhere closes the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
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
    row = conn.execute(
        sa.text("SELECT seq, encode(row_hash, 'hex') AS h FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
    ).first()
    return ChainHead(seq=row.seq, row_hash=row.h) if row else None


def verify(conn: Connection, *, expected_head: ChainHead | None = None) -> list[str]:
    """Problems found in the chain (an empty list means intact), checked against a head kept
    elsewhere when one is given."""
    problems = [
        f"row {seq}: {problem}"
        for seq, problem in conn.execute(
            sa.text("SELECT seq, problem FROM certsync.audit_chain_breaks ORDER BY seq")
        )
    ]
    if expected_head is not None:
        found = conn.execute(
            sa.text("SELECT encode(row_hash, 'hex') FROM certsync.audit_log WHERE seq = :s"),
            {"s": expected_head.seq},
        ).scalar()
        if found is None:
            problems.append(f"row {expected_head.seq} of the recorded head is missing: the tail was cut")
        elif found != expected_head.row_hash:
            problems.append(
                f"row {expected_head.seq} differs from the recorded head: the chain was rewritten"
            )
    return problems
