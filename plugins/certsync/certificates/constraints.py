"""rfc822Name name constraints applied to e-mail addresses taken from the subject DN.

cryptography's verifier applies name constraints to subjectAltName entries only. RFC 5280 4.2.1.10
says that when a certificate has no subjectAltName, rfc822Name constraints MUST be applied to the
emailAddress attributes of the subject; without this, a CA limited to one domain could vouch for any
address through a legacy subject-only certificate (accepted by the enterprise profile).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509

from certsync.certificates.policy import Refusal
from certsync.certificates.reasons import Reason

# Quadratic blow-up guard: addresses times constraints checked for one certificate.
MAX_CONSTRAINT_CHECKS = 4096


def email_constraints(cas: Sequence[x509.Certificate]) -> tuple[x509.NameConstraints, ...]:
    """The name constraints of the chain's CAs that restrict rfc822Names."""
    found = []
    for ca in cas:
        try:
            value = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        subtrees = [*(value.permitted_subtrees or ()), *(value.excluded_subtrees or ())]
        if any(isinstance(name, x509.RFC822Name) for name in subtrees):
            found.append(value)
    return tuple(found)


def check_subject_emails(
    emails: Sequence[str], constraints: Sequence[x509.NameConstraints], profile: str
) -> None:
    """Refuse when a subject e-mail address is outside a CA's permitted or inside its excluded names."""
    if not emails or not constraints:
        return
    rule = f"{profile}.subject_email_name_constraints"
    work = len(emails) * sum(_rfc822_count(c) for c in constraints)
    if work > MAX_CONSTRAINT_CHECKS:
        detail = f"Too many subject addresses and name constraints to check ({work} comparisons)."
        raise Refusal(Reason.CHAIN_INVALID, rule, detail)
    for constraint in constraints:
        permitted = _rfc822(constraint.permitted_subtrees)
        excluded = _rfc822(constraint.excluded_subtrees)
        for email in emails:
            if permitted and not any(_matches(email, base) for base in permitted):
                detail = f"The subject address {email[:128]} is outside a CA's permitted rfc822 names."
                raise Refusal(Reason.CHAIN_INVALID, rule, detail)
            if any(_matches(email, base) for base in excluded):
                detail = f"The subject address {email[:128]} is in a CA's excluded rfc822 names."
                raise Refusal(Reason.CHAIN_INVALID, rule, detail)


def _rfc822(subtrees: Sequence[x509.GeneralName] | None) -> list[str]:
    return [name.value.lower() for name in subtrees or () if isinstance(name, x509.RFC822Name)]


def _rfc822_count(constraint: x509.NameConstraints) -> int:
    return len(_rfc822(constraint.permitted_subtrees)) + len(_rfc822(constraint.excluded_subtrees))


def _matches(email: str, base: str) -> bool:
    """RFC 5280 4.2.1.10: a mailbox, all mailboxes on a host, or (leading dot) on its subdomains."""
    address = email.lower()
    if "@" in base:
        return address == base
    host = address.rpartition("@")[2]
    if base.startswith("."):
        return host.endswith(base)
    return host == base
