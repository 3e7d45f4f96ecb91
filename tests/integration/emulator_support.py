"""Shared helpers for the emulator tests: directory users, client certificates, an HTTP caller."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from certsync.directory import DirectoryUser
from certsync.exchange.auth import EXCHANGE_SCOPE
from certsync.exchange.client import ANCHOR_MAILBOX
from certsync_lab.emulator.tls import certificate_builder, private_key_pem

ANCHOR = ANCHOR_MAILBOX
SCOPE = [EXCHANGE_SCOPE]


@contextmanager
def seeded_emulator(home: Path, dc: Any, credentials: Any) -> Iterator[Any]:
    """An Exchange Online emulator serving one recipient per user of `dc` and the lab's app."""
    from certsync_lab.emulator.process import EmulatorProcess
    from certsync_lab.stack import DEMO_SHARES, seed_tenant

    seed_tenant(home=home, samba=dc, credentials=credentials, shares=DEMO_SHARES, seed=0)
    with EmulatorProcess(home=home) as emulator:
        yield emulator


def app_connections(*, dc: Any, emulator: Any, credentials: Any, pg: Any, database: str) -> dict[str, Any]:
    """The lab's connections for certsync (its app signing in with the certificate) over database
    `database` of `pg`, created with certsync's schema."""
    from certsync_lab.stack import certsync_database, lab_connections

    cert, key, _secret = credentials
    connections = lab_connections(
        samba=dc,
        emulator=emulator,
        credential={"certificate_file": str(cert), "private_key_file": str(key)},
    )
    connections["certsync_postgres"] = certsync_database(pg, database)
    return connections


def directory_user(name: str, *, certificates: tuple[bytes, ...] = ()) -> DirectoryUser:
    return DirectoryUser(
        object_guid=uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.example.test"),
        dn=f"CN={name},OU=People,DC=example,DC=test",
        sam_account_name=name,
        mail=f"{name}@example.test",
        proxy_addresses=(f"SMTP:{name}@example.test", f"smtp:{name}.alt@example.test"),
        user_certificate=certificates,
        user_smime_certificate=(),
        user_account_control=512,
        usn_changed=1000,
        display_name=f"{name.title()} Person",
    )


@dataclass(frozen=True)
class ClientCertificate:
    key_pem: str
    certificate_pem: str

    @property
    def sha1_thumbprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.certificate_pem.encode())
        return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()  # noqa: S324


def client_certificate(common_name: str) -> ClientCertificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = certificate_builder(key, common_name, dt.timedelta(days=30)).sign(key, hashes.SHA256())
    return ClientCertificate(
        key_pem=private_key_pem(key).decode(),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


def session_for(ca_file: Any) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    return session


def msal_app(*, url: str, tenant: str, ca_file: Any, client_id: str, credential: Any):
    return msal.ConfidentialClientApplication(
        client_id,
        authority=f"{url}/{tenant}",
        client_credential=credential,
        instance_discovery=False,
        http_client=session_for(ca_file),
    )


def typed(name: str, *values: str) -> dict[str, Any]:
    """A byte[][] parameter as the ExchangeOnlineManagement module sends it (base64 Data)."""
    return {
        f"{name}@odata.type": "#Collection(Exchange.ByteArrayType)",
        name: [{"Data": value} for value in values],
    }


class Invoker:
    """Posts InvokeCommand requests the way the ExchangeOnlineManagement module does."""

    def __init__(self, *, url: str, tenant: str, ca_file: Any, token: str | None) -> None:
        self.endpoint = f"{url}/adminapi/beta/{tenant}/InvokeCommand"
        self.tenant = tenant
        self.token = token
        self.session = session_for(ca_file)

    def headers(self, cmdlet: str, **extra: str) -> dict[str, str]:
        headers = {
            "X-CmdletName": cmdlet,
            "client-request-id": str(uuid.uuid4()),
            "X-AnchorMailbox": ANCHOR % self.tenant,
        }
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra)
        return headers

    def post(
        self,
        cmdlet: str,
        parameters: dict[str, Any] | None = None,
        *,
        url: str | None = None,
        **headers: str,
    ) -> requests.Response:
        body = {"CmdletInput": {"CmdletName": cmdlet, "Parameters": parameters or {}}}
        return self.session.post(
            url or self.endpoint, json=body, headers=self.headers(cmdlet, **headers), timeout=30
        )


def held_certificates(emulator: Any) -> dict[str, tuple[frozenset[bytes], frozenset[bytes]]]:
    """What Exchange holds: recipient id -> (userCertificate hashes, userSMIMECertificate hashes)."""

    def hashes(values: list[str]) -> frozenset[bytes]:
        return frozenset(hashlib.sha256(base64.b64decode(v)).digest() for v in values)

    return {
        r["ExternalDirectoryObjectId"]: (hashes(r["UserCertificate"]), hashes(r["UserSMimeCertificate"]))
        for r in emulator.control.state()["recipients"]
    }


class Clock:
    """Logical dates for a module's runs, each one minute after the previous (an older run than one
    that already planned would be superseded)."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def next(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=1)
        return self.now
