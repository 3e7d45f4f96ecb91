"""`certsync audit`: verify the audit log (in the database or an export, offline), export it, and
make a signing key.

    certsync audit keygen --out-dir keys/
    certsync audit verify --public-key auditor.pub --checkpoint checkpoints.jsonl [--dsn ...]
    certsync audit export --out audit.jsonl [--dsn ...]
    certsync audit verify --export audit.jsonl --public-key auditor.pub --checkpoint checkpoints.jsonl

Exit codes of verify: 0 intact, 1 a problem found (the first altered, inserted, deleted, moved or
truncated row is named), 2 it could not be checked (a key, checkpoint or export missing or wrong).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

NOT_CHECKED = 2


def _dsn(ctx: click.Context, dsn: str | None) -> str:
    """The DSN given, else the store's connection (certsync_postgres or the group's --postgres-conn-id)."""
    from certsync.config import POSTGRES_CONN_ID, ConfigError, EnvSource, database_dsn

    if dsn:
        return dsn
    conn_id = (ctx.find_root().obj or {}).get("postgres_conn_id", POSTGRES_CONN_ID)
    try:
        conn = EnvSource().connection(conn_id)
        if conn is None:
            raise ConfigError(
                f"give --dsn, or configure the connection {conn_id!r} (AIRFLOW_CONN_{conn_id.upper()})"
            )
        return database_dsn(conn)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _fail(message: str) -> None:
    click.echo(f"cannot verify: {message}", err=True)
    sys.exit(NOT_CHECKED)


@click.group("audit")
def audit() -> None:
    """The signed audit log: verify, export, keys."""


@audit.command("verify")
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="File of trusted Ed25519 public keys (base64, one a line, or PEM); repeatable.",
)
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Checkpoint file (JSON lines, as each run appends them); repeatable.",
)
@click.option(
    "--export",
    "export_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify this export (from `certsync audit export`) instead of the database.",
)
@click.option(
    "--dsn",
    envvar="CERTSYNC_AUDIT_DSN",
    default=None,
    help="libpq URI of the store, e.g. as certsync_auditor (default: the certsync_postgres connection).",
)
@click.pass_context
def verify_command(
    ctx: click.Context,
    public_keys: tuple[Path, ...],
    checkpoint_files: tuple[Path, ...],
    export_file: Path | None,
    dsn: str | None,
) -> None:
    """Recompute every row's hash and signature and check the chain against the checkpoints."""
    from certsync.audit.checkpoints import CheckpointError, read
    from certsync.audit.rows import ExportError, export_rows
    from certsync.audit.signing import AuditKeyError, read_public_keys
    from certsync.audit.verify import verify_rows

    if not public_keys:
        _fail("no --public-key given (the auditor's copy of the audit signing public key)")
    if not checkpoint_files:
        _fail("no --checkpoint given (the checkpoint file kept outside the database)")
    try:
        keys = read_public_keys(list(public_keys))
        given = [c for path in checkpoint_files for c in read(path)]
        if export_file is not None:
            report = verify_rows(export_rows(export_file), public_keys=keys, checkpoints=given)
        else:
            report = _verify_database(_dsn(ctx, dsn), keys=keys, checkpoints=given)
    except (AuditKeyError, CheckpointError, ExportError) as exc:
        _fail(str(exc))
    for problem in report.problems:
        click.echo(str(problem))
    if report.problem_count > len(report.problems):
        click.echo(f"... and {report.problem_count - len(report.problems)} more")
    click.echo(report.summary())
    sys.exit(0 if report.intact else 1)


def _verify_database(dsn: str, *, keys, checkpoints):  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from certsync.audit.rows import db_rows
    from certsync.audit.verify import verify_rows
    from certsync.store import db

    engine = db.create_engine(dsn)
    try:
        with engine.connect() as conn:
            return verify_rows(db_rows(conn), public_keys=keys, checkpoints=checkpoints)
    except sa.exc.SQLAlchemyError as exc:
        _fail(f"cannot read the audit log: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}")
    finally:
        engine.dispose()


@audit.command("export")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON-lines file to write.")
@click.option(
    "--dsn",
    envvar="CERTSYNC_AUDIT_DSN",
    default=None,
    help="libpq URI of the store (default: the certsync_postgres connection).",
)
@click.pass_context
def export_command(ctx: click.Context, out: Path, dsn: str | None) -> None:
    """Write every audit row, as stored, to a JSON-lines file that verifies offline."""
    from certsync.audit.rows import export
    from certsync.store import db

    engine = db.create_engine(_dsn(ctx, dsn))
    try:
        with engine.connect() as conn, out.open("w") as handle:
            count = export(conn, handle)
    finally:
        engine.dispose()
    click.echo(f"{count} rows written to {out}")


@audit.command("keygen")
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Writes signing.key (the connection's password, keep it secret) and public.key (for auditors).",
)
def keygen_command(out_dir: Path) -> None:
    """Make an Ed25519 audit signing key."""
    from certsync.audit.signing import SigningKey

    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / "signing.key", out_dir / "public.key"
    if private.exists():
        raise click.ClickException(f"{private} exists; refusing to overwrite a signing key")
    key = SigningKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as handle:
        handle.write(key.private_text() + "\n")
    public.write_text(key.public_text() + "\n")
    click.echo(
        f"key {key.key_id}: {private} (secret: put it in the connection certsync_audit_signing), {public}"
    )
