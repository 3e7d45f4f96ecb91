"""The audit rows as the verifier reads them: a plain SELECT of the table's columns (no view, no
function of the schema), or an export file (JSON lines) for verification away from the database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.audit import encoding

EXPORT_FORMAT = "certsync-audit-export"
EXPORT_VERSION = 1
# Only pg_catalog resolves names in the reading session: nobody's operator or function in another
# schema stands in for the built-in ones.
SAFE_PATH = sa.text("SET LOCAL search_path = pg_catalog, pg_temp")
SELECT = (
    f"SELECT {', '.join(encoding.COLUMNS)} FROM certsync.{{table}}"  # noqa: S608 - fixed column names
    " WHERE seq > :after ORDER BY seq"
)


class ExportError(ValueError):
    """An export file cannot be read as one."""


def db_rows(
    conn: Connection, *, after: int = 0, batch: int = 10_000, table: str = "audit_log"
) -> Iterator[dict[str, Any]]:
    """Rows in sequence order, streamed (a server-side cursor, `batch` rows at a time); `table` is
    the audit log or one of its month partitions (detached or not)."""
    if not table.replace("_", "").isalnum():
        raise ValueError(f"not an audit table name: {table!r}")
    if not conn.in_transaction():
        conn.begin()
    conn.execute(SAFE_PATH)
    result = conn.execute(
        sa.text(SELECT.format(table=table)),
        {"after": after},
        execution_options={"stream_results": True, "yield_per": batch},
    )
    for row in result:
        yield dict(row._mapping)


def _to_json(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == encoding.BYTES:
        return bytes(value).hex()
    if kind == encoding.BYTES_LIST:
        return [bytes(v).hex() for v in value]
    if kind in (encoding.UUID, encoding.TIME):
        return str(value) if kind == encoding.UUID else value.isoformat()
    return value


def _from_json(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == encoding.BYTES:
        return bytes.fromhex(value)
    if kind == encoding.BYTES_LIST:
        return [bytes.fromhex(v) for v in value]
    if kind == encoding.UUID:
        return uuid.UUID(value)
    if kind == encoding.TIME:
        return datetime.fromisoformat(value)
    return value


def export(
    conn: Connection,
    out: IO[str],
    *,
    table: str = "audit_log",
    segment: dict[str, Any] | None = None,
    cuts: list[dict[str, Any]] | None = None,
) -> int:
    """Write every row as one JSON line (bytes as hex, times in ISO 8601 with microseconds) after a
    header line; returns the row count. `segment` marks the export of one month taken out of the
    log: its label, first and last row and the signed cuts at its start and end, so that it
    verifies on its own. `cuts`: the signed cuts of months taken out before, so that an export of
    what remains verifies with the checkpoints alone."""
    header: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "columns": list(encoding.COLUMNS),
    }
    if segment is not None:
        header["segment"] = segment
    if cuts:
        header["cuts"] = cuts
    out.write(json.dumps(header) + "\n")
    count = 0
    for row in db_rows(conn, table=table):
        out.write(
            json.dumps({c: _to_json(encoding.COLUMN_TYPES[c], row[c]) for c in encoding.COLUMNS}) + "\n"
        )
        count += 1
    return count


def export_header(path: Path) -> dict[str, Any]:
    """The header line of an export file (checked to be one)."""
    where = f"export file {str(path)!r}"
    try:
        with path.open() as handle:
            header = _json_line(handle.readline(), where=f"{where}, line 1")
    except OSError as exc:
        raise ExportError(f"{where} cannot be read: {exc.strerror}") from None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{where} is not a certsync audit export")
    return header


def export_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of an export file, typed back as the database returned them."""
    where = f"export file {str(path)!r}"
    try:
        handle = path.open()
    except OSError as exc:
        raise ExportError(f"{where} cannot be read: {exc.strerror}") from None
    with handle:
        header = _json_line(handle.readline(), where=f"{where}, line 1")
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise ExportError(f"{where} is not a certsync audit export")
        for number, line in enumerate(handle, 2):
            data = _json_line(line, where=f"{where}, line {number}")
            try:
                row = {c: _from_json(encoding.COLUMN_TYPES[c], data.get(c)) for c in encoding.COLUMNS}
            except (TypeError, ValueError, AttributeError) as exc:
                raise ExportError(f"{where}, line {number}: unreadable value ({exc})") from None
            if not isinstance(row["seq"], int) or isinstance(row["seq"], bool):
                raise ExportError(f"{where}, line {number}: no sequence number")
            yield row


def _json_line(line: str, *, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise ExportError(f"{where} is not JSON") from None
