"""The outcome of validating one attribute value, and the per-user e-mail match on top of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from certsync.certificates.reasons import Reason

EMAIL_MATCH_RULE = "any.email_matches_user"


@dataclass(frozen=True)
class Verdict:
    """Frozen and picklable: crosses process boundaries and is stored per value sha256."""

    sha256: bytes
    attribute: str
    ok: bool
    reason: str | None
    rule: str | None
    detail: str
    subject: str = ""
    issuer: str = ""
    serial: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    valid_until: datetime | None = None
    emails: tuple[str, ...] = ()

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()


def normalise_address(address: str) -> str | None:
    """Lowercased SMTP address from a mail or proxyAddresses value; None for non-SMTP proxies."""
    value = address.strip()
    prefix, sep, rest = value.partition(":")
    if sep and "@" not in prefix:
        if prefix.lower() != "smtp":
            return None  # X500:, SIP:, EUM: ... are not mailboxes
        value = rest.strip()
    return value.lower() if "@" in value else None


def email_mismatch(verdict: Verdict, addresses: Iterable[str]) -> bool:
    """True when none of the certificate's addresses is one of the user's (case-insensitive)."""
    mine = {a for a in (normalise_address(x) for x in addresses) if a}
    return not mine.intersection(verdict.emails)


def with_email_check(verdict: Verdict, addresses: Iterable[str]) -> Verdict:
    """The verdict for this user: a valid certificate for someone else's address is refused."""
    if not verdict.ok or not email_mismatch(verdict, addresses):
        return verdict
    shown = ", ".join(verdict.emails[:5]) or "none"
    return dataclasses.replace(
        verdict,
        ok=False,
        reason=Reason.EMAIL_MISMATCH.value,
        rule=EMAIL_MATCH_RULE,
        detail=f"{Reason.EMAIL_MISMATCH.sentence} Certificate addresses: {shown}.",
        valid_until=None,
    )
