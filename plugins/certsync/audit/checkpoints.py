"""Signed checkpoints: the chain's head (sequence and hash) at a time, signed with the audit key and
kept outside the database, so that a cut tail or a history rewritten from scratch shows.

After every run one checkpoint is appended to `checkpoints.jsonl` in the directory named by
certsync_config's `audit_checkpoint_dir` (one JSON object a line, never rewritten) and put into the
run's summary and its Asset event.

Two more kinds of signed statement share the format, each with a few more signed fields:
  cut       written by `certsync audit detach` at the last row of each month it takes out: the
            month's first row (`first_seq`) and that row's link (`first_prev`), the key in force at
            the cut (`active_key`) and the month (`label`). Rows missing before the first row kept
            are accepted only when a cut at the row before says so; the cut at a month's end and the
            one before it let the month's export verify on its own.
  verified  written by the verify_audit task at the head it verified, with the key in force there:
            where the next run's incremental verification resumes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certsync.audit import encoding
from certsync.audit.signing import SigningKey, verifies

FILE_NAME = "checkpoints.jsonl"
CHECKPOINT, CUT, VERIFIED = "checkpoint", "cut", "verified"
KINDS = (CHECKPOINT, CUT, VERIFIED)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or its signature does not hold."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    seq: int
    head: bytes
    at: datetime
    key_id: str
    signature: bytes
    run_id: int | None = None  # informative, not signed
    kind: str = CHECKPOINT
    # Signed for cuts and verification marks only (see the module's doc).
    first_seq: int | None = None
    first_prev: bytes | None = None
    active_key: str | None = None
    label: str | None = None

    def message(self) -> bytes:
        values = {"seq": self.seq, "head": self.head, "at": self.at, "key_id": self.key_id}
        if self.kind == CHECKPOINT:
            return encoding.encode_checkpoint(values)
        return encoding.encode_seal(
            {
                **values,
                "kind": self.kind,
                "first_seq": self.first_seq,
                "first_prev": self.first_prev,
                "active_key": self.active_key,
                "label": self.label,
            }
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq,
            "head": self.head.hex(),
            "at": self.at.isoformat(),
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
            "run_id": self.run_id,
        }
        if self.kind != CHECKPOINT:
            data.update(
                kind=self.kind,
                first_seq=self.first_seq,
                first_prev=None if self.first_prev is None else self.first_prev.hex(),
                active_key=self.active_key,
                label=self.label,
            )
        return data

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> Checkpoint:
        try:
            at = datetime.fromisoformat(data["at"])
            if at.tzinfo is None:
                raise ValueError("a checkpoint's time has a time zone")
            kind = str(data.get("kind", CHECKPOINT))
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            first_prev = data.get("first_prev")
            return cls(
                kind=kind,
                first_seq=None if data.get("first_seq") is None else int(data["first_seq"]),
                first_prev=None if first_prev is None else bytes.fromhex(first_prev),
                active_key=data.get("active_key"),
                label=data.get("label"),
                seq=int(data["seq"]),
                head=bytes.fromhex(data["head"]),
                at=at,
                key_id=str(data["key_id"]),
                signature=base64.b64decode(data["signature"], validate=True),
                run_id=data.get("run_id"),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise CheckpointError(f"{where}: not a certsync audit checkpoint ({exc})") from None

    def check(self, keys: dict[str, Ed25519PublicKey], *, where: str) -> None:
        key = keys.get(self.key_id)
        if key is None:
            raise CheckpointError(
                f"{where}: signed by key {self.key_id}, which is not among the public keys given"
            )
        if not verifies(key, self.signature, self.message()):
            raise CheckpointError(f"{where}: its signature does not verify (altered or forged checkpoint)")


def sign(
    *, seq: int, head: bytes, at: datetime, key: SigningKey, run_id: int | None = None, **signed: Any
) -> Checkpoint:
    """A signed checkpoint; `signed` holds the kind and the fields of a cut or verification mark."""
    unsigned = Checkpoint(
        seq=seq, head=head, at=at, key_id=key.key_id, signature=b"", run_id=run_id, **signed
    )
    return Checkpoint(**{**unsigned.__dict__, "signature": key.sign(unsigned.message())})


def append(directory: Path, checkpoint: Checkpoint) -> Path:
    """Append one line to the directory's checkpoint file (created with the directory if needed) and
    flush it to disk before the run is reported done."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    line = json.dumps(checkpoint.to_json(), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read(path: Path) -> list[Checkpoint]:
    """Every checkpoint in a JSON-lines file (or a file with one JSON object), in file order."""
    where = f"checkpoint file {str(path)!r}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror}") from None
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise CheckpointError(f"{where}: line {number} is not JSON") from None
        found.append(Checkpoint.from_json(data, where=f"{where}, line {number}"))
    if not found:
        raise CheckpointError(f"{where} holds no checkpoint")
    return found
