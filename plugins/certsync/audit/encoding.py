"""The canonical byte encoding of an audit row, the one thing its hash and signature cover.

Every field is written as its name and a typed value, each length-prefixed, in a fixed order under a
version tag, so no value can bleed into the next one: a quote, comma, newline or NUL inside a
recipient name or an error text is just bytes inside its own length. NULL, an empty string and an
empty list are three different encodings. The database plays no part: the verifier recomputes
everything from the raw column values.

Rows written before signing began (migration 0009) were hashed by the database over a JSON text
(certsync.audit_row_text in sql/0002 and sql/0006); `legacy_row_text` rebuilds that text in Python,
byte for byte, so those rows are checked without trusting any database function either.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

ROW_TAG = b"certsync.audit.row.v1\n"
CHECKPOINT_TAG = b"certsync.audit.checkpoint.v1\n"
SEAL_TAG = b"certsync.audit.seal.v1\n"  # cuts and verification marks: a checkpoint with more fields
ROW_SIGNATURE_TAG = b"certsync.audit.row-signature.v1\n"
ENDORSEMENT_TAG = b"certsync.audit.key-endorsement.v1\n"

INT, TEXT, BYTES, BYTES_LIST, UUID, TIME = "int", "text", "bytes", "bytes[]", "uuid", "time"

# The signed fields of a row, in encoding order. row_hash, signature and key_endorsement are not
# among them: they are computed over this encoding.
ROW_FIELDS: tuple[tuple[str, str], ...] = (
    ("seq", INT),
    ("at", TIME),
    ("run_id", INT),
    ("dag_id", TEXT),
    ("airflow_run_id", TEXT),
    ("object_guid", UUID),
    ("recipient_id", TEXT),
    ("primary_smtp", TEXT),
    ("cmdlet", TEXT),
    ("action", TEXT),
    ("user_certificate", BYTES_LIST),
    ("user_smime_certificate", BYTES_LIST),
    ("attempt", INT),
    ("outcome", TEXT),
    ("http_status", INT),
    ("error_code", TEXT),
    ("detail", TEXT),
    ("client_request_id", UUID),
    ("phase", TEXT),
    ("intent_seq", INT),
    ("action_no", INT),
    ("task_try", INT),
    ("settled_by_run_id", INT),
    ("key_id", TEXT),
    ("public_key", BYTES),
    ("prev_hash", BYTES),
)
# Every column of certsync.audit_log the verifier reads and an export carries.
COLUMNS: tuple[str, ...] = (*(name for name, _ in ROW_FIELDS), "row_hash", "signature", "key_endorsement")
COLUMN_TYPES: dict[str, str] = {
    **dict(ROW_FIELDS),
    "row_hash": BYTES,
    "signature": BYTES,
    "key_endorsement": BYTES,
}

CHECKPOINT_FIELDS: tuple[tuple[str, str], ...] = (
    ("seq", INT),
    ("head", BYTES),
    ("at", TIME),
    ("key_id", TEXT),
)

SEAL_FIELDS: tuple[tuple[str, str], ...] = (
    ("kind", TEXT),
    *CHECKPOINT_FIELDS,
    ("first_seq", INT),
    ("first_prev", BYTES),
    ("active_key", TEXT),
    ("label", TEXT),
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


class EncodingError(ValueError):
    """A value does not have its field's type (the row cannot be encoded, so it cannot be trusted)."""


def _length(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _value(name: str, kind: str, value: Any) -> bytes:
    if value is None:
        return b"N"
    if kind == INT and isinstance(value, int) and not isinstance(value, bool):
        return b"I" + struct.pack(">q", value)
    if kind == TEXT and isinstance(value, str):
        return b"T" + _length(value.encode("utf-8"))
    if kind == BYTES and isinstance(value, bytes | bytearray | memoryview):
        return b"B" + _length(bytes(value))
    if kind == BYTES_LIST and isinstance(value, list | tuple):
        items = [_value(name, BYTES, item) for item in value]
        if b"N" in items:
            raise EncodingError(f"{name}: a NULL inside the list")
        return b"L" + struct.pack(">I", len(items)) + b"".join(items)
    if kind == UUID and isinstance(value, uuid.UUID):
        return b"U" + value.bytes
    if kind == TIME and isinstance(value, datetime) and value.tzinfo is not None:
        return b"D" + struct.pack(">q", (value - _EPOCH) // _US)
    raise EncodingError(f"{name}: expected {kind}, got {type(value).__name__}")


def encode(tag: bytes, fields: tuple[tuple[str, str], ...], values: Mapping[str, Any]) -> bytes:
    parts = [tag]
    for name, kind in fields:
        parts.append(_length(name.encode("ascii")))
        parts.append(_value(name, kind, values.get(name)))
    return b"".join(parts)


def encode_row(row: Mapping[str, Any]) -> bytes:
    return encode(ROW_TAG, ROW_FIELDS, row)


def row_hash(row: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical encoding (which includes the previous row's hash and the key id)."""
    return hashlib.sha256(encode_row(row)).digest()


def row_hash_at(row: Mapping[str, Any], seqs: range) -> dict[bytes, int]:
    """The row's hash as if it sat at each of `seqs` (seq is encoded first): used to tell a row that
    was moved from one that was altered. Maps hash to seq."""
    rest = encode(b"", ROW_FIELDS[1:], row)
    name = _length(b"seq")
    return {
        hashlib.sha256(ROW_TAG + name + b"I" + struct.pack(">q", seq) + rest).digest(): seq
        for seq in seqs
        if seq >= 0
    }


def signed_message(digest: bytes) -> bytes:
    """What a row's signature covers: its hash, under a tag of its own (never valid as anything else)."""
    return ROW_SIGNATURE_TAG + digest


def endorsement_message(digest: bytes) -> bytes:
    """What the previous key signs on a key row, handing the chain over to the new key."""
    return ENDORSEMENT_TAG + digest


def encode_checkpoint(values: Mapping[str, Any]) -> bytes:
    return encode(CHECKPOINT_TAG, CHECKPOINT_FIELDS, values)


def encode_seal(values: Mapping[str, Any]) -> bytes:
    return encode(SEAL_TAG, SEAL_FIELDS, values)


# ---------------------------------------------------------------- rows from before signing


def _json_string(text: str) -> str:
    """A string as PostgreSQL's jsonb output writes it (escape_json)."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in _JSON_SHORT:
            out.append(_JSON_SHORT[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_JSON_SHORT = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        raise EncodingError("no boolean in an audit row")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, uuid.UUID):
        return _json_string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    raise EncodingError(f"no JSON form for {type(value).__name__}")


def legacy_row_text(row: Mapping[str, Any]) -> str:
    """certsync.audit_row_text(row) as the database computed it before migration 0009."""
    at = row["at"].astimezone(UTC)
    base = [
        row["seq"],
        f"{at:%Y-%m-%dT%H:%M:%S.%f}Z",
        row["run_id"],
        row["dag_id"],
        row["airflow_run_id"],
        row["object_guid"],
        row["recipient_id"],
        row["primary_smtp"],
        row["cmdlet"],
        row["action"],
        [bytes(h).hex() for h in row["user_certificate"] or ()],
        [bytes(h).hex() for h in row["user_smime_certificate"] or ()],
        row["attempt"],
        row["outcome"],
        row["http_status"],
        row["error_code"],
        row["detail"],
        row["client_request_id"],
    ]
    if row.get("phase") is not None:
        base += [row["phase"], row["intent_seq"], row["action_no"], row["task_try"], row["settled_by_run_id"]]
    return _json(base)


def legacy_row_hash(row: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(bytes(row["prev_hash"]) + legacy_row_text(row).encode("utf-8")).digest()
