"""The audit log's month partitions (sql/0014): made ahead of time as each run begins, and taken out
whole, oldest first, by `certsync audit detach` without breaking verification of what remains.

A cut takes out every month before `--before`, only after:
  * the whole log verifies with the signing key's public part and the signed checkpoints,
  * a signed checkpoint at or after the last row taken out vouches for those rows,
  * each month holds one contiguous stretch of the chain, older than every row that stays.
Then each month is exported (a file that verifies on its own), a signed cut is made at its last row
(appended to the checkpoint file and recorded in certsync.audit_cut), and the month is detached
from the table (kept as a plain table) or dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from certsync.audit import checkpoints, rows
from certsync.audit.checkpoints import CHECKPOINT, CUT, Checkpoint
from certsync.audit.signing import AuditSigner, public_key
from certsync.audit.verify import verify_rows

log = logging.getLogger(__name__)

MONTH_NAME = re.compile(r"^audit_log_(\d{4})_(\d{2})$")
PARTITIONS = sa.text(
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = 'certsync.audit_log'::regclass"
)


class CutRefused(RuntimeError):
    """The months cannot be taken out safely; nothing was changed."""


@dataclass(frozen=True, kw_only=True)
class Month:
    name: str
    month: date
    row_count: int
    first_seq: int | None
    last_seq: int | None

    @property
    def label(self) -> str:
        return f"{self.month:%Y-%m}"


def ensure(engine: Engine) -> list[str]:
    """This month's and next month's partitions, made with the owner's rights by the schema's own
    function. Never raises: a row without its month's partition lands in the default partition."""
    try:
        with engine.begin() as conn:
            made = [
                n
                for n in conn.execute(sa.text("SELECT certsync.audit_log_ensure_partitions()")).scalars()
                if n
            ]
    except sa.exc.SQLAlchemyError as exc:
        log.warning("audit partitions not checked (%s); rows go to the default partition", type(exc).__name__)
        return []
    return made


def parse_month(text: str) -> date:
    found = re.fullmatch(r"(\d{4})-(\d{2})", text.strip())
    if not found or not 1 <= int(found[2]) <= 12:
        raise ValueError(f"a month looks like YYYY-MM, not {text!r}")
    return date(int(found[1]), int(found[2]), 1)


def months(conn: Connection) -> list[Month]:
    """The attached month partitions, oldest first, with their row counts and sequence ranges."""
    found = []
    for name in conn.execute(PARTITIONS).scalars():
        matched = MONTH_NAME.match(name)
        if not matched:
            continue  # the default partition
        stats = conn.execute(
            sa.text(f"SELECT count(*) AS n, min(seq) AS lo, max(seq) AS hi FROM certsync.{name}")  # noqa: S608 - catalog name matched above
        ).one()
        found.append(
            Month(
                name=name,
                month=date(int(matched[1]), int(matched[2]), 1),
                row_count=stats.n,
                first_seq=stats.lo,
                last_seq=stats.hi,
            )
        )
    return sorted(found, key=lambda m: m.month)


def db_cuts(conn: Connection) -> list[Checkpoint]:
    """The signed cuts recorded in certsync.audit_cut (trusted by their signatures only)."""
    found = conn.execute(
        sa.text("SELECT month, cut FROM certsync.audit_cut WHERE cut IS NOT NULL ORDER BY month")
    )
    return [Checkpoint.from_json(r.cut, where=f"certsync.audit_cut {r.month:%Y-%m}") for r in found]


def _check_contiguous(conn: Connection, taken: list[Month], before: date) -> None:
    cut_at = datetime(before.year, before.month, 1, tzinfo=UTC)
    stray = conn.execute(
        sa.text("SELECT count(*) FROM certsync.audit_log_default WHERE at < :cut"), {"cut": cut_at}
    ).scalar_one()
    if stray:
        raise CutRefused(
            f"{stray} audit rows before {before:%Y-%m} sit in the default partition (no month partition"
            " was there when they were written); they cannot be cut by month"
        )
    remaining = conn.execute(
        sa.text("SELECT min(seq) FROM certsync.audit_log WHERE at >= :cut"), {"cut": cut_at}
    ).scalar()
    if remaining is None and any(m.row_count for m in taken):
        raise CutRefused(
            f"no audit row from {before:%Y-%m} on: the newest row stays, as the chain continues from it"
        )
    previous: Month | None = None
    for month in (m for m in taken if m.row_count):
        if previous is not None and month.first_seq != previous.last_seq + 1:
            raise CutRefused(f"{month.label} does not continue the chain of {previous.label}")
        previous = month
    if previous is not None and remaining is not None and remaining != previous.last_seq + 1:
        raise CutRefused(
            f"the rows kept do not start right after {previous.label} (row {remaining} after row"
            f" {previous.last_seq}): the clock stepped back across a month's end"
        )


def _verified(conn: Connection, *, signer: AuditSigner, given: list[Checkpoint], last_seq: int) -> Checkpoint:
    """Verify the whole log; return the signed checkpoint at or after `last_seq` that vouches for it."""
    keys = {k.key_id: public_key(k.public_raw) for k in (signer.key, signer.previous) if k is not None}
    report = verify_rows(rows.db_rows(conn), public_keys=keys, checkpoints=given)
    conn.rollback()
    if not report.intact:
        raise CutRefused(f"the audit log does not verify, nothing is cut: {report.problems[0]}")
    covering = [
        c for c in given if c.kind in (CHECKPOINT, CUT) and last_seq <= c.seq <= (report.last_seq or 0)
    ]
    if not covering:
        raise CutRefused(
            f"no signed checkpoint at or after row {last_seq} (the last row to be taken out): let a run"
            " finish (it signs one) and give its checkpoint file"
        )
    return min(covering, key=lambda c: c.seq)


def _cut_for(
    conn: Connection, month: Month, *, signer: AuditSigner, previous: Checkpoint | None
) -> Checkpoint:
    edge = conn.execute(
        sa.text(
            "SELECT (SELECT prev_hash FROM certsync.audit_log WHERE seq = :lo) AS first_prev,"
            " (SELECT row_hash FROM certsync.audit_log WHERE seq = :hi) AS head,"
            " (SELECT key_id FROM certsync.audit_log WHERE phase = 'key' AND seq <= :hi"
            "  ORDER BY seq DESC LIMIT 1) AS active_key, clock_timestamp() AS now"
        ),
        {"lo": month.first_seq, "hi": month.last_seq},
    ).one()
    return checkpoints.sign(
        kind=CUT,
        seq=month.last_seq,
        head=bytes(edge.head),
        at=edge.now,
        key=signer.key,
        first_seq=month.first_seq,
        first_prev=bytes(edge.first_prev),
        active_key=edge.active_key or (previous.active_key if previous else None),
        label=month.label,
    )


def _export(conn: Connection, month: Month, *, directory: Path, cuts: list[Checkpoint]) -> tuple[Path, str]:
    """Write the month's export (with its cuts in the header) durably; returns its path and SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{month.name}.jsonl"
    partial = path.with_suffix(".jsonl.partial")
    segment = {
        "label": month.label,
        "first_seq": month.first_seq,
        "last_seq": month.last_seq,
        "cuts": [c.to_json() for c in cuts],
    }
    with partial.open("w") as handle:
        rows.export(conn, handle, table=month.name, segment=segment)
        handle.flush()
        os.fsync(handle.fileno())
    conn.rollback()
    os.replace(partial, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def verify_export(path: Path, *, keys: dict[str, Any], given: Iterable[Checkpoint] = ()) -> Any:
    """Verify one export: a whole log against the checkpoints, or a month's export against the cuts
    in its header (and any given) up to the cut at its end."""
    header = rows.export_header(path)
    segment = header.get("segment")
    carried = [*(segment or {}).get("cuts", []), *header.get("cuts", [])]
    extra = [Checkpoint.from_json(c, where=f"{path.name} header") for c in carried]
    until = int(segment["last_seq"]) if segment else None
    return verify_rows(rows.export_rows(path), public_keys=keys, checkpoints=[*given, *extra], until=until)


@dataclass(frozen=True, kw_only=True)
class Taken:
    month: Month
    cut: Checkpoint | None
    export: Path | None


def detach(
    engine: Engine,
    *,
    before: date,
    signer: AuditSigner,
    given: list[Checkpoint],
    export_dir: Path,
    checkpoint_dir: Path | None,
    drop: bool,
) -> list[Taken]:
    """Take every month before `before` out of the audit log (see the module's doc); returns what
    was taken. Raises CutRefused, changing nothing, when it is not safe."""
    this_month = datetime.now(UTC).date().replace(day=1)
    if before > this_month:
        raise CutRefused(f"only past months can be taken out: {before:%Y-%m} is after {this_month:%Y-%m}")
    with engine.connect() as conn:
        known = [*given, *db_cuts(conn)]
        taken = [m for m in months(conn) if m.month < before]
        if not taken:
            return []
        _check_contiguous(conn, taken, before)
        with_rows = [m for m in taken if m.row_count]
        vouching = (
            _verified(conn, signer=signer, given=known, last_seq=with_rows[-1].last_seq)
            if with_rows
            else None
        )
        done = _seal_and_export(conn, taken, signer=signer, known=known, export_dir=export_dir)
    for item in done:
        if item.cut is not None and checkpoint_dir is not None:
            checkpoints.append(checkpoint_dir, item.cut)
    _take_out(engine, done, vouching=vouching, drop=drop)
    return done


def _seal_and_export(
    conn: Connection, taken: list[Month], *, signer: AuditSigner, known: list[Checkpoint], export_dir: Path
) -> list[Taken]:
    keys = {k.key_id: public_key(k.public_raw) for k in (signer.key, signer.previous) if k is not None}
    cuts = {c.seq: c for c in known if c.kind == CUT}
    done = []
    for month in taken:
        if not month.row_count:
            done.append(Taken(month=month, cut=None, export=None))
            continue
        before = cuts.get(month.first_seq - 1)
        cut = _cut_for(conn, month, signer=signer, previous=before)
        conn.rollback()
        path, _ = _export(conn, month, directory=export_dir, cuts=[c for c in (before, cut) if c])
        report = verify_export(path, keys=keys)
        if not report.intact:
            raise CutRefused(f"the export of {month.label} does not verify: {report.problems[0]}")
        cuts[cut.seq] = cut
        done.append(Taken(month=month, cut=cut, export=path))
    return done


def _take_out(engine: Engine, done: list[Taken], *, vouching: Checkpoint | None, drop: bool) -> None:
    """Record the cuts and detach (or drop) the months, in one transaction."""
    with engine.begin() as conn:
        for item in done:
            month, cut = item.month, item.cut
            conn.execute(
                sa.text(
                    "INSERT INTO certsync.audit_cut (month, partition_name, action, row_count, first_seq,"
                    " last_seq, first_prev_hash, last_hash, active_key, vouched_by_seq, vouched_by_head,"
                    " export_sha256, cut) VALUES (:month, :name, :action, :n, :lo, :hi, :first_prev, :head,"
                    " :active, :v_seq, :v_head, :sha, CAST(:cut AS jsonb))"
                ),
                {
                    "month": month.month,
                    "name": month.name,
                    "action": "dropped" if drop else "detached",
                    "n": month.row_count,
                    "lo": month.first_seq,
                    "hi": month.last_seq,
                    "first_prev": cut.first_prev if cut else None,
                    "head": cut.head if cut else None,
                    "active": cut.active_key if cut else None,
                    "v_seq": vouching.seq if cut and vouching else None,
                    "v_head": vouching.head if cut and vouching else None,
                    "sha": hashlib.sha256(item.export.read_bytes()).hexdigest() if item.export else None,
                    "cut": json.dumps(cut.to_json()) if cut else None,
                },
            )
            conn.execute(sa.text(f"ALTER TABLE certsync.audit_log DETACH PARTITION certsync.{month.name}"))
            if drop:
                conn.execute(sa.text(f"DROP TABLE certsync.{month.name}"))
            log.info(
                "audit month %s (%d rows) %s", month.label, month.row_count, "dropped" if drop else "detached"
            )
