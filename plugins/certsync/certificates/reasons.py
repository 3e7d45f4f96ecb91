"""Reason codes for refused certificate values.

The code (the enum value) is stored in Postgres and shown to admins next to its sentence, so codes are
stable lower_snake strings: never rename one, only add.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    NO_CERTIFICATE = "no_certificate"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    NO_EMAIL_PROTECTION_EKU = "no_email_protection_eku"
    PROFILE_EKU_FORBIDDEN = "profile_eku_forbidden"
    KEY_USAGE_UNFIT = "key_usage_unfit"
    NOT_END_ENTITY = "not_end_entity"
    UNKNOWN_ISSUER = "unknown_issuer"
    CHAIN_INVALID = "chain_invalid"
    REVOKED = "revoked"
    CRL_STALE = "crl_stale"
    REVOCATION_UNKNOWN = "revocation_unknown"
    NO_EMAIL_ADDRESS = "no_email_address"
    EMAIL_MISMATCH = "email_mismatch"
    WEAK_KEY = "weak_key"
    WEAK_SIGNATURE = "weak_signature"
    NEGATIVE_SERIAL = "negative_serial"
    DUPLICATE = "duplicate"
    OVER_LIMIT = "over_limit"

    @property
    def sentence(self) -> str:
        return _SENTENCES[self]


_SENTENCES: dict[Reason, str] = {
    Reason.MALFORMED: "The value is not a readable certificate or PKCS#7 structure.",
    Reason.TOO_LARGE: "The value is larger than any real certificate blob and was not parsed.",
    Reason.NO_CERTIFICATE: "The PKCS#7 blob carries no certificate.",
    Reason.NOT_YET_VALID: "The certificate's validity period has not started yet.",
    Reason.EXPIRED: "The certificate has expired.",
    Reason.NO_EMAIL_PROTECTION_EKU: "The certificate is not issued for e-mail protection (EKU).",
    Reason.PROFILE_EKU_FORBIDDEN: "A certificate in the chain breaks the configured profile's "
    "extended key usage rules.",
    Reason.KEY_USAGE_UNFIT: "The certificate's key usage does not allow S/MIME signing or "
    "encryption for its key type.",
    Reason.NOT_END_ENTITY: "The value is a CA certificate, not a user's certificate.",
    Reason.UNKNOWN_ISSUER: "The certificate does not chain to a configured trust anchor "
    "(unknown issuer or missing intermediate).",
    Reason.CHAIN_INVALID: "The certificate or its chain to a configured trust anchor breaks RFC 5280.",
    Reason.REVOKED: "The certificate is revoked by its issuer's CRL.",
    Reason.CRL_STALE: "The issuer's CRL is too old to decide whether the certificate is revoked.",
    Reason.REVOCATION_UNKNOWN: "Revocation could not be checked: no usable configured CRL covers "
    "the certificate's issuer.",
    Reason.NO_EMAIL_ADDRESS: "The certificate names no e-mail address.",
    Reason.EMAIL_MISMATCH: "None of the certificate's e-mail addresses belongs to the user.",
    Reason.WEAK_KEY: "The certificate's public key is too weak or of a disallowed type.",
    Reason.WEAK_SIGNATURE: "The certificate is signed with a broken hash algorithm (MD5 or SHA-1).",
    Reason.NEGATIVE_SERIAL: "The certificate's serial number is negative or zero.",
    Reason.DUPLICATE: "The same end-entity certificate occurs more than once for this user (another packaging of it is kept).",
    Reason.OVER_LIMIT: "More valid certificates than the per-recipient limit; older ones dropped.",
}
