"""The `certsync` command: migrate the schema, check settings, run the sync without a scheduler,
validate certificate files, read the summary and the audit chain.

Settings come from the same AIRFLOW_CONN_* / AIRFLOW_VAR_* names the DAG uses. The lab's
`certsync-lab up` writes them for a local stack (`certsync-lab exec certsync run`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from certsync.config import (
    EXCHANGE_CONN_ID,
    LDAP_CONN_ID,
    POSTGRES_CONN_ID,
    POSTGRES_OWNER_CONN_ID,
    ConfigError,
    EnvSource,
    load_settings,
)

if TYPE_CHECKING:  # the pipeline loads SQLAlchemy, ldap3 and msal: only commands that run it import it
    from certsync.pipeline import Services

log = logging.getLogger("certsync")
F = TypeVar("F", bound=Callable[..., Any])


def _services() -> Services:
    """The services for the connection ids given to the group (certsync_* by default)."""
    from certsync.pipeline import Services

    conn_ids = click.get_current_context().find_root().obj or {}
    try:
        return Services(settings=load_settings(EnvSource(), **conn_ids))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _conn_id_option(name: str, default: str, what: str) -> Callable[[F], F]:
    return click.option(
        f"--{name.replace('_', '-')}",
        name,
        default=default,
        show_default=True,
        envvar=f"CERTSYNC_{name.upper()}",
        help=f"Connection id of {what} (read from AIRFLOW_CONN_<ID>).",
    )


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@_conn_id_option("ldap_conn_id", LDAP_CONN_ID, "the Active Directory")
@_conn_id_option("exchange_conn_id", EXCHANGE_CONN_ID, "the Exchange Online tenant")
@_conn_id_option("postgres_conn_id", POSTGRES_CONN_ID, "the store (the certsync_app login)")
@click.pass_context
def main(ctx: click.Context, verbose: bool, **conn_ids: str) -> None:
    """certsync: S/MIME certificates from Active Directory to Exchange Online."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = conn_ids


@main.group()
def db() -> None:
    """The schema in PostgreSQL."""


@db.command("upgrade")
@click.option(
    "--owner-dsn",
    envvar="CERTSYNC_OWNER_DSN",
    default=None,
    help="The schema owner's DSN (default: the owner's connection).",
)
@_conn_id_option("owner_conn_id", POSTGRES_OWNER_CONN_ID, "the schema's owner")
def db_upgrade(owner_dsn: str | None, owner_conn_id: str) -> None:
    """Apply pending migrations as the schema's owner; sets certsync_app's password from the
    store's connection when that has one."""
    from certsync.config import database_dsn
    from certsync.store.db import DatabaseError, migrate

    source = EnvSource()
    app_conn_id = (click.get_current_context().find_root().obj or {}).get(
        "postgres_conn_id", POSTGRES_CONN_ID
    )
    try:
        owner = source.connection(owner_conn_id)
        dsn = owner_dsn or (database_dsn(owner) if owner else None)
        if not dsn:
            raise ConfigError(f"connection {owner_conn_id!r} is not configured and no --owner-dsn was given")
        app = source.connection(app_conn_id)
        applied = migrate(dsn, app_password=app.password if app else None)
    except (ConfigError, DatabaseError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"schema current; applied now: {', '.join(applied) or 'nothing'}")


@main.command()
def check() -> None:
    """Check every setting against the real systems (and that the schema is current); writes nothing."""
    from certsync.pipeline import preflight

    try:
        fingerprint = preflight(_services())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"settings OK (trust configuration {fingerprint[:16]})")


@main.command()
@click.option("--dry-run", is_flag=True, help="Plan, but publish nothing.")
@click.option("--allow-mass-removal", is_flag=True, help="Ignore the removal threshold for this run.")
@click.option("--run-id", "airflow_run_id", default=None, help="Run key (re-using one resumes that run).")
@click.option(
    "--full", is_flag=True, help="Read the whole directory, not only what changed since the last run."
)
def run(dry_run: bool, allow_mass_removal: bool, airflow_run_id: str | None, full: bool) -> None:
    """Run every stage once, in this process (what the DAG does, without a scheduler)."""
    from certsync import pipeline
    from certsync.failures import RunFailed, Unavailable
    from certsync.store.runlock import RunLocked, RunLockLost

    services = _services()
    now = datetime.now(UTC)
    try:
        pipeline.run_all(
            services,
            dag_id="certsync-cli",
            airflow_run_id=airflow_run_id or f"cli__{now.isoformat()}",
            logical_date=now,
            dry_run=dry_run,
            allow_mass_removal=allow_mass_removal,
            mode="full" if full else "delta",
        )
    except (ConfigError, pipeline.RemovalThresholdExceeded, RunLocked, RunLockLost, Unavailable) as exc:
        raise click.ClickException(str(exc)) from None
    except RunFailed as exc:  # closed as failed: show what it did, then exit non-zero
        _print_report(services)
        raise click.ClickException(str(exc)) from None
    _print_report(services)


def _print_report(services: Services) -> None:
    from certsync import report

    with services.engine.connect() as conn:
        click.echo(report.render_run(conn, report.latest_run(conn)))
        click.echo("")
        click.echo(report.render_auditor_example(conn))


@main.command()
def summary() -> None:
    """Print the latest run's summary and the audit chain check."""
    _print_report(_services())


def _values(path: Path) -> list[bytes]:
    """The DER values in a file: every PEM block of a PEM file, else the file's bytes as they are.
    A block that is not base64 is kept as it is, so it gets its own verdict (malformed)."""
    import base64
    import binascii
    import re

    data = path.read_bytes()
    blocks = re.findall(rb"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END [A-Z0-9 ]+-----", data, re.DOTALL)
    values = []
    for block in blocks:
        try:
            values.append(base64.b64decode(b"".join(block.split()), validate=True))
        except binascii.Error:
            values.append(block)
    return values or [data]


def _iso_time(_ctx: click.Context, _param: click.Parameter, text: str | None) -> datetime:
    """--at as an aware time: naive times are UTC, as the validator takes them; default now."""
    if text is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _json_value(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--anchors",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trust anchors, PEM or DER (repeat for several files).",
)
@click.option(
    "--intermediates",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Intermediate CAs, PEM or DER (an empty file holds none).",
)
@click.option("--crl", "crls", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--profile", type=click.Choice(["enterprise", "strict"]), default="enterprise", show_default=True
)
@click.option(
    "--attribute", type=click.Choice(["userCertificate", "userSMIMECertificate"]), default="userCertificate"
)
@click.option("--at", callback=_iso_time, help="Validation time (ISO 8601; naive is UTC; default now).")
@click.option("--email", "emails", multiple=True, help="The owner's addresses (adds the e-mail match check).")
def validate(files, anchors, intermediates, crls, profile, attribute, at, emails) -> None:  # type: ignore[no-untyped-def]
    """Validate certificate files (DER, PEM or PKCS#7) and print one JSON verdict per value, with
    every rule it fails ("failures"; the first is the reason) and times in ISO 8601.

    Exits 0 when every value is valid, 1 when any is refused, 2 on a usage or trust configuration
    error."""
    import json

    from certsync.certificates.trust import TrustConfig, TrustConfigError
    from certsync.certificates.validate import Validator, with_email_check

    try:
        trust = TrustConfig.load(anchors=anchors, intermediates=intermediates, crls=crls, profile=profile)
    except TrustConfigError as exc:
        wrong = (
            "--intermediates" if exc.path in intermediates else "--crl" if exc.path in crls else "--anchors"
        )
        raise click.BadParameter(str(exc), param_hint=f"'{wrong}'") from None
    validator = Validator(trust=trust, every_rule=True)
    refused = 0
    for path in files:
        for value in _values(path):
            verdict = validator.check(attribute=attribute, value=value, at=at)
            verdict = with_email_check(verdict, emails, every_rule=True) if emails else verdict
            refused += not verdict.ok
            fields = {k: v for k, v in verdict._asdict().items() if k not in ("sha256", "more_failures")}
            failures = [failure._asdict() for failure in verdict.failures]
            record = {
                "file": str(path),
                "sha256": verdict.sha256_hex,
                **fields,
                "failures": failures,
                "at": at,
            }
            click.echo(json.dumps(record, default=_json_value))
    sys.exit(1 if refused else 0)


from certsync.audit.cli import audit  # noqa: E402 - the subcommands of `certsync audit`

main.add_command(audit)


@main.command()
@click.option("--days", type=int, default=30, show_default=True, help="Window to look ahead.")
def expiring(days: int) -> None:
    """Certificates Exchange Online holds that expire within the window, per recipient."""
    import sqlalchemy as sa

    from certsync.report import render_table

    with _services().engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT * FROM certsync.expiring_within(make_interval(days => :d))"), {"d": days}
        ).mappings()
        click.echo(render_table(rows) or f"no certificate expires within {days} days")


@main.command()
@click.argument("recipient")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=300.0,
    show_default=True,
    help="How long to poll for a write to show in reads (the read-after-write lag).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def probe(recipient: str, wait_s: float, as_json: bool) -> None:
    """Read, write a test certificate to, read back and restore ONE recipient you name, and print
    what Exchange Online answered (value shapes, error shapes, headers, latency). Run it once against
    a real tenant before going live; it touches nothing else."""
    import json

    from certsync.config import exchange_settings
    from certsync.exchange.auth import AuthError
    from certsync.exchange.client import ExchangeClient
    from certsync.exchange.errors import ExchangeError
    from certsync.exchange.probe import Prober, render

    conn_id = (click.get_current_context().find_root().obj or {}).get("exchange_conn_id", EXCHANGE_CONN_ID)
    try:
        conn = EnvSource().connection(conn_id)
        if conn is None:
            raise ConfigError(f"connection {conn_id!r} is not configured")
        client = ExchangeClient.connect(exchange_settings(conn))
        report = Prober(client=client, identity=recipient, wait_s=wait_s).run()
    except (ConfigError, AuthError, ExchangeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report.as_dict(), indent=2, default=str) if as_json else render(report))


if __name__ == "__main__":
    main()
