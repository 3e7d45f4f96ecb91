"""`emulator` command group: serve, seed-from-ad, add-client, dump, config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from certsync_lab.emulator.control import EmulatorControl
from certsync_lab.emulator.server import read_endpoint, serve
from certsync_lab.emulator.state import StateStore, register_client

PASSWORD_ENV = "CERTSYNC_LDAP_PASSWORD"  # noqa: S105 - a variable name, not a secret
SECRET_ENV = "CERTSYNC_CLIENT_SECRET"  # noqa: S105 - a variable name, not a secret

home_option = click.option(
    "--home",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Emulator home directory (state, TLS material, endpoint.json).",
)


@click.group("emulator")
def emulator() -> None:
    """The Exchange Online + token endpoint emulator used by tests, the demo and the lab."""


@emulator.command("serve")
@home_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=int, show_default=True, help="0 picks a free port.")
@click.option(
    "--tls-hostname",
    "tls_hostnames",
    multiple=True,
    help="Extra name for the server certificate (repeatable).",
)
def serve_command(home: Path, host: str, port: int, tls_hostnames: tuple[str, ...]) -> None:
    """Serve over TLS until interrupted; writes HOME/endpoint.json once listening."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(home=home, host=host, port=port, tls_hostnames=tls_hostnames)


def _read_secret(*, env_name: str, file: Path | None, what: str) -> str:
    if file is not None:
        return file.read_text().strip()
    value = os.environ.get(env_name)
    if not value:
        raise click.UsageError(f"{what}: set {env_name} or pass a file option")
    return value


@emulator.command("seed-from-ad")
@home_option
@click.option("--url", required=True, help="ldap:// or ldaps:// URL of the directory.")
@click.option("--bind-dn", required=True)
@click.option("--base-dn", required=True)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"File holding the bind password (default: ${PASSWORD_ENV}).",
)
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option("--seed", default=1, type=int, show_default=True)
@click.option("--mailbox", default=0.7, type=float, show_default=True)
@click.option("--mailuser", default=0.15, type=float, show_default=True)
@click.option("--contact", default=0.1, type=float, show_default=True)
@click.option("--missing", default=0.05, type=float, show_default=True)
@click.option("--dirsynced", default=0.8, type=float, show_default=True)
@click.option("--cloud-managed", default=0.3, type=float, show_default=True)
def seed_from_ad(
    home: Path,
    url: str,
    bind_dn: str,
    base_dn: str,
    password_file: Path | None,
    ca_file: str | None,
    seed: int,
    **share_values: float,
) -> None:
    """Create one recipient per mail-enabled AD user (shares decide type and sync flags)."""
    from certsync.directory import DirectoryReader, DirectorySettings
    from certsync_lab.emulator.seed import Shares, seed_from_directory

    password = _read_secret(env_name=PASSWORD_ENV, file=password_file, what="bind password")
    settings = DirectorySettings(
        url=url,
        bind_dn=bind_dn,
        password=password,
        base_dn=base_dn,
        ca_file=ca_file,
        allow_plain_bind=True,  # a lab tool: it reads the lab DC
    )
    report = seed_from_directory(
        home=home,
        users=DirectoryReader(settings=settings).iter_users(),
        shares=Shares(**share_values),
        seed=seed,
    )
    click.echo(json.dumps(report.__dict__))


@emulator.command("add-client")
@home_option
@click.option("--client-id", required=True)
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help=f"File holding the client secret (or set ${SECRET_ENV}).",
)
@click.option(
    "--certificate",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM certificate whose key signs client assertions.",
)
def add_client(home: Path, client_id: str, secret_file: Path | None, certificate: Path | None) -> None:
    """Register an app client (secret and/or certificate)."""
    secret = None
    if secret_file is not None or os.environ.get(SECRET_ENV):
        secret = _read_secret(env_name=SECRET_ENV, file=secret_file, what="client secret")
    pem = certificate.read_text() if certificate is not None else None
    if secret is None and pem is None:
        raise click.UsageError(f"give --certificate, --secret-file or ${SECRET_ENV}")
    register_client(home, client_id, secret=secret, certificate_pem=pem)
    click.echo(f"registered client {client_id}")


@emulator.command("dump")
@home_option
def dump(home: Path) -> None:
    """Print the tenant, client ids and recipients as JSON."""
    store = StateStore(home=home)
    try:
        click.echo(json.dumps(store.dump(), indent=2))
    finally:
        store.close()


@emulator.command("config")
@home_option
@click.option("--rate", type=float, help="Requests per second (token bucket); 0 = unlimited.")
@click.option("--burst", type=int)
@click.option("--max-concurrency", type=int, help="Per-tenant cap; 0 = none.")
@click.option("--latency-ms", type=float)
@click.option("--jitter-ms", type=float)
@click.option(
    "--fault", "faults", multiple=True, help="CMDLET:COUNT:STATUS, e.g. Set-Mailbox:3:503 (repeatable)."
)
@click.option("--clear-faults", is_flag=True)
@click.option(
    "--set",
    "settings",
    multiple=True,
    help="KEY=VALUE for any other switch (VALUE as JSON, else text), e.g. read_value_shape=data_ints,"
    " strict=false, concurrency_status=503, read_lag_s=120, max_values=15 (repeatable).",
)
def config(
    home: Path,
    rate: float | None,
    burst: int | None,
    max_concurrency: int | None,
    latency_ms: float | None,
    jitter_ms: float | None,
    faults: tuple[str, ...],
    clear_faults: bool,
    settings: tuple[str, ...],
) -> None:
    """Change throttle, latency, faults and the switchable unknowns of the emulator running in HOME;
    prints the config."""
    endpoint = read_endpoint(home)
    if endpoint is None:
        raise click.ClickException("no running emulator announced in this home")
    control = EmulatorControl(url=str(endpoint["url"]), ca_file=Path(str(endpoint["ca_file"])))
    try:
        changes = _config_changes(
            rate=rate,
            burst=burst,
            max_concurrency=max_concurrency,
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
        )
        if faults or clear_faults:
            kept = [] if clear_faults else list(control.config()["faults"])
            changes["faults"] = kept + [_parse_fault(text) for text in faults]
        changes.update(_parse_setting(text) for text in settings)
        try:
            click.echo(json.dumps(control.set_config(**changes), indent=2))
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    finally:
        control.close()


def _parse_setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--set")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        return key.strip(), raw


def _config_changes(
    *,
    rate: float | None,
    burst: int | None,
    max_concurrency: int | None,
    latency_ms: float | None,
    jitter_ms: float | None,
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if rate is not None:
        changes["rate_per_s"] = rate or None
    if burst is not None:
        changes["burst"] = burst
    if max_concurrency is not None:
        changes["max_concurrency"] = max_concurrency or None
    if latency_ms is not None:
        changes["latency_ms"] = latency_ms
    if jitter_ms is not None:
        changes["jitter_ms"] = jitter_ms
    return changes


def _parse_fault(text: str) -> dict[str, Any]:
    try:
        cmdlet, count, status = text.rsplit(":", 2)
        return {"cmdlet": cmdlet, "count": int(count), "status": int(status)}
    except ValueError:
        raise click.BadParameter(f"expected CMDLET:COUNT:STATUS, got {text!r}") from None
