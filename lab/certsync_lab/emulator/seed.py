"""Populate the emulator's tenant from directory users, deterministically.

Each user's fate (mailbox, mail user, contact, or no recipient; synced or cloud-only) comes from a
hash of its objectGUID and the seed, so adding users never reshuffles the others.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from certsync_lab.emulator.state import Recipient, StateStore

if TYPE_CHECKING:
    from certsync.directory import DirectoryUser

log = logging.getLogger(__name__)

# Entra ID caps each certificate attribute at 15 values; beyond that the sync export fails
# (LargeObject) and nothing of that attribute reaches Exchange Online.
SYNC_VALUE_CAP = 15
_ALIAS_INVALID = re.compile(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]")


@dataclass(frozen=True, kw_only=True)
class Shares:
    mailbox: float = 0.7
    mailuser: float = 0.15
    contact: float = 0.1
    missing: float = 0.05
    dirsynced: float = 0.8
    cloud_managed: float = 0.3

    def __post_init__(self) -> None:
        kinds = (self.mailbox, self.mailuser, self.contact, self.missing)
        if min(kinds) < 0 or sum(kinds) <= 0:
            raise ValueError("recipient shares must be non-negative and not all zero")
        if not (0 <= self.dirsynced <= 1 and 0 <= self.cloud_managed <= 1):
            raise ValueError("dirsynced and cloud_managed shares must be between 0 and 1")

    def kind(self, draw: float) -> str | None:
        """Map a uniform draw in [0, 1) to a recipient type (None = no recipient)."""
        total = self.mailbox + self.mailuser + self.contact + self.missing
        bounds = (
            ("UserMailbox", self.mailbox),
            ("MailUser", self.mailuser),
            ("MailContact", self.contact),
        )
        edge = 0.0
        for kind, share in bounds:
            edge += share / total
            if draw < edge:
                return kind
        return None


@dataclass(frozen=True, kw_only=True)
class SeedReport:
    created: int
    updated: int
    unchanged: int
    without_mail: int
    without_recipient: int


@dataclass(frozen=True, kw_only=True)
class _Draws:
    kind: float
    dirsynced: float
    cloud_managed: float


def _draws(object_guid: uuid.UUID, seed: int) -> _Draws:
    digest = hashlib.sha256(f"{seed}:{object_guid}".encode()).digest()
    scale = float(2**64)
    return _Draws(
        kind=int.from_bytes(digest[0:8], "big") / scale,
        dirsynced=int.from_bytes(digest[8:16], "big") / scale,
        cloud_managed=int.from_bytes(digest[16:24], "big") / scale,
    )


def _derived_guid(label: str, object_guid: uuid.UUID, seed: int) -> str:
    digest = hashlib.sha256(f"{label}:{seed}:{object_guid}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def seed_from_directory(
    *, home: Path, users: Iterable[DirectoryUser], shares: Shares, seed: int
) -> SeedReport:
    """One recipient per mail-enabled user; existing recipients keep type, flags, certificates."""
    store = StateStore(home=home)
    try:
        return _seed(store=store, users=users, shares=shares, seed=seed)
    finally:
        store.close()


def _seed(*, store: StateStore, users: Iterable[DirectoryUser], shares: Shares, seed: int) -> SeedReport:
    counts = {"created": 0, "updated": 0, "unchanged": 0, "without_mail": 0, "without_recipient": 0}
    batch: list[Recipient] = []
    taken: set[str] = set()
    for user in users:
        if not user.mail:
            counts["without_mail"] += 1
            continue
        existing = store.by_source_guid(str(user.object_guid))
        if existing is not None:
            refreshed = _refresh(existing, user, tenant_domain=store.tenant_domain)
            counts["unchanged" if refreshed == existing else "updated"] += 1
            if refreshed != existing:
                batch.append(refreshed.changed())
            continue
        recipient = _new_recipient(user, shares=shares, seed=seed, store=store, taken=taken)
        if recipient is None:
            counts["without_recipient"] += 1
            continue
        counts["created"] += 1
        batch.append(recipient)
    store.save_recipients(batch)
    log.info("seeded emulator tenant: %s", counts)
    return SeedReport(**counts)


def _new_recipient(
    user: DirectoryUser, *, shares: Shares, seed: int, store: StateStore, taken: set[str]
) -> Recipient | None:
    draws = _draws(user.object_guid, seed)
    kind = shares.kind(draws.kind)
    if kind is None:
        return None
    synced = draws.dirsynced < shares.dirsynced
    # Only mailboxes have Exchange attributes that can be switched to cloud management.
    cloud_managed = synced and kind == "UserMailbox" and draws.cloud_managed < shares.cloud_managed
    alias = _alias(user)
    name = _unique_name(user.display_name or user.sam_account_name, alias, store, taken)
    return Recipient(
        guid=_derived_guid("recipient", user.object_guid, seed),
        external_directory_object_id=_derived_guid("entra", user.object_guid, seed),
        name=name,
        alias=alias,
        display_name=user.display_name or user.sam_account_name,
        primary_smtp_address=str(user.mail),
        email_addresses=_addresses(user, kind=kind, alias=alias, tenant_domain=store.tenant_domain),
        recipient_type_details=kind,
        is_dir_synced=synced,
        is_exchange_cloud_managed=cloud_managed,
        user_certificate=_synced_values(user.user_certificate) if synced else (),
        user_smime_certificate=_synced_values(user.user_smime_certificate) if synced else (),
        source_guid=str(user.object_guid),
    )


def _refresh(existing: Recipient, user: DirectoryUser, *, tenant_domain: str) -> Recipient:
    """Identity attributes follow the directory; type, flags and certificates stay."""
    return replace(
        existing,
        display_name=user.display_name or user.sam_account_name,
        primary_smtp_address=str(user.mail),
        email_addresses=_addresses(
            user,
            kind=existing.recipient_type_details,
            alias=existing.alias,
            tenant_domain=tenant_domain,
        ),
    )


def _synced_values(values: tuple[bytes, ...]) -> tuple[str, ...]:
    if len(values) > SYNC_VALUE_CAP:
        return ()
    return tuple(base64.b64encode(value).decode() for value in values)


def _alias(user: DirectoryUser) -> str:
    alias = _ALIAS_INVALID.sub("", user.sam_account_name).strip(".")
    return alias or str(user.object_guid).replace("-", "")[:20]


def _unique_name(wanted: str, alias: str, store: StateStore, taken: set[str]) -> str:
    for candidate in (wanted, f"{wanted} ({alias})"):
        if candidate.lower() not in taken and not store.name_taken(candidate):
            taken.add(candidate.lower())
            return candidate
    candidate = f"{wanted} ({alias}-{len(taken)})"
    taken.add(candidate.lower())
    return candidate


def _addresses(user: DirectoryUser, *, kind: str, alias: str, tenant_domain: str) -> tuple[str, ...]:
    primary = str(user.mail)
    addresses = [f"SMTP:{primary}"]
    for proxy in user.proxy_addresses:
        prefix, _, address = proxy.partition(":")
        if prefix.lower() == "smtp" and address and address.lower() != primary.lower():
            addresses.append(f"smtp:{address}")
    if kind != "MailContact":
        addresses.append(f"smtp:{alias}@{tenant_domain}")
    return tuple(dict.fromkeys(addresses))
