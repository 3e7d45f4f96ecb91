"""What Exchange Online lets certsync write, by recipient type and synchronisation state."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

# RecipientTypeDetails -> the cmdlet that sets its certificates.
CMDLET_BY_TYPE = {
    "UserMailbox": "Set-Mailbox",
    "SharedMailbox": "Set-Mailbox",
    "RoomMailbox": "Set-Mailbox",
    "EquipmentMailbox": "Set-Mailbox",
    "MailUser": "Set-MailUser",
    "GuestMailUser": "Set-MailUser",
    "MailContact": "Set-MailContact",
}


class Recipient(NamedTuple):
    """A recipient of the tenant as certsync reads it. A NamedTuple, not a frozen dataclass: a full
    plan makes one per recipient, and it costs a third as much to make (0.25 us against 0.8)."""

    recipient_id: str
    primary_smtp: str
    recipient_type: str
    is_dir_synced: bool
    is_cloud_managed: bool
    # SHA-256 of each value Exchange holds now, in Exchange's order: the baseline the plan diffs against.
    user_certificate: tuple[bytes, ...] = ()
    user_smime_certificate: tuple[bytes, ...] = ()

    @classmethod
    def from_exchange(cls, obj: dict) -> Recipient:
        """A recipient as a Get-* returned it; raises ExchangeShapeError when its certificates come
        in a shape certsync cannot read (never taken for "no certificates")."""
        from certsync.exchange.client import certificates_of

        recipient_id = str(obj.get("ExternalDirectoryObjectId") or obj["Guid"])
        user_certificate, user_smime = certificates_of(
            obj, who=str(obj.get("PrimarySmtpAddress") or recipient_id)
        )
        return cls(
            recipient_id=recipient_id,
            primary_smtp=str(obj["PrimarySmtpAddress"]),
            recipient_type=str(obj.get("RecipientTypeDetails", "")),
            is_dir_synced=_flag(obj.get("IsDirSynced")),
            is_cloud_managed=_flag(obj.get("IsExchangeCloudManaged")),
            user_certificate=hashes(user_certificate),
            user_smime_certificate=hashes(user_smime),
        )

    @property
    def cmdlet(self) -> str | None:
        return CMDLET_BY_TYPE.get(self.recipient_type)

    @property
    def writable(self) -> bool:
        """The one rule: directory synchronisation owns a synced recipient unless its Exchange
        attributes are cloud-managed (IsExchangeCloudManaged), which retiring Exchange servers set."""
        return not self.is_dir_synced or self.is_cloud_managed


def hashes(values: Iterable[bytes]) -> tuple[bytes, ...]:
    """SHA-256 of each value, in order: how certsync compares certificates without holding them."""
    return tuple(hashlib.sha256(value).digest() for value in values)


def _flag(raw: object) -> bool:
    """A boolean property: JSON booleans as captured, "True"/"False" text tolerated."""
    return raw is True or (isinstance(raw, str) and raw.strip().lower() == "true")
