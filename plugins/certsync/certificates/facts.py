"""Read the descriptive fields of a certificate defensively (hostile encodings must not raise)."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from certsync.certificates.names import issuer_from_der, subject_from_der

SMTP_UTF8_MAILBOX = ObjectIdentifier("1.3.6.1.5.5.7.8.9")
MAX_NAME_CHARS = 512


class Facts(NamedTuple):
    """A NamedTuple, not a frozen dataclass: validation makes one per value (see Verdict)."""

    subject: str
    serial: str
    serial_number: int
    not_before: datetime | None
    not_after: datetime | None
    emails: tuple[str, ...]
    san_emails: bool  # True when the addresses come from subjectAltName, not the subject DN
    subject_rdns: int | None = None  # RDNs in the subject when read from DER; None: not counted


Extensions = dict[type, x509.ExtensionType]


def extension_map(cert: x509.Certificate) -> Extensions:
    """One pass over the extensions (get_extension_for_class scans them on every call)."""
    return {type(ext.value): ext.value for ext in cert.extensions}


def describe(
    cert: x509.Certificate, serial: int, extensions: Extensions, *, der: bytes | None = None
) -> Facts:
    """Subject, serial, dates and addresses; the issuer is named by the chain (see name_text).

    `der`, the certificate's own encoding, lets common subjects be read without cryptography's
    Name objects; the text is the same either way."""
    san = _san_emails(extensions)
    emails = san or _subject_emails(cert)
    fast = subject_from_der(der) if der is not None else None
    return Facts(
        subject=fast.text[:MAX_NAME_CHARS] if fast else name_text(cert, "subject"),
        serial=_serial_hex(serial),
        serial_number=serial,
        not_before=_safe_time(cert, "not_valid_before_utc"),
        not_after=_safe_time(cert, "not_valid_after_utc"),
        emails=tuple(dict.fromkeys(emails)),
        san_emails=bool(san),
        subject_rdns=fast.rdn_count if fast else None,
    )


def _serial_hex(serial: int) -> str:
    return f"-{-serial:x}" if serial < 0 else f"{serial:x}"


def _safe_time(cert: x509.Certificate, attr: str) -> datetime | None:
    try:
        return getattr(cert, attr)
    except Exception:  # unreadable times are reported as missing, the checks refuse them
        return None


def name_text(cert: x509.Certificate, which: str) -> str:
    try:
        text = getattr(cert, which).rfc4514_string()
    except Exception:  # e.g. non-ASCII T61String: cryptography refuses, asn1crypto copes
        text = _asn1_name_text(cert, which)
    return text[:MAX_NAME_CHARS]


def issuer_text(cert: x509.Certificate, der: bytes | None) -> str:
    """The issuer's name, read from `der` (the certificate's own encoding) when it is a common one."""
    fast = issuer_from_der(der) if der is not None else None
    return fast[:MAX_NAME_CHARS] if fast is not None else name_text(cert, "issuer")


def _asn1_name_text(cert: x509.Certificate, which: str) -> str:
    from asn1crypto import x509 as asn1_x509  # rare fallback; asn1crypto is slow to import

    try:
        der = cert.tbs_certificate_bytes
        tbs = asn1_x509.TbsCertificate.load(der)
        return tbs[which].human_friendly
    except Exception:  # nothing readable left; say so rather than fail
        return "<undecodable name>"


def _san_emails(extensions: Extensions) -> list[str]:
    san = extensions.get(x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return []
    # One pass instead of get_values_for_type twice; rfc822Names still come before otherNames.
    found, utf8 = [], []
    for name in san:
        if isinstance(name, x509.RFC822Name):
            found.append(name.value.lower())
        elif isinstance(name, x509.OtherName) and name.type_id == SMTP_UTF8_MAILBOX:
            utf8.extend(_utf8_mailbox(name.value))
    return found + utf8


def _utf8_mailbox(value: bytes) -> list[str]:
    from asn1crypto import core as asn1_core  # SmtpUTF8Mailbox names are rare; asn1crypto is slow to import

    try:
        return [asn1_core.UTF8String.load(value).native.lower()]
    except Exception:  # a broken otherName is ignored; other addresses may still match
        return []


def _subject_emails(cert: x509.Certificate) -> list[str]:
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    except Exception:  # undecodable subject: no fallback address
        return []
    return [str(a.value).lower() for a in attrs]
