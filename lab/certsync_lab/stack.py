"""The whole local stack for the demo and the integration tests: embedded PostgreSQL, a Samba AD DC
seeded with a synthetic population, and the Exchange Online emulator holding one recipient per user.

Everything lives under one home folder (default `.certsync/`), survives restarts, and is seeded once:
a second `up()` reuses the directory, the PKI and the emulator's state as they are, and every service
keeps its port (PostgreSQL and the emulator remember theirs in the home; Samba's LDAP is fixed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certsync.audit.signing import AUDIT_SIGNING_CONN_ID, SigningKey
from certsync.config import POSTGRES_CONN_ID, Connection, connection_uri
from certsync.directory import DirectoryReader, DirectorySettings
from certsync.store.db import APP_ROLE, migrate
from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.emulator.seed import Shares, seed_from_directory
from certsync_lab.emulator.state import register_client
from certsync_lab.emulator.tls import certificate_builder, private_key_pem, write_private_file
from certsync_lab.pki import Pki
from certsync_lab.population import (
    OFFLINE_FROM,
    generate_population,
    load_population,
    load_population_offline,
)
from certsync_lab.postgres import EmbeddedPostgres
from certsync_lab.samba import SambaDC

log = logging.getLogger(__name__)

CLIENT_ID = "certsync-lab"
DATABASE = "certsync"
DEMO_SHARES = Shares(mailbox=0.7, mailuser=0.12, contact=0.1, missing=0.08, dirsynced=0.5, cloud_managed=0.6)


def app_credentials(directory: Path) -> tuple[Path, Path, str]:
    """The lab application's certificate, private key and client secret (made once, kept 0600)."""
    cert_file, key_file, secret_file = directory / "app.pem", directory / "app.key", directory / "app.secret"
    if not cert_file.exists():
        directory.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = certificate_builder(key, CLIENT_ID, timedelta(days=3650)).sign(key, hashes.SHA256())
        write_private_file(key_file, private_key_pem(key))
        write_private_file(secret_file, secrets.token_urlsafe(32).encode())
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file, key_file, secret_file.read_text()


@dataclass
class LabStack:
    home: Path
    users: int = 300
    seed: int = 7
    shares: Shares = DEMO_SHARES
    use_certificate: bool = True
    postgres_settings: dict[str, str] = field(default_factory=dict)  # server parameters
    postgres: EmbeddedPostgres = field(init=False)
    samba: SambaDC = field(init=False)
    emulator: EmulatorProcess = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.home.resolve()
        self.postgres = EmbeddedPostgres(data_dir=self.home / "postgres", settings=self.postgres_settings)
        self.samba = SambaDC(home=self.home / "samba", cache_dir=self.home / "cache")
        self.emulator = EmulatorProcess(home=self.home / "emulator")

    @property
    def trust_dir(self) -> Path:
        return self.home / "trust"

    def running(self) -> bool:
        """True when every service of this home is up (a second `up()` then changes nothing)."""
        return self.postgres.running() and self.samba.running and self.emulator.running()

    def up(self) -> LabStack:
        """Start what is not running. On a running lab this only attaches: nothing restarts, nothing
        is migrated or seeded, and every port stays as it is."""
        if self.running():
            log.info("the lab in %s is already running", self.home)
            return self._attach()
        self.postgres.start()
        certsync_database(self.postgres, DATABASE)
        self.samba.start()
        self._seed_directory()
        if not self.emulator.running():
            # A running emulator keeps its tenant as it is; only a stopped one is (re)seeded.
            seed_tenant(
                home=self.emulator.home,
                samba=self.samba,
                credentials=app_credentials(self.home / "app"),
                shares=self.shares,
                seed=self.seed,
            )
        self.emulator.start()
        return self

    def _attach(self) -> LabStack:
        self.postgres.start()
        self.samba.start()
        self.emulator.start()
        return self

    def down(self) -> None:
        self.emulator.stop()
        self.samba.stop()
        self.postgres.stop()

    def __enter__(self) -> LabStack:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _seed_directory(self) -> None:
        marker = self.home / "seeded.json"
        if marker.exists():
            return
        at = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        pki = Pki(algorithm="rsa", seed=self.seed, now=at - timedelta(days=800), key_cache=self.home / "keys")
        population = generate_population(count=self.users, pki=pki, seed=self.seed, at=at)
        pki.write_trust_files(
            self.trust_dir, crl_this_update=at - timedelta(days=1), crl_next_update=at + timedelta(days=3650)
        )
        if self.users >= OFFLINE_FROM:
            # Over LDAP a large population takes hours on a busy host; offline, minutes.
            added = load_population_offline(samba=self.samba, ou_dn=self.samba.users_ou, users=population)
        else:
            added = load_population(
                url=self.samba.ldap_url,
                bind_dn=self.samba.bind_dn,
                password=self.samba.password,
                ou_dn=self.samba.users_ou,
                users=population,
            )
        marker.write_text(
            json.dumps({"users": self.users, "seed": self.seed, "at": at.isoformat(), "added": added})
        )

    def connections(self) -> dict[str, Connection]:
        cert, key, secret = app_credentials(self.home / "app")
        return lab_connections(
            samba=self.samba,
            emulator=self.emulator,
            credential={"certificate_file": str(cert), "private_key_file": str(key)}
            if self.use_certificate
            else secret,
        )

    def config(self) -> dict:
        trust = self.trust_dir
        return {
            "trust_anchors": str(trust / "anchors.pem"),
            "intermediates": [str(trust / "intermediates.pem")],
            "crls": sorted(str(p) for p in trust.glob("*.crl")),
            "profile": "enterprise",
        }

    def environment(self) -> dict[str, str]:
        """AIRFLOW_CONN_* / AIRFLOW_VAR_* for a process (Airflow or the CLI) that runs the sync."""
        connections = {
            **self.connections(),
            POSTGRES_CONN_ID: app_connection(self.postgres.port, DATABASE),
            AUDIT_SIGNING_CONN_ID: audit_signing_connection(self.audit_key()),
        }
        return sync_environment(
            connections, {**self.config(), "audit_checkpoint_dir": str(self.checkpoint_dir)}
        )

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "audit-checkpoints"

    def audit_key(self) -> SigningKey:
        """The lab's own audit signing key, made once: the private key in audit/signing.key (what the
        connection holds), the public key an auditor is given in audit/public.key."""
        folder = self.home / "audit"
        private = folder / "signing.key"
        if not private.exists():
            folder.mkdir(parents=True, exist_ok=True)
            key = SigningKey.generate()
            write_private_file(private, key.private_text().encode())
            (folder / "public.key").write_text(key.public_text() + "\n")
        return SigningKey.from_text(private.read_text(), where=str(private))


def app_connection(port: int, database: str) -> Connection:
    """certsync's run-time login (certsync_app; the lab's server trusts local logins)."""
    return Connection(
        conn_id=POSTGRES_CONN_ID,
        conn_type="postgres",
        host="127.0.0.1",
        port=port,
        login=APP_ROLE,
        schema=database,
    )


def certsync_database(postgres: EmbeddedPostgres, database: str) -> Connection:
    """Create `database` unless it exists, migrate it as the owner (the lab's superuser) and
    return the run-time connection, as a DBA and `certsync db upgrade` would."""
    migrate(postgres.ensure_database(database))
    return app_connection(postgres.port, database)


LAB_AUDIT_SEED = hashlib.sha256(b"certsync lab audit signing key").digest()


def lab_audit_key(seed: bytes = LAB_AUDIT_SEED) -> SigningKey:
    """The lab's audit signing key: fixed by default (the lab's other secrets are fixed too), so
    tests and the lab's auditors know its public key; the demo makes its own (audit_key)."""
    return SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(seed))


def audit_signing_connection(key: SigningKey) -> Connection:
    return Connection(
        conn_id=AUDIT_SIGNING_CONN_ID,
        conn_type="generic",
        login="certsync-audit",
        password=key.private_text(),
    )


def sync_environment(connections: dict[str, Connection], config: dict) -> dict[str, str]:
    """The AIRFLOW_CONN_* / AIRFLOW_VAR_CERTSYNC_CONFIG variables that carry these settings (with the
    lab's audit signing key unless `connections` holds one)."""
    connections = {AUDIT_SIGNING_CONN_ID: audit_signing_connection(lab_audit_key()), **connections}
    env = {f"AIRFLOW_CONN_{cid.upper()}": connection_uri(conn) for cid, conn in connections.items()}
    return {**env, "AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps(config)}


def seed_tenant(
    *, home: Path, samba: SambaDC, credentials: tuple[Path, Path, str], shares: Shares, seed: int
) -> None:
    """Register the lab application with the emulator in `home` and give it one recipient per
    mail-enabled user of the DC's users OU."""
    cert, _key, secret = credentials
    register_client(home, CLIENT_ID, secret=secret, certificate_pem=cert.read_text())
    settings = DirectorySettings(
        url=samba.ldap_url,
        bind_dn=samba.bind_dn,
        password=samba.password,
        base_dn=samba.users_ou,
        allow_plain_bind=True,  # the lab DC on loopback
    )
    report = seed_from_directory(
        home=home, users=DirectoryReader(settings=settings).iter_users(), shares=shares, seed=seed
    )
    log.info("emulator recipients: %s", report)


def lab_connections(
    *, samba: SambaDC, emulator: EmulatorProcess, credential: str | dict[str, str]
) -> dict[str, Connection]:
    """The certsync_ldap and certsync_exchange connections for a lab DC and emulator. `credential`
    is the client secret, or the certificate_file/private_key_file extras of a certificate credential."""
    host, port = emulator.url.removeprefix("https://").rsplit(":", 1)
    extra = {
        "tenant_id": emulator.tenant_id,
        "authority_host": emulator.url,
        "ca_file": str(emulator.ca_file),
    }
    return {
        "certsync_ldap": Connection(
            conn_id="certsync_ldap",
            conn_type="ldap",
            host="127.0.0.1",
            port=389,
            login=samba.bind_dn,
            password=samba.password,
            # The lab DC on loopback may take a plain bind (it also serves LDAPS and StartTLS).
            extra={"base_dn": samba.users_ou, "allow_plain_bind": True},
        ),
        "certsync_exchange": Connection(
            conn_id="certsync_exchange",
            conn_type="https",
            host=host,
            port=int(port),
            login=CLIENT_ID,
            password=credential if isinstance(credential, str) else "",
            extra=extra if isinstance(credential, str) else {**extra, **credential},
        ),
    }
