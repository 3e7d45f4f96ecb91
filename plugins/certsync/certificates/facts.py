"""Read the descriptive fields of a certificate defensively (hostile encodings must not raise)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

SMTP_UTF8_MAILBOX = ObjectIdentifier("1.3.6.1.5.5.7.8.9")
MAX_NAME_CHARS = 512


@dataclass(frozen=True)
class Facts:
    subject: str
    serial: str
    serial_number: int
    not_before: datetime | None
    not_after: datetime | None
    emails: tuple[str, ...]
    san_emails: bool  # True when the addresses come from subjectAltName, not the subject DN


Extensions = dict[type, x509.ExtensionType]


def extension_map(cert: x509.Certificate) -> Extensions:
    """One pass over the extensions (get_extension_for_class scans them on every call)."""
    return {type(ext.value): ext.value for ext in cert.extensions}


def describe(cert: x509.Certificate, serial: int, extensions: Extensions) -> Facts:
    """Subject, serial, dates and addresses; the issuer is named by the chain (see name_text)."""
    san = _san_emails(extensions)
    emails = san or _subject_emails(cert)
    return Facts(
        subject=name_text(cert, "subject"),
        serial=_serial_hex(serial),
        serial_number=serial,
        not_before=_safe_time(cert, "not_valid_before_utc"),
        not_after=_safe_time(cert, "not_valid_after_utc"),
        emails=tuple(dict.fromkeys(emails)),
        san_emails=bool(san),
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


def _asn1_name_text(cert: x509.Certificate, which: str) -> str:
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
    found = [e.lower() for e in san.get_values_for_type(x509.RFC822Name)]
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == SMTP_UTF8_MAILBOX:
            found.extend(_utf8_mailbox(other.value))
    return found


def _utf8_mailbox(value: bytes) -> list[str]:
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
