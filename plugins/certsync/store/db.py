"""The Postgres connection: engine, migrations, the application role, and the embedded default."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[3] / "sql"
APP_ROLE = "certsync_app"


class DatabaseError(RuntimeError):
    """The database could not be reached or migrated; the message never contains the password."""


def certsync_home() -> Path:
    """Where the embedded services keep their data unless told otherwise."""
    return Path(os.environ.get("CERTSYNC_HOME", ".certsync")).resolve()


def embedded_dsn(home: Path | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL under <home>/postgres and return its DSN."""
    from certsync.lab.postgres import EmbeddedPostgres  # only needed when no DSN is configured

    server = EmbeddedPostgres(data_dir=(home or certsync_home()) / "postgres")
    server.start()
    return server.dsn


def _sqlalchemy_url(dsn: str) -> sa.URL:
    url = make_url(dsn)
    return url.set(drivername="postgresql+psycopg")


def _safe(dsn: str) -> str:
    return make_url(dsn).render_as_string(hide_password=True)


def create_engine(dsn: str, *, app_role: bool = True) -> Engine:
    """An engine whose connections act as the application role, so the audit log's
    grants (insert and select only) bind the pipeline even when the DSN names the owner."""
    engine = sa.create_engine(_sqlalchemy_url(dsn), pool_pre_ping=True, pool_size=2, max_overflow=2)
    if app_role:

        @sa.event.listens_for(engine, "connect")
        def _set_role(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            with dbapi_conn.cursor() as cur:
                cur.execute(f"SET ROLE {APP_ROLE}")
            dbapi_conn.commit()

    return engine


def hash_list(values: Iterable[bytes] | None) -> tuple[bytes, ...]:
    """A bytea[] column of SHA-256 digests as the tuple of bytes the plan compares."""
    return tuple(bytes(v) for v in values or ())


def copy_rows(conn: sa.Connection, statement: str, rows: Iterable[tuple]) -> int:
    """Bulk-load rows with COPY on the connection's own transaction; returns the row count."""
    count = 0
    with conn.connection.driver_connection.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def check(dsn: str) -> None:
    """Connect once; raise DatabaseError naming the (password-free) DSN if that fails."""
    engine = sa.create_engine(_sqlalchemy_url(dsn))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseError(f"cannot connect to database {_safe(dsn)}: {reason}") from None
    finally:
        engine.dispose()


def migrate(dsn: str) -> list[str]:
    """Apply the schema files in sql/ in order (yoyo keeps track); returns the ids applied now."""
    from yoyo import get_backend, read_migrations

    check(dsn)
    backend = get_backend(str(_sqlalchemy_url(dsn).render_as_string(hide_password=False)))
    migrations = read_migrations(str(SQL_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations %s", ", ".join(applied))
    return applied
