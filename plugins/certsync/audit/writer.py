"""Appending signed rows to the audit log.

The writer, not the database, decides each row's place and signs it: under the chain's advisory
lock (held until commit, so parallel publish tasks append one after another) it reads the head,
takes the database's clock, encodes the row with the previous row's hash and its key id, hashes and
signs it. The insert trigger (sql/0009) only refuses a row that does not extend the head or carries
no signature; nobody holding only database rights can make a signature.

A writer whose key is not the chain's current key first appends a key row: the new public key,
signed by itself and, when the previous key is configured, endorsed by it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.audit import encoding
from certsync.audit.signing import AuditSigner, SigningKey

# The engine execution option that carries the signer to every connection that writes the audit.
SIGNER_OPTION = "certsync_audit_signer"
LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtext('certsync.audit_log'))")
HEAD = sa.text(
    "SELECT h.seq, h.row_hash, k.key_id AS active_key, clock_timestamp() AS now FROM (SELECT 1) one"
    " LEFT JOIN LATERAL (SELECT seq, row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1) h ON true"
    " LEFT JOIN LATERAL (SELECT key_id FROM certsync.audit_log WHERE phase = 'key'"
    " ORDER BY seq DESC LIMIT 1) k ON true"
)
INSERT = sa.text(
    f"INSERT INTO certsync.audit_log ({', '.join(encoding.COLUMNS)})"  # noqa: S608 - fixed column names
    f" VALUES ({', '.join(':' + c for c in encoding.COLUMNS)})"
)


class SigningNotConfigured(RuntimeError):
    """Audit rows cannot be written without the signing key."""


def signer_of(conn: Connection) -> AuditSigner:
    signer = conn.get_execution_options().get(SIGNER_OPTION)
    if signer is None:
        raise SigningNotConfigured(
            "audit rows are signed: configure the connection 'certsync_audit_signing' (an Ed25519 key)"
        )
    return signer


def _complete(fields: dict[str, Any], *, seq: int, at: Any, prev_hash: bytes, key: SigningKey) -> dict:
    row = {name: fields.get(name) for name in encoding.COLUMNS}
    row.update(seq=seq, at=at, prev_hash=prev_hash, key_id=key.key_id)
    digest = encoding.row_hash(row)
    row.update(row_hash=digest, signature=key.sign(encoding.signed_message(digest)))
    return row


def _key_row(fields: dict[str, Any], signer: AuditSigner, *, seq: int, at: Any, prev_hash: bytes) -> dict:
    """The row that hands the chain to the signer's key (run columns say which run did it)."""
    run = {k: fields.get(k) for k in ("run_id", "dag_id", "airflow_run_id", "task_try")}
    row = _complete(
        {**run, "phase": "key", "public_key": signer.key.public_raw},
        seq=seq,
        at=at,
        prev_hash=prev_hash,
        key=signer.key,
    )
    if signer.previous is not None:
        row["key_endorsement"] = signer.previous.sign(encoding.endorsement_message(row["row_hash"]))
    return row


# Where the chain's head stands within the transaction that holds its lock (Connection.info).
_HEAD = "certsync_audit_head"
_HELD = "certsync_audit_held"  # rows appended inside together(), not inserted yet


def append(conn: Connection, fields: dict[str, Any]) -> int:
    """Append one signed row (column values without seq, at and the chain columns); returns its seq.
    The caller commits; the chain stays locked until then. Further rows of the same transaction
    extend the head it left without reading it again (no one else can append meanwhile)."""
    signer = signer_of(conn)
    transaction = conn.get_transaction()
    head_now = conn.info.get(_HEAD)
    if head_now is not None and head_now[0] is transaction:
        _, seq, prev_hash, at = head_now
        seq += 1
    else:
        conn.execute(LOCK)
        head = conn.execute(HEAD).one()
        seq, prev_hash, at = (head.seq or 0) + 1, bytes(head.row_hash or b""), head.now
        if head.active_key != signer.key.key_id:
            key_row = _key_row(fields, signer, seq=seq, at=at, prev_hash=prev_hash)
            _insert(conn, key_row)
            seq, prev_hash = seq + 1, key_row["row_hash"]
    row = _complete(fields, seq=seq, at=at, prev_hash=prev_hash, key=signer.key)
    _insert(conn, row)
    conn.info[_HEAD] = (transaction, seq, row["row_hash"], at)
    return seq


def _insert(conn: Connection, row: dict[str, Any]) -> None:
    held = conn.info.get(_HELD)
    if held is not None:
        held.append(row)
    else:
        conn.execute(INSERT, row)


@contextmanager
def together(conn: Connection) -> Iterator[None]:
    """Rows appended in the block (seq numbers given at once) are inserted when it ends, in one
    pipelined round trip instead of one each; the caller commits after the block."""
    conn.info[_HELD] = held = []
    try:
        yield
    finally:
        del conn.info[_HELD]
    if held:
        conn.execute(INSERT, held)
