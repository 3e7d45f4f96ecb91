"""What Exchange Online lets certsync write, by recipient type and synchronisation state."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Recipient:
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
        return cls(
            recipient_id=str(obj.get("ExternalDirectoryObjectId") or obj["Guid"]),
            primary_smtp=str(obj["PrimarySmtpAddress"]),
            recipient_type=str(obj.get("RecipientTypeDetails", "")),
            is_dir_synced=bool(obj.get("IsDirSynced", False)),
            is_cloud_managed=bool(obj.get("IsExchangeCloudManaged", False)),
            user_certificate=_hashes(obj.get("UserCertificate")),
            user_smime_certificate=_hashes(obj.get("UserSMimeCertificate")),
        )

    @property
    def cmdlet(self) -> str | None:
        return CMDLET_BY_TYPE.get(self.recipient_type)

    @property
    def writable(self) -> bool:
        """The one rule: directory synchronisation owns a synced recipient unless its Exchange
        attributes are cloud-managed (IsExchangeCloudManaged), which retiring Exchange servers set."""
        return not self.is_dir_synced or self.is_cloud_managed


def _hashes(values: list[str] | None) -> tuple[bytes, ...]:
    out = []
    for value in values or ():
        try:
            out.append(hashlib.sha256(base64.b64decode(value, validate=True)).digest())
        except (binascii.Error, ValueError):
            out.append(hashlib.sha256(value.encode()).digest())  # unreadable: still counts as a difference
    return tuple(out)
