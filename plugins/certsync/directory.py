"""Read users and their certificates from Active Directory (or any AD-compatible LDAP server).

The reader is deliberately small: a paged search over a configured scope that yields plain,
immutable records. Everything AD-specific about identity (objectGUID) is decoded here so the
rest of the pipeline never sees LDAP types.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import ldap3
from ldap3.core.exceptions import LDAPException

log = logging.getLogger(__name__)

USER_FILTER = "(&(objectClass=user)(!(objectClass=computer)))"
ATTRIBUTES = (
    "objectGUID",
    "distinguishedName",
    "sAMAccountName",
    "displayName",
    "mail",
    "proxyAddresses",
    "userCertificate",
    "userSMIMECertificate",
    "userAccountControl",
    "uSNChanged",
)


class DirectoryError(RuntimeError):
    """The directory could not be reached or refused the configured account or scope."""


@dataclass(frozen=True)
class DirectorySettings:
    url: str
    bind_dn: str
    password: str = field(repr=False)
    base_dn: str
    search_filter: str = USER_FILTER
    page_size: int = 500
    ca_file: str | None = None
    start_tls: bool = False
    timeout_s: int = 10

    def __post_init__(self) -> None:
        scheme = urlparse(self.url).scheme
        if scheme not in ("ldap", "ldaps"):
            raise ValueError(f"ldap url must start with ldap:// or ldaps://, got scheme {scheme!r}")
        if not self.base_dn:
            raise ValueError("ldap base_dn is required")
        if not 1 <= self.page_size <= 1000:
            raise ValueError("ldap page_size must be between 1 and 1000 (AD's MaxPageSize)")


@dataclass(frozen=True)
class DirectoryUser:
    object_guid: uuid.UUID
    dn: str
    sam_account_name: str
    mail: str | None
    proxy_addresses: tuple[str, ...]
    user_certificate: tuple[bytes, ...]
    user_smime_certificate: tuple[bytes, ...]
    user_account_control: int
    usn_changed: int
    display_name: str | None = None

    @property
    def disabled(self) -> bool:
        return bool(self.user_account_control & 0x2)

    def addresses(self) -> tuple[str, ...]:
        return smtp_addresses(self.mail, self.proxy_addresses)


def smtp_addresses(mail: str | None, proxy_addresses: Iterable[str]) -> tuple[str, ...]:
    """Every SMTP address a user owns, lower-cased, without the smtp:/SMTP: prefix."""
    found = {mail.lower()} if mail else set()
    for proxy in proxy_addresses:
        kind, _, address = proxy.partition(":")
        if kind.lower() == "smtp" and address:
            found.add(address.lower())
    return tuple(sorted(found))


class DirectoryReader:
    """Paged reader of user objects below one base DN."""

    def __init__(self, *, settings: DirectorySettings) -> None:
        self._settings = settings
        # Entries that could not be read as users: (dn, reason). Filled while iter_users runs.
        self.skipped: list[tuple[str, str]] = []

    def _connect(self) -> ldap3.Connection:
        s = self._settings
        parsed = urlparse(s.url)
        use_ssl = parsed.scheme == "ldaps"
        tls = None
        if use_ssl or s.start_tls:
            tls = ldap3.Tls(ca_certs_file=s.ca_file, validate=ssl.CERT_REQUIRED)
        server = ldap3.Server(
            parsed.hostname or "localhost",
            port=parsed.port or (636 if use_ssl else 389),
            use_ssl=use_ssl,
            tls=tls,
            connect_timeout=s.timeout_s,
            get_info=ldap3.NONE,
        )
        try:
            conn = ldap3.Connection(
                server,
                user=s.bind_dn,
                password=s.password,
                receive_timeout=s.timeout_s,
                raise_exceptions=True,
                read_only=True,
            )
            if s.start_tls:
                conn.open()
                conn.start_tls()
            conn.bind()
        except LDAPException as exc:
            # ldap3 messages never contain the password; keep only the class and text.
            raise DirectoryError(
                f"cannot bind to {s.url} as {s.bind_dn}: {type(exc).__name__}: {exc}"
            ) from None
        return conn

    def check(self) -> None:
        """Bind and read the base DN once, so bad settings fail before anything is written."""
        base_dn = self._settings.base_dn
        conn = self._connect()
        try:
            conn.search(base_dn, "(objectClass=*)", ldap3.BASE, attributes=[])
        except LDAPException as exc:
            raise DirectoryError(f"ldap base_dn {base_dn!r} is not readable: {exc}") from None
        finally:
            conn.unbind()

    def iter_users(self) -> Iterator[DirectoryUser]:
        s = self._settings
        conn = self._connect()
        try:
            entries = conn.extend.standard.paged_search(
                s.base_dn,
                s.search_filter,
                ldap3.SUBTREE,
                attributes=list(ATTRIBUTES),
                paged_size=s.page_size,
                generator=True,
            )
            for entry in entries:
                if entry.get("type") != "searchResEntry":
                    continue
                user = self._read_entry(entry["dn"], entry["raw_attributes"])
                if user is not None:
                    yield user
        except LDAPException as exc:
            raise DirectoryError(f"ldap search below {s.base_dn!r} failed: {exc}") from None
        finally:
            conn.unbind()

    def _read_entry(self, dn: str, raw: dict[str, list[bytes]]) -> DirectoryUser | None:
        """One entry as a user, or None (recorded in `skipped`) when it cannot be one: a single
        odd object must not stop the extract of all the others."""
        try:
            return _to_user(dn, raw)
        except (KeyError, IndexError, ValueError) as exc:
            reason = f"unreadable {type(exc).__name__}: {exc}"[:300]
            self.skipped.append((_clean(dn), reason))
            log.warning("skipping directory entry %s: %s", _clean(dn), reason)
            return None


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; nothing in a name or an address needs it.
    return text.replace("\x00", "")


def _text(raw: dict[str, list[bytes]], name: str) -> str | None:
    values = raw.get(name) or []
    return _clean(values[0].decode("utf-8", "replace")) if values else None


def _to_user(dn: str, raw: dict[str, list[bytes]]) -> DirectoryUser:
    return DirectoryUser(
        object_guid=uuid.UUID(bytes_le=bytes(raw["objectGUID"][0])),
        dn=_clean(dn),
        sam_account_name=_text(raw, "sAMAccountName") or "",
        mail=_text(raw, "mail"),
        proxy_addresses=tuple(_clean(v.decode("utf-8", "replace")) for v in raw.get("proxyAddresses", [])),
        user_certificate=tuple(bytes(v) for v in raw.get("userCertificate", [])),
        user_smime_certificate=tuple(bytes(v) for v in raw.get("userSMIMECertificate", [])),
        user_account_control=int(_text(raw, "userAccountControl") or 0),
        usn_changed=int(_text(raw, "uSNChanged") or 0),
        display_name=_text(raw, "displayName"),
    )
