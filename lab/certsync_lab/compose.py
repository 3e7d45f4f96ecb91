"""`certsync-lab compose`: what the services of docker-compose.yml run.

Each command is one service's process or one step of the stack's `init` job: the Samba AD DC in the
foreground on the service's interfaces, the directory's synthetic population and trust files, the
Airflow login file, and a probe that health checks call. Secrets come from the environment only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import click

if TYPE_CHECKING:
    from certsync_lab.population import SeedUser

log = logging.getLogger(__name__)

ADMIN_PASSWORD_ENV = "SAMBA_ADMIN_PASSWORD"  # noqa: S105 - a variable name, not a secret
AIRFLOW_PASSWORD_ENV = "AIRFLOW_ADMIN_PASSWORD"  # noqa: S105 - a variable name, not a secret
PROBE_TIMEOUT_S = 5  # seconds; ldap3 wants an int
SEEDED_MARKER = "seeded.json"


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise click.UsageError(f"set {name}")
    return value


@click.group("compose")
def compose() -> None:
    """Commands of the docker-compose.yml services (DC, directory seeding, health probes)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


@compose.command("dc")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--interface",
    "interfaces",
    multiple=True,
    default=("eth0",),
    show_default=True,
    help="Interface to serve besides loopback (repeatable).",
)
def dc(home: Path, interfaces: tuple[str, ...]) -> None:
    """Provision or restore the domain in HOME, set the Administrator password from
    $SAMBA_ADMIN_PASSWORD and serve the DC in the foreground until SIGTERM."""
    from certsync_lab.samba import SambaDC

    password = _required_env(ADMIN_PASSWORD_ENV)
    server = SambaDC(home=home / "dc", cache_dir=home / "cache", interfaces=interfaces)
    server.ensure_provisioned()
    if server.password != password:
        _set_admin_password(server.home, server.smb_conf, password)
    stopping: list[int] = []

    def _stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    click.echo(f"Samba AD DC serving LDAP on {', '.join(server.interfaces)} port 389")
    while not stopping and server.running:
        time.sleep(0.5)
    server.stop()
    if not stopping:
        raise click.ClickException("samba exited on its own; see its log in the DC home")


def _set_admin_password(home: Path, smb_conf: Path, password: str) -> None:
    """Offline, before samba starts: the stack's password replaces the one provisioning generated."""
    from certsync_lab.emulator.tls import write_private_file
    from certsync_lab.samba import PASSWORD_FILE

    sam = f"ldb://{home / 'private' / 'sam.ldb'}"
    args = ["samba-tool", "user", "setpassword", "Administrator", "-H", sam, "-s", str(smb_conf)]
    result = subprocess.run(
        [*args, f"--newpassword={password}"],
        capture_output=True,
        env={**os.environ, "TDB_NO_FSYNC": "1"},
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").replace(password, "***")
        raise click.ClickException(f"samba-tool user setpassword failed:\n{output[-2000:]}")
    write_private_file(home / PASSWORD_FILE, f"{password}\n".encode())
    log.info("Administrator password set from %s", ADMIN_PASSWORD_ENV)


@compose.command("seed-directory")
@click.option("--home", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ldap-url", required=True, help="The DC, e.g. ldap://samba:389.")
@click.option("--base-dn", default="DC=corp,DC=example,DC=test", show_default=True)
@click.option("--users", type=int, default=30, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
def seed_directory(home: Path, ldap_url: str, base_dn: str, users: int, seed: int) -> None:
    """Once per HOME: add a synthetic population to OU=People of the DC and write the PKI's trust
    files (anchors.pem, intermediates.pem, *.crl) to HOME/trust."""
    from certsync_lab.population import load_population

    marker = home / SEEDED_MARKER
    if marker.exists():
        click.echo(f"directory already seeded: {marker.read_text().strip()}")
        return
    password = _required_env(ADMIN_PASSWORD_ENV)
    population, at = seed_population(home, users=users, seed=seed)
    added = load_population(
        url=ldap_url,
        bind_dn=f"CN=Administrator,CN=Users,{base_dn}",
        password=password,
        ou_dn=f"OU=People,{base_dn}",
        users=population,
    )
    summary = mark_seeded(home, users=users, seed=seed, at=at, added=added)
    crls = sorted(p.name for p in (home / "trust").glob("*.crl"))
    click.echo(f"directory seeded: {json.dumps(summary)}; trust files in {home / 'trust'}: {crls}")


def seed_population(home: Path, *, users: int, seed: int) -> tuple[list[SeedUser], datetime]:
    """The population `seed-directory` loads (deterministic for users, seed and today's date) and
    the instant it was issued for; writes the PKI's trust files to HOME/trust, keys cached in
    HOME/keys. A directory loaded offline with these users and marked with `mark_seeded` is what
    `seed-directory` would have left, so the step then skips it."""
    from certsync_lab.pki import Pki
    from certsync_lab.population import generate_population

    at = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    pki = Pki(algorithm="rsa", seed=seed, now=at - timedelta(days=800), key_cache=home / "keys")
    population = generate_population(count=users, pki=pki, seed=seed, at=at)
    pki.write_trust_files(
        home / "trust", crl_this_update=at - timedelta(days=1), crl_next_update=at + timedelta(days=3650)
    )
    return population, at


def mark_seeded(home: Path, *, users: int, seed: int, at: datetime, added: int) -> dict[str, object]:
    """Record in HOME that the directory holds its population (`seed-directory` then does nothing)."""
    summary: dict[str, object] = {"users": users, "seed": seed, "at": at.isoformat(), "added": added}
    (home / SEEDED_MARKER).write_text(json.dumps(summary))
    return summary


@compose.command("airflow-login")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--user", default="admin", show_default=True)
def airflow_login(path: Path, user: str) -> None:
    """Write the simple auth manager's password file from $AIRFLOW_ADMIN_PASSWORD (mode 0600),
    so the operator's password is the one the stack was given, not a generated one."""
    from certsync_lab.emulator.tls import write_private_file

    password = _required_env(AIRFLOW_PASSWORD_ENV)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path, (json.dumps({user: password}) + "\n").encode())
    click.echo(f"Airflow login for {user!r} written to {path}")


@compose.command("probe")
@click.argument("url")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), default=None)
def probe(url: str, ca_file: str | None) -> None:
    """Exit 0 when URL answers: HTTP(S) with a 2xx status, or LDAP with its root DSE."""
    scheme = urlparse(url).scheme
    try:
        ok = _probe_ldap(url) if scheme in ("ldap", "ldaps") else _probe_http(url, ca_file)
    except Exception as exc:
        click.echo(f"{url}: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    if not ok:
        sys.exit(1)


def _probe_http(url: str, ca_file: str | None) -> bool:
    import requests

    session = requests.Session()
    session.trust_env = False  # a proxy setting must not decide a health check
    response = session.get(url, timeout=PROBE_TIMEOUT_S, verify=ca_file or True)
    if not response.ok:
        click.echo(f"{url}: HTTP {response.status_code}", err=True)
    return response.ok


def _probe_ldap(url: str) -> bool:
    import ldap3

    server = ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=PROBE_TIMEOUT_S)
    conn = ldap3.Connection(server, receive_timeout=PROBE_TIMEOUT_S)
    if not conn.bind():
        return False
    try:
        return bool(
            conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["namingContexts"])
        )
    finally:
        conn.unbind()


__all__ = ["compose"]


if __name__ == "__main__":
    # Health checks run this module directly: it loads much less than the whole `certsync-lab`.
    compose()
