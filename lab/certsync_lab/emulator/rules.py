"""Who may write what: the single place that decides the directory-synchronisation conflict."""

from __future__ import annotations

from collections.abc import Iterable

from certsync_lab.emulator.errors import CmdletError, write_scope
from certsync_lab.emulator.state import RECIPIENT_TYPES, Recipient

# Attributes the directory sync owns on a synced recipient unless its Exchange attributes are
# cloud-managed. Whether certificates follow that switch is unconfirmed; modelled as they do.
SYNC_OWNED_ATTRIBUTES = frozenset({"UserCertificate", "UserSMimeCertificate"})

_OBJECT_KINDS = {"UserMailbox": "mailbox", "MailUser": "mail user", "MailContact": "mail contact"}


def write_refusal(*, recipient: Recipient, cmdlet: str, attributes: Iterable[str]) -> CmdletError | None:
    """The error Exchange Online answers for this write, or None when the write is allowed."""
    if not recipient.is_dir_synced or recipient.is_exchange_cloud_managed:
        return None
    owned = [name for name in attributes if name in SYNC_OWNED_ATTRIBUTES]
    if not owned:
        return None
    return write_scope(
        cmdlet=cmdlet,
        attribute=owned[0],
        name=recipient.name,
        kind=_OBJECT_KINDS.get(RECIPIENT_TYPES.get(recipient.recipient_type_details, ""), "object"),
    )
