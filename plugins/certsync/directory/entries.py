"""Directory entries as plain, immutable user records: everything LDAP-specific is decoded here.

Values that are not what the schema promises (non-UTF-8 text, NUL characters, odd numbers) are kept
as data; only an entry without a usable identity (objectGUID) cannot be a user.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

ATTRIBUTES = (
    "objectGUID",
    "sAMAccountName",
    "displayName",
    "mail",
    "proxyAddresses",
    "userCertificate",
    "userSMIMECertificate",
    "userAccountControl",
    "uSNChanged",
    "msExchRecipientTypeDetails",
)
ACCOUNT_DISABLE = 0x2  # userAccountControl ACCOUNTDISABLE


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
    recipient_type_details: int | None = None  # msExchRecipientTypeDetails, where Exchange's schema is

    @property
    def disabled(self) -> bool:
        return bool(self.user_account_control & ACCOUNT_DISABLE)

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


def clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; nothing in a name or an address needs it.
    return text.replace("\x00", "")


def merge_ranges(raw: dict[str, list[bytes]]) -> dict[str, list[bytes]]:
    """Fold `attr;range=0-1499` style keys (AD's ranged retrieval of large multi-valued
    attributes, already completed by the client library) back under the attribute's name."""
    if not any(";range=" in name for name in raw):
        return raw
    merged: dict[str, list[bytes]] = {}
    for name, values in raw.items():
        base = name.split(";range=", 1)[0]
        merged.setdefault(base, []).extend(values)
    return merged


def _text(raw: dict[str, list[bytes]], name: str) -> str | None:
    values = raw.get(name) or []
    return clean(bytes(values[0]).decode("utf-8", "replace")) if values else None


def _int(raw: dict[str, list[bytes]], name: str) -> int | None:
    text = _text(raw, name)
    return int(text) if text not in (None, "") else None


def guid_of(raw: dict[str, list[bytes]]) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw["objectGUID"][0]))


def to_user(dn: str, raw: dict[str, list[bytes]]) -> DirectoryUser:
    raw = merge_ranges(raw)
    return DirectoryUser(
        object_guid=guid_of(raw),
        dn=clean(dn),
        sam_account_name=_text(raw, "sAMAccountName") or "",
        mail=_text(raw, "mail"),
        proxy_addresses=tuple(
            clean(bytes(v).decode("utf-8", "replace")) for v in raw.get("proxyAddresses", [])
        ),
        user_certificate=tuple(bytes(v) for v in raw.get("userCertificate", [])),
        user_smime_certificate=tuple(bytes(v) for v in raw.get("userSMIMECertificate", [])),
        user_account_control=_int(raw, "userAccountControl") or 0,
        usn_changed=_int(raw, "uSNChanged") or 0,
        display_name=_text(raw, "displayName"),
        recipient_type_details=_int(raw, "msExchRecipientTypeDetails"),
    )


def guid_filter(guids: Iterable[uuid.UUID]) -> str:
    """(|(objectGUID=\\xx...)...) for a batch of users looked up by identity."""
    terms = "".join("(objectGUID=" + "".join(f"\\{b:02x}" for b in g.bytes_le) + ")" for g in guids)
    return f"(|{terms})"
