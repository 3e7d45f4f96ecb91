"""The Postgres connection: engines, the schema check, and migrations with the owner's credentials.

certsync never starts a database: the run-time connection logs in as the least-privileged
`certsync_app` role, and `certsync db upgrade` applies sql/ as the schema's owner.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from psycopg import pq
from psycopg.adapt import Dumper
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

APP_ROLE = "certsync_app"
AUDITOR_ROLE = "certsync_auditor"


class DatabaseError(RuntimeError):
    """The database could not be reached or migrated; the message never contains the password."""


class SchemaError(DatabaseError):
    """The schema is not what this version of certsync needs (pending migrations, wrong login)."""


def sql_dir() -> Path:
    """The schema files, shipped inside the package (a wheel install carries them too)."""
    return Path(str(resources.files("certsync.sql")))


def migration_ids() -> list[str]:
    return sorted(p.stem for p in sql_dir().glob("*.sql"))


def _sqlalchemy_url(dsn: str) -> sa.URL:
    url = make_url(dsn)
    return url.set(drivername="postgresql+psycopg")


def _safe(dsn: str) -> str:
    return make_url(dsn).render_as_string(hide_password=True)


def create_engine(dsn: str) -> Engine:
    """An engine for the run-time login (certsync_app): the audit log's grants bind it. A stage can
    hold a few sessions at once: the run's lease, the run lock (and a whole CLI run's), and its work.
    Its transactions are READ COMMITTED whatever the login's default_transaction_isolation says:
    the reference checks (sql/0028) need a new snapshot per statement and refuse the other levels."""
    return sa.create_engine(
        _sqlalchemy_url(dsn),
        pool_pre_ping=True,
        pool_size=2,
        max_overflow=4,
        isolation_level="READ COMMITTED",
    )


def hash_list(values: Iterable[bytes] | None) -> tuple[bytes, ...]:
    """A bytea[] column of SHA-256 digests as the tuple of bytes the plan compares."""
    return tuple(bytes(v) for v in values or ())


_HELD = "certsync_held_statements"


def execute_or_hold(conn: sa.Connection, statement: sa.TextClause, params: dict) -> None:
    """Execute a statement whose result nobody reads; inside held(conn), at the block's end."""
    held = conn.info.get(_HELD)
    if held is None:
        conn.execute(statement, params)
    else:
        held.setdefault(statement.text, (statement, []))[1].append(params)


@contextmanager
def held(conn: sa.Connection) -> Iterator[None]:
    """Statements given to execute_or_hold in the block run when it ends, each text once with all
    its parameter sets (pipelined: one round trip per text instead of one per call). For writes to
    different rows, whose order does not matter."""
    conn.info[_HELD] = statements = {}
    try:
        yield
    finally:
        del conn.info[_HELD]
    for statement, params in statements.values():
        conn.execute(statement, params)


# "COPY <table> [(<columns>)] FROM STDIN", as every bulk load of certsync's is written.
_COPY_IN = re.compile(r"\s*COPY\s+(?P<table>[\w.]+)\s*(?:\((?P<columns>[^)]*)\))?\s+FROM\s+STDIN\s*", re.I)
_COLUMN_TYPES = """SELECT attname, atttypid::int FROM pg_attribute
WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"""


def copy_rows(conn: sa.Connection, statement: str, rows: Iterable[tuple]) -> int:
    """Bulk-load rows with a binary COPY on the connection's own transaction; returns the row count.
    Binary, because in text a certificate value travels hex-encoded, twice its size, and the server
    parses every digit back: binary took half the client's CPU and 45% less of the server's."""
    count = 0
    with conn.connection.driver_connection.cursor() as cur:
        types = _types_of(cur, statement)  # asked each time: one catalog read, against a page of rows
        for dumper in (_TextArrayDumper, _ByteaArrayDumper):
            cur.adapters.register_dumper(None, dumper)  # by type OID, for this cursor only
        with cur.copy(f"{statement.strip()} (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
                count += 1
    return count


def _types_of(cur: Any, statement: str) -> list[int]:
    """The type OIDs of a COPY statement's columns, in its order, from the catalog (binary COPY
    needs each value dumped as exactly its column's type)."""
    target = _COPY_IN.fullmatch(statement)
    if target is None:
        raise ValueError(f"not a COPY ... FROM STDIN statement: {statement!r}")
    types = dict(cur.execute(_COLUMN_TYPES, (target["table"],)).fetchall())
    columns = target["columns"]
    return [types[c.strip()] for c in columns.split(",")] if columns else list(types.values())


def check(dsn: str) -> None:
    """Connect once; raise DatabaseError naming the (password-free) DSN if that fails."""
    engine = sa.create_engine(_sqlalchemy_url(dsn))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"cannot connect to database {_safe(dsn)}: {_reason(exc)}") from None
    finally:
        engine.dispose()


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__


def check_schema(engine: Engine) -> None:
    """Fail unless every shipped migration is applied and the login is not the schema's owner or a
    superuser (which could bypass the audit log's guards)."""
    try:
        with engine.connect() as conn:
            applied = set(conn.execute(sa.text("SELECT migration_id FROM _yoyo_migration")).scalars())
            powerful = conn.execute(
                sa.text(
                    "SELECT r.rolsuper OR pg_has_role(current_user, n.nspowner, 'USAGE')"
                    " FROM pg_roles r, pg_namespace n WHERE r.rolname = current_user AND n.nspname = 'certsync'"
                )
            ).scalar()
    except sa.exc.ProgrammingError:
        raise SchemaError("the certsync schema is not installed: run `certsync db upgrade`") from None
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema's version: {_reason(exc)}") from None
    pending = [m for m in migration_ids() if m not in applied]
    if pending:
        raise SchemaError(
            f"{len(pending)} migrations pending ({', '.join(pending)}): run `certsync db upgrade`"
        )
    if powerful:
        raise SchemaError(
            f"logs in as {engine.url.username!r}, a superuser or the schema's owner; log in as {APP_ROLE}"
        )


def migrate(owner_dsn: str, *, app_password: str | None = None) -> list[str]:
    """Apply the schema files in order as the schema's owner (yoyo keeps track); returns the ids
    applied now. With `app_password`, certsync_app can then log in with it."""
    from yoyo import get_backend, read_migrations

    check(owner_dsn)
    backend = get_backend(_sqlalchemy_url(owner_dsn).render_as_string(hide_password=False))
    # The folder is also a Python package: its __init__.py is no migration.
    migrations = read_migrations(str(sql_dir())).filter(lambda m: m.path.endswith(".sql"))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations %s", ", ".join(applied))
    if app_password:
        _set_password(owner_dsn, APP_ROLE, app_password)
    return applied


def _set_password(owner_dsn: str, role: str, password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        _sqlalchemy_url(owner_dsn).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    log.info("password of role %s set from its connection", role)


# An array's binary form: dimensions, has-NULL flag, element type, then per dimension its length and
# lower bound; then each element as its length (-1 for NULL) and bytes.
_ARRAY_HEAD = struct.Struct("!iiiii")
_EMPTY_ARRAY = struct.Struct("!iii")
_LENGTH = struct.Struct("!i")
_NULL = _LENGTH.pack(-1)


class _FlatArrayDumper(Dumper):
    """One-dimensional arrays of one element type, binary, for COPY. psycopg's own list dumper
    handles any depth and element type: for the verdicts' addresses it took about a third of the
    validate stage's client CPU."""

    format = pq.Format.BINARY
    element_oid = 0
    element_types: tuple[type, ...] = ()

    def dump(self, obj: Any) -> bytes:
        if not obj:
            return _EMPTY_ARRAY.pack(0, 0, self.element_oid)
        parts, nulls = [], 0
        for item in obj:
            if item is None:
                parts.append(_NULL)
                nulls = 1
                continue
            if not isinstance(item, self.element_types):
                raise TypeError(
                    f"{type(self).__name__} takes a flat sequence, not {type(item).__name__} items"
                )
            data = self.element_bytes(item)
            parts += (_LENGTH.pack(len(data)), data)
        return _ARRAY_HEAD.pack(1, nulls, self.element_oid, len(obj), 1) + b"".join(parts)

    def element_bytes(self, item: Any) -> bytes:
        raise NotImplementedError


class _TextArrayDumper(_FlatArrayDumper):
    oid, element_oid, element_types = 1009, 25, (str,)  # text[], text

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self._encoding = self.connection.info.encoding if self.connection else "utf-8"

    def element_bytes(self, item: str) -> bytes:
        return item.encode(self._encoding)


class _ByteaArrayDumper(_FlatArrayDumper):
    oid, element_oid, element_types = 1001, 17, (bytes, bytearray, memoryview)  # bytea[], bytea

    def element_bytes(self, item: bytes) -> bytes:
        return bytes(item)
