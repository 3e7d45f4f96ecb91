"""`certsync audit verify`: the audit log checked against the auditor's public keys and signed
checkpoints, trusting nothing the database computes.

The rows come from a plain SELECT of the table's columns (or from an export file, offline); every
hash and signature is recomputed here. A row is reported as
  altered    its content does not match its hash
  moved      its content is a genuine signed row of another position (rows reordered or renumbered)
  forged     its hash matches but no trusted key signed it (a re-hashed chain, an inserted row)
  unsigned   a row without signature after signing began
  deleted    rows missing between two rows (a gap in the sequence), or before the first row kept
             without a signed cut (from `certsync audit detach`) at the row before it
  broken     its link to the previous row does not hold
  rewritten  a checkpoint's row differs from what the checkpoint says
  truncated  rows the latest checkpoint vouches for are gone
  untrusted  a key row introduces a key neither given by the auditor nor endorsed by a trusted key
  inserted   a row after the end a month's cut seals (verifying one month's export)

Old months taken out of the database (`certsync audit detach`) leave a signed cut at their last
row: the rows that remain start from it. An incremental verification resumes after a signed
verification mark (`resume`) instead of the first row.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certsync.audit import encoding
from certsync.audit.checkpoints import CUT, Checkpoint, CheckpointError
from certsync.audit.signing import key_id, public_key, verifies

MOVE_WINDOW = 10_000  # how far away a moved row's true position is looked for
MAX_REPORTED = 50


@dataclass(frozen=True, kw_only=True)
class Problem:
    seq: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"row {self.seq}: {self.kind}: {self.detail}"


@dataclass(kw_only=True)
class Report:
    rows: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: bytes | None = None
    unsigned_before_signing: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    checkpoint: Checkpoint | None = None
    cut: Checkpoint | None = None  # the cut the rows start after, if any
    resumed: Checkpoint | None = None  # the verification mark the rows start after, if any
    active_key: str | None = None  # the chain's key in force at the last row

    @property
    def intact(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: Problem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(problem)

    def summary(self) -> str:
        if not self.intact:
            first = self.problems[0]
            return f"audit log NOT intact: {self.problem_count} problem(s); first at row {first.seq} ({first.kind})"
        span = f"rows {self.first_seq}..{self.last_seq}" if self.rows else "no rows"
        if self.cut is not None:
            span += f" (after the cut at row {self.cut.seq}, {self.cut.label})"
        if self.resumed is not None:
            span += f" (resumed after row {self.resumed.seq}, verified {self.resumed.at.isoformat()})"
        cp = self.checkpoint
        return (
            f"audit log intact: {self.rows} {span}, head {self.last_seq}:{(self.head or b'').hex()},"
            f" signed by {', '.join(self.keys) or 'no key'}"
            + (
                f" ({self.unsigned_before_signing} rows from before signing, covered by the chain)"
                if self.unsigned_before_signing
                else ""
            )
            + (f"; matches {cp.kind} {cp.seq}:{cp.head.hex()[:16]}… of {cp.at.isoformat()}" if cp else "")
        )


class _Chain:
    """The verifier's state while it walks the rows in sequence order."""

    def __init__(
        self,
        *,
        trusted: Mapping[str, Ed25519PublicKey],
        checkpoints: list[Checkpoint],
        resume: Checkpoint | None = None,
        until: int | None = None,
    ) -> None:
        self.trusted = dict(trusted)
        self.report = Report()
        self.cuts = self._signed_cuts([c for c in checkpoints if c.kind == CUT])
        self.by_seq: dict[int, list[Checkpoint]] = {}
        for c in checkpoints:
            if c.kind != CUT or self.cuts.get(c.seq) is c:
                self.by_seq.setdefault(c.seq, []).append(c)
        self.resume, self.until = resume, until
        self.prev_seq: int | None = None
        self.prev_hash: bytes | None = None
        self.active: str | None = None  # the chain's current key
        self.signing_began = False
        self.seen_keys: set[str] = set()  # every key a key row introduced, trusted or not
        # After rows missing without a cut (already reported), the first signed row's key is taken
        # as the one in force, so that the gap, not every row after it, is the news.
        self.adopt_key = False

    def _signed_cuts(self, cuts: list[Checkpoint]) -> dict[int, Checkpoint]:
        """The cuts whose signature holds with a key the auditor gave; any other is reported and
        accounts for nothing (a cut made up in the database leaves the rows before it missing)."""
        signed = {}
        for cut in cuts:
            if cut.key_id not in self.trusted:
                detail = f"the cut of {cut.label} at row {cut.seq} is signed by {cut.key_id}, a key not given"
                self.report.add(Problem(seq=cut.seq, kind="untrusted", detail=detail))
                continue
            try:
                cut.check(self.trusted, where=f"the cut of {cut.label} at row {cut.seq}")
            except CheckpointError as exc:
                self.report.add(Problem(seq=cut.seq, kind="forged", detail=str(exc)))
                continue
            signed[cut.seq] = cut
        return signed

    def start(self, row: Mapping[str, Any]) -> None:
        seq, prev = row["seq"], bytes(row["prev_hash"] or b"")
        if self.resume is not None:
            self._resume(seq, prev)
        elif seq == 1:
            if prev:
                self.report.add(
                    Problem(seq=seq, kind="broken", detail="the first row links to a predecessor")
                )
        else:
            self._after_cut(seq, prev)

    def _after_cut(self, seq: int, prev: bytes) -> None:
        """The first row kept after old months were taken out: only a signed cut at the row before
        accounts for the rows missing before it."""
        cut = self.cuts.get(seq - 1)
        if cut is None:
            self.adopt_key = True
            self.report.add(
                Problem(
                    seq=seq,
                    kind="deleted",
                    detail=f"rows 1..{seq - 1} are missing and no signed cut at row {seq - 1} says they were taken out",
                )
            )
        elif not hmac.compare_digest(cut.head, prev):
            self.report.add(
                Problem(seq=seq, kind="broken", detail=f"does not link to the cut at row {seq - 1}")
            )
        # The rows before the cut were verified when they were taken out; the key in force then is
        # the one the cut names.
        self.report.cut = cut
        self.active = cut.active_key if cut else None
        self.signing_began = self.active is not None
        if self.active is not None:
            self.report.keys.append(self.active)

    def _resume(self, seq: int, prev: bytes) -> None:
        mark = self.resume
        assert mark is not None
        self.report.resumed = mark
        if seq != mark.seq + 1:
            kind = "deleted" if seq > mark.seq + 1 else "moved"
            self.report.add(
                Problem(
                    seq=seq,
                    kind=kind,
                    detail=f"verification resumes after row {mark.seq}, but row {mark.seq + 1} is not next",
                )
            )
        elif not hmac.compare_digest(mark.head, prev):
            self.report.add(
                Problem(seq=seq, kind="broken", detail=f"does not link to row {mark.seq} as verified before")
            )
        self.active = mark.active_key
        self.signing_began = self.active is not None
        if self.active is not None:
            self.report.keys.append(self.active)

    def sequence(self, row: Mapping[str, Any]) -> bool:
        """False when the row does not follow the previous one (reported)."""
        seq = row["seq"]
        if self.prev_seq is None:
            self.start(row)
            return True
        if seq <= self.prev_seq:
            self.report.add(Problem(seq=seq, kind="moved", detail=f"comes after row {self.prev_seq}"))
            return False
        if seq > self.prev_seq + 1:
            missing = f"{self.prev_seq + 1}" + (f"..{seq - 1}" if seq - 1 > self.prev_seq + 1 else "")
            self.report.add(
                Problem(seq=seq, kind="deleted", detail=f"row(s) {missing} are missing before it")
            )
            return False
        return True

    def link(self, row: Mapping[str, Any]) -> None:
        if self.prev_seq is not None and not hmac.compare_digest(
            bytes(row["prev_hash"] or b""), self.prev_hash or b""
        ):
            self.report.add(
                Problem(seq=row["seq"], kind="broken", detail=f"does not link to row {self.prev_seq}")
            )

    def content(self, row: Mapping[str, Any]) -> bytes | None:
        """The recomputed hash of a row whose content matches its stored hash; None (reported) otherwise."""
        seq, stored = row["seq"], bytes(row["row_hash"] or b"")
        try:
            if row["signature"] is None and row["key_id"] is None:
                if self.signing_began:
                    self.report.add(
                        Problem(seq=seq, kind="unsigned", detail="no signature after signing began")
                    )
                    return None
                digest = encoding.legacy_row_hash(row)
            else:
                digest = encoding.row_hash(row)
        except (encoding.EncodingError, KeyError, AttributeError) as exc:
            self.report.add(Problem(seq=seq, kind="altered", detail=f"cannot be encoded: {exc}"))
            return None
        if hmac.compare_digest(digest, stored):
            return digest
        self.report.add(self._altered_or_moved(row))
        return None

    def _altered_or_moved(self, row: Mapping[str, Any]) -> Problem:
        seq = row["seq"]
        if row["signature"] is not None:
            around = range(max(1, seq - MOVE_WINDOW), seq + MOVE_WINDOW + 1)
            stored = bytes(row["row_hash"] or b"")
            try:
                original = encoding.row_hash_at(row, around).get(stored)
            except encoding.EncodingError:
                original = None
            if original is not None and original != seq:
                return Problem(
                    seq=seq,
                    kind="moved",
                    detail=f"holds the signed row {original} (rows reordered, inserted or deleted and renumbered)",
                )
        return Problem(seq=seq, kind="altered", detail="its content does not match its hash")

    def signature(self, row: Mapping[str, Any], digest: bytes) -> bool:
        seq = row["seq"]
        if row["signature"] is None:
            self.report.unsigned_before_signing += 1
            return True
        if row["phase"] == "key":
            return self._key_row(row, digest)
        if self.active is None and self.adopt_key:  # the key in force was lost with the missing rows
            self.active, self.adopt_key = row["key_id"], False
        if row["key_id"] != self.active:
            self.report.add(
                Problem(
                    seq=seq,
                    kind="forged",
                    detail=f"signed as {row['key_id']}, not the chain's key {self.active}",
                )
            )
            return False
        if not verifies(self._key(self.active), bytes(row["signature"]), encoding.signed_message(digest)):
            self.report.add(
                Problem(
                    seq=seq, kind="forged", detail="its signature does not verify (re-hashed or inserted row)"
                )
            )
            return False
        return True

    def _key(self, kid: str | None) -> Ed25519PublicKey | None:
        return self.trusted.get(kid) if kid else None

    def _key_row(self, row: Mapping[str, Any], digest: bytes) -> bool:
        seq, raw = row["seq"], bytes(row["public_key"] or b"")
        try:
            new = public_key(raw)
        except ValueError:
            self.report.add(Problem(seq=seq, kind="altered", detail="key row without a valid public key"))
            return False
        if key_id(raw) != row["key_id"] or not verifies(
            new, bytes(row["signature"]), encoding.signed_message(digest)
        ):
            self.report.add(
                Problem(seq=seq, kind="forged", detail="key row not signed by the key it introduces")
            )
            return False
        endorsed = row["key_endorsement"] is not None and verifies(
            self._key(self.active), bytes(row["key_endorsement"]), encoding.endorsement_message(digest)
        )
        self.seen_keys.add(row["key_id"])
        if row["key_id"] not in self.trusted and not endorsed:
            self.report.add(
                Problem(
                    seq=seq,
                    kind="untrusted",
                    detail=f"introduces key {row['key_id']}, neither given nor endorsed by {self.active or 'a trusted key'}",
                )
            )
            return False
        self.trusted[row["key_id"]] = new
        self.active, self.signing_began = row["key_id"], True
        self.report.keys.append(row["key_id"])
        return True

    def row(self, row: Mapping[str, Any]) -> None:
        report = self.report
        in_sequence = self.sequence(row)
        digest = self.content(row)  # one problem a row: what it holds before how it links
        if digest is not None and self.signature(row, digest) and in_sequence:
            self.link(row)
        for checkpoint in self.by_seq.get(row["seq"], ()):
            if not hmac.compare_digest(checkpoint.head, bytes(row["row_hash"] or b"")):
                report.add(
                    Problem(
                        seq=row["seq"],
                        kind="rewritten",
                        detail=f"differs from the {checkpoint.kind} signed for this row",
                    )
                )
                break
        if self.until is not None and row["seq"] > self.until:
            report.add(
                Problem(
                    seq=row["seq"],
                    kind="inserted",
                    detail=f"comes after row {self.until}, where the cut seals the month",
                )
            )
        report.rows += 1
        report.first_seq = row["seq"] if report.first_seq is None else report.first_seq
        report.last_seq, report.head = row["seq"], bytes(row["row_hash"] or b"")
        self.prev_seq, self.prev_hash = row["seq"], bytes(row["row_hash"] or b"")


def verify_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    public_keys: Mapping[str, Ed25519PublicKey],
    checkpoints: list[Checkpoint],
    resume: Checkpoint | None = None,
    until: int | None = None,
) -> Report:
    """Walk the rows (in sequence order) and check them against the keys and checkpoints given.
    `resume`: a verification mark, already checked by the caller, the rows continue from.
    `until`: the rows are one month's export that ends at the cut at this row.
    Raises CheckpointError when no checkpoint is given or one does not verify."""
    if not public_keys:
        raise CheckpointError("no public key given: verification needs the auditor's public key")
    if not checkpoints:
        raise CheckpointError(
            "no checkpoint given: without one a cut tail or a rewritten chain cannot be told"
        )
    chain = _Chain(trusted=public_keys, checkpoints=checkpoints, resume=resume, until=until)
    chain.report.resumed = resume
    if resume is not None:  # nothing new is still a resumed verification, with the mark's key
        chain.active = resume.active_key
    if until is not None and until not in chain.cuts:
        raise CheckpointError(
            f"no signed cut at row {until}: the end of this month's export cannot be vouched for"
        )
    for row in rows:
        chain.row(row)
    chain.report.active_key = chain.active
    problems = chain.report.problems
    if not problems or problems[0].kind == "untrusted":  # otherwise the broken chain is the news
        _check_keys_given(public_keys, chain.seen_keys | {c.key_id for c in checkpoints})
    _check_signatures(chain, checkpoints)
    usable = [c for c in checkpoints if c.kind != CUT or chain.cuts.get(c.seq) is c]
    latest = chain.cuts[until] if until is not None else max(usable or checkpoints, key=lambda c: c.seq)
    chain.report.checkpoint = latest
    last = chain.report.last_seq if chain.report.last_seq is not None else (resume.seq if resume else 0)
    if last < latest.seq:
        chain.report.add(
            Problem(
                seq=last + 1,
                kind="truncated",
                detail=f"rows {last + 1}..{latest.seq} are gone (the {latest.kind} of {latest.at.isoformat()} vouches for them)",
            )
        )
    return chain.report


def _check_signatures(chain: _Chain, checkpoints: list[Checkpoint]) -> None:
    for number, checkpoint in enumerate(checkpoints, 1):
        if checkpoint.kind == CUT:
            continue  # checked before the walk
        try:
            checkpoint.check(chain.trusted, where=f"{checkpoint.kind} {number} (row {checkpoint.seq})")
        except CheckpointError as exc:
            if chain.report.intact:
                raise  # nothing else is wrong: the key or the checkpoint given is
            # A chain already found broken may have lost the key row that made the key trusted.
            chain.report.add(Problem(seq=checkpoint.seq, kind="rewritten", detail=str(exc)))


def _check_keys_given(given: Mapping[str, Ed25519PublicKey], used: set[str]) -> None:
    """A key the auditor gives that signed nothing here is the wrong key: say so, not "forged"."""
    if used and not set(given) & used:
        raise CheckpointError(
            f"none of the public keys given ({', '.join(sorted(given))}) signed this audit log or its"
            f" checkpoints (signed by {', '.join(sorted(used))}): wrong public key?"
        )
