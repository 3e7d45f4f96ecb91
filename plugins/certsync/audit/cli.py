"""`certsync audit`: verify the audit log (in the database or an export, offline), export it, and
make a signing key.

    certsync audit keygen --out-dir keys/
    certsync audit verify --public-key auditor.pub --checkpoint checkpoints.jsonl [--dsn ...]
    certsync audit export --out audit.jsonl [--dsn ...]
    certsync audit verify --export audit.jsonl --public-key auditor.pub --checkpoint checkpoints.jsonl
    certsync audit detach --before 2026-01 --export-dir exports/ [--drop] [--owner-dsn ...]
    certsync audit verify --export exports/audit_log_2025_11.jsonl --public-key auditor.pub

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
    from certsync.audit.partitions import verify_export
    from certsync.audit.rows import ExportError, export_header
    from certsync.audit.signing import AuditKeyError, read_public_keys

    if not public_keys:
        _fail("no --public-key given (the auditor's copy of the audit signing public key)")
    try:
        # A month's export carries the signed cuts at its ends; anything else needs a checkpoint file.
        segment = export_file is not None and "segment" in export_header(export_file)
        if not checkpoint_files and not segment:
            _fail("no --checkpoint given (the checkpoint file kept outside the database)")
        keys = read_public_keys(list(public_keys))
        given = [c for path in checkpoint_files for c in read(path)]
        if export_file is not None:
            report = verify_export(export_file, keys=keys, given=given)
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

    from certsync.audit.partitions import db_cuts
    from certsync.audit.rows import db_rows
    from certsync.audit.verify import verify_rows
    from certsync.store import db

    engine = db.create_engine(dsn)
    try:
        with engine.connect() as conn:
            # Cuts of months taken out are signed: read from anywhere, trusted by their signature.
            cuts = db_cuts(conn)
            conn.rollback()
            return verify_rows(db_rows(conn), public_keys=keys, checkpoints=[*checkpoints, *cuts])
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
    from certsync.audit.partitions import db_cuts
    from certsync.audit.rows import export
    from certsync.store import db

    engine = db.create_engine(_dsn(ctx, dsn))
    try:
        with engine.connect() as conn, out.open("w") as handle:
            cuts = [c.to_json() for c in db_cuts(conn)]
            conn.rollback()
            count = export(conn, handle, cuts=cuts)
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


@audit.command("detach")
@click.option("--before", required=True, help="Take out every month before this one (YYYY-MM).")
@click.option(
    "--export-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Where each month taken out is written first (audit_log_YYYY_MM.jsonl; verifies on its own).",
)
@click.option("--drop", is_flag=True, help="Drop the months instead of detaching them into plain tables.")
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Checkpoint file (default: the one in audit_checkpoint_dir); repeatable.",
)
@click.option(
    "--owner-dsn",
    envvar="CERTSYNC_OWNER_DSN",
    default=None,
    help="The schema owner's DSN (default: the owner's connection, as for `certsync db upgrade`).",
)
def detach_command(
    before: str, export_dir: Path, drop: bool, checkpoint_files: tuple[Path, ...], owner_dsn: str | None
) -> None:
    """Take whole months out of the audit log, oldest first, keeping the rest verifiable.

    Refused unless the whole log verifies and a signed checkpoint at or after the last row taken out
    vouches for it. Each month is exported, sealed by a signed cut (appended to the checkpoint file
    and recorded in certsync.audit_cut), then detached or dropped. Needs the signing key
    (connection certsync_audit_signing) and the owner's rights."""
    from certsync.audit import partitions
    from certsync.audit.checkpoints import CheckpointError
    from certsync.store import db

    try:
        month = partitions.parse_month(before)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--before") from None
    dsn, signer, directory = _owner_settings(owner_dsn)
    engine = db.create_engine(dsn)
    try:
        given = _given_checkpoints(checkpoint_files, directory)
        done = partitions.detach(
            engine,
            before=month,
            signer=signer,
            given=given,
            export_dir=export_dir,
            checkpoint_dir=directory,
            drop=drop,
        )
    except (partitions.CutRefused, CheckpointError) as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(NOT_CHECKED)
    finally:
        engine.dispose()
    if not done:
        click.echo(f"no month before {before} left in the audit log")
    for item in done:
        span = f"rows {item.month.first_seq}..{item.month.last_seq}" if item.cut else "no rows"
        where = f", export {item.export}" if item.export else ""
        click.echo(f"{item.month.label}: {span} {'dropped' if drop else 'detached'}{where}")


def _owner_settings(owner_dsn: str | None):  # type: ignore[no-untyped-def]
    """The owner's DSN, the audit signer and the checkpoint directory, from the configuration."""
    from certsync.audit.signing import AUDIT_SIGNING_CONN_ID
    from certsync.config import (
        CONFIG_VARIABLE,
        POSTGRES_OWNER_CONN_ID,
        ConfigError,
        EnvSource,
        _config_variable,
        _optional_path,
        audit_signer,
        database_dsn,
    )

    source = EnvSource()
    try:
        owner = source.connection(POSTGRES_OWNER_CONN_ID)
        dsn = owner_dsn or (database_dsn(owner) if owner else None)
        if not dsn:
            raise ConfigError(
                f"connection {POSTGRES_OWNER_CONN_ID!r} is not configured and no --owner-dsn was given"
            )
        signer = audit_signer(source.connection(AUDIT_SIGNING_CONN_ID))
        if signer is None:
            raise ConfigError(f"connection {AUDIT_SIGNING_CONN_ID!r} is not configured: a cut is signed")
        config = _config_variable(source, CONFIG_VARIABLE)
        directory = _optional_path(config, "audit_checkpoint_dir", where=f"variable {CONFIG_VARIABLE!r}")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return dsn, signer, directory


def _given_checkpoints(files: tuple[Path, ...], directory: Path | None) -> list:
    from certsync.audit.checkpoints import FILE_NAME, read

    paths = list(files) or ([directory / FILE_NAME] if directory and (directory / FILE_NAME).exists() else [])
    if not paths:
        _fail("no --checkpoint given and no checkpoint file in audit_checkpoint_dir")
    return [c for path in paths for c in read(path)]
