"""Persistent emulator state: tenant, registered app clients and recipients (sqlite in the home).

sqlite rather than a JSON file because publishing touches one recipient at a time and a lab
tenant may hold tens of thousands of them; WAL mode lets the seeding CLI write while a server runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

STATE_FILE = "state.sqlite"
DEFAULT_TENANT_DOMAIN = "certsynclab.onmicrosoft.com"

# RecipientTypeDetails -> RecipientType, as Exchange Online reports them.
RECIPIENT_TYPES = {
    "UserMailbox": "UserMailbox",
    "SharedMailbox": "UserMailbox",
    "RoomMailbox": "UserMailbox",
    "EquipmentMailbox": "UserMailbox",
    "MailUser": "MailUser",
    "GuestMailUser": "MailUser",
    "MailContact": "MailContact",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    secret_sha256 TEXT,
    certificate_pem TEXT
);
CREATE TABLE IF NOT EXISTS recipients (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    guid TEXT NOT NULL UNIQUE,
    source_guid TEXT UNIQUE,
    edoid TEXT NOT NULL,
    smtp TEXT NOT NULL,
    alias TEXT NOT NULL,
    name TEXT NOT NULL,
    type_details TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_edoid ON recipients (edoid);
CREATE INDEX IF NOT EXISTS recipients_smtp ON recipients (smtp);
CREATE INDEX IF NOT EXISTS recipients_alias ON recipients (alias);
CREATE INDEX IF NOT EXISTS recipients_name ON recipients (name);
"""


def utc_now_text() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True, kw_only=True)
class Recipient:
    guid: str
    external_directory_object_id: str
    name: str
    alias: str
    display_name: str
    primary_smtp_address: str
    email_addresses: tuple[str, ...]
    recipient_type_details: str
    is_dir_synced: bool
    is_exchange_cloud_managed: bool
    user_certificate: tuple[str, ...] = ()
    user_smime_certificate: tuple[str, ...] = ()
    when_changed: str = field(default_factory=utc_now_text)
    # Link to the directory user it was seeded from; internal, never returned by cmdlets.
    source_guid: str | None = None

    def as_exchange(self) -> dict[str, Any]:
        """The recipient as InvokeCommand returns it (Exchange property names)."""
        return {
            "Guid": self.guid,
            "ExternalDirectoryObjectId": self.external_directory_object_id,
            "Identity": self.name,
            "Name": self.name,
            "Alias": self.alias,
            "DisplayName": self.display_name,
            "PrimarySmtpAddress": self.primary_smtp_address,
            "EmailAddresses": list(self.email_addresses),
            "RecipientType": RECIPIENT_TYPES[self.recipient_type_details],
            "RecipientTypeDetails": self.recipient_type_details,
            "IsDirSynced": self.is_dir_synced,
            "IsExchangeCloudManaged": self.is_exchange_cloud_managed,
            "UserCertificate": list(self.user_certificate),
            "UserSMimeCertificate": list(self.user_smime_certificate),
            "WhenChanged": self.when_changed,
            "WhenChangedUTC": self.when_changed,
        }

    def to_json(self) -> str:
        data = self.as_exchange()
        data["_source_guid"] = self.source_guid
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Recipient:
        data = json.loads(text)
        return cls(
            guid=data["Guid"],
            external_directory_object_id=data["ExternalDirectoryObjectId"],
            name=data["Name"],
            alias=data["Alias"],
            display_name=data["DisplayName"],
            primary_smtp_address=data["PrimarySmtpAddress"],
            email_addresses=tuple(data["EmailAddresses"]),
            recipient_type_details=data["RecipientTypeDetails"],
            is_dir_synced=bool(data["IsDirSynced"]),
            is_exchange_cloud_managed=bool(data["IsExchangeCloudManaged"]),
            user_certificate=tuple(data["UserCertificate"]),
            user_smime_certificate=tuple(data["UserSMimeCertificate"]),
            when_changed=data["WhenChanged"],
            source_guid=data.get("_source_guid"),
        )

    def changed(self, **changes: Any) -> Recipient:
        return replace(self, when_changed=utc_now_text(), **changes)


@dataclass(frozen=True, kw_only=True)
class RegisteredClient:
    client_id: str
    secret_sha256: str | None = field(default=None, repr=False)
    certificate_pem: str | None = None

    def secret_matches(self, secret: str) -> bool:
        if self.secret_sha256 is None:
            return False
        offered = hashlib.sha256(secret.encode()).hexdigest()
        return hmac.compare_digest(offered, self.secret_sha256)


class StateStore:
    """All reads and writes of the emulator's persistent state go through here."""

    def __init__(self, *, home: Path) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.home / STATE_FILE, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # executescript commits on its own, so the schema goes in before the transaction.
        self._db.executescript(_SCHEMA)
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('tenant_id', ?)",
                (str(uuid.uuid4()),),
            )
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('tenant_domain', ?)",
                (DEFAULT_TENANT_DOMAIN,),
            )
        # Written once above and never changed: read them once, not on every request.
        self.tenant_id = self._meta("tenant_id")
        self.tenant_domain = self._meta("tenant_domain")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, key: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0])

    def save_client(self, client: RegisteredClient) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO clients (client_id, secret_sha256, certificate_pem) VALUES (?, ?, ?)"
                " ON CONFLICT (client_id) DO UPDATE SET"
                " secret_sha256 = COALESCE(excluded.secret_sha256, clients.secret_sha256),"
                " certificate_pem = COALESCE(excluded.certificate_pem, clients.certificate_pem)",
                (client.client_id, client.secret_sha256, client.certificate_pem),
            )

    def get_client(self, client_id: str) -> RegisteredClient | None:
        with self._lock:
            row = self._db.execute(
                "SELECT client_id, secret_sha256, certificate_pem FROM clients WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            return None
        return RegisteredClient(client_id=row[0], secret_sha256=row[1], certificate_pem=row[2])

    def client_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT client_id FROM clients ORDER BY client_id").fetchall()
        return [row[0] for row in rows]

    def page(
        self,
        *,
        type_details: Iterable[str] | None,
        after_seq: int,
        limit: int,
        changed_from: str | None = None,
    ) -> list[tuple[int, Recipient]]:
        """Recipients in a stable order (insertion), for keyset paging; with `changed_from` (ISO
        text in UTC, as stored) only those whose WhenChanged is that or later."""
        sql = "SELECT seq, data FROM recipients WHERE seq > ?"
        params: list[Any] = [after_seq]
        if changed_from is not None:
            sql += " AND json_extract(data, '$.WhenChanged') >= ?"
            params.append(changed_from)
        if type_details is not None:
            kinds = sorted(set(type_details))
            sql += f" AND type_details IN ({','.join('?' * len(kinds))})"
            params.extend(kinds)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [(row[0], Recipient.from_json(row[1])) for row in rows]

    def resolve(self, identity: str) -> list[Recipient]:
        """Every recipient that ``identity`` names (Guid, EDOID, SMTP address, alias or name)."""
        key = identity.strip().lower()
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM recipients WHERE guid = ? OR edoid = ? OR smtp = ?"
                " OR alias = ? OR name = ? ORDER BY seq",
                (key, key, key, key, key),
            ).fetchall()
        return [Recipient.from_json(row[0]) for row in rows]

    def by_source_guid(self, source_guid: str) -> Recipient | None:
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM recipients WHERE source_guid = ?", (source_guid,)
            ).fetchone()
        return None if row is None else Recipient.from_json(row[0])

    def name_taken(self, name: str, *, except_guid: str | None = None) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT guid FROM recipients WHERE name = ? AND guid IS NOT ?",
                (name.lower(), except_guid),
            ).fetchone()
        return row is not None

    def save_recipients(self, recipients: Iterable[Recipient]) -> int:
        count = 0
        with self._transaction() as db:
            for recipient in recipients:
                db.execute(
                    "INSERT INTO recipients"
                    " (guid, source_guid, edoid, smtp, alias, name, type_details, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (guid) DO UPDATE SET source_guid = excluded.source_guid,"
                    " edoid = excluded.edoid, smtp = excluded.smtp, alias = excluded.alias,"
                    " name = excluded.name, type_details = excluded.type_details,"
                    " data = excluded.data",
                    _recipient_row(recipient),
                )
                count += 1
        return count

    def restamp(self, when_changed: dt.datetime) -> int:
        """Set every recipient's WhenChanged to one moment: a tenant untouched since then (a lab's
        tenant restored for a measurement, which must not look freshly changed to a delta read)."""
        text = when_changed.astimezone(dt.UTC).replace(microsecond=0).isoformat()
        with self._transaction() as db:
            return db.execute(
                "UPDATE recipients SET data = json_set(data, '$.WhenChanged', ?, '$.WhenChangedUTC', ?)",
                (text, text),
            ).rowcount

    def dump(self) -> dict[str, Any]:
        """The whole state as JSON-ready data (client secrets are never included)."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM recipients ORDER BY seq").fetchall()
        return {
            "tenant_id": self.tenant_id,
            "tenant_domain": self.tenant_domain,
            "clients": self.client_ids(),
            "recipients": [Recipient.from_json(row[0]).as_exchange() for row in rows],
        }


def _recipient_row(recipient: Recipient) -> tuple[Any, ...]:
    return (
        recipient.guid.lower(),
        recipient.source_guid,
        recipient.external_directory_object_id.lower(),
        recipient.primary_smtp_address.lower(),
        recipient.alias.lower(),
        recipient.name.lower(),
        recipient.recipient_type_details,
        recipient.to_json(),
    )


def register_client(
    home: Path, client_id: str, secret: str | None = None, certificate_pem: str | None = None
) -> RegisteredClient:
    """Register (or update) an app client that may obtain tokens from the emulator."""
    if secret is None and certificate_pem is None:
        raise ValueError("a client needs a secret, a certificate, or both")
    if certificate_pem is not None:
        _check_certificate(certificate_pem)
    client = RegisteredClient(
        client_id=client_id,
        secret_sha256=None if secret is None else hashlib.sha256(secret.encode()).hexdigest(),
        certificate_pem=certificate_pem,
    )
    store = StateStore(home=home)
    try:
        store.save_client(client)
    finally:
        store.close()
    return client


def _check_certificate(certificate_pem: str) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise ValueError("client certificate is not a PEM X.509 certificate") from exc
