"""Turn one raw attribute value into a leaf certificate plus untrusted helper certificates.

userCertificate holds one DER X.509 certificate; userSMIMECertificate holds a PKCS#7 SignedData
(certs-only or signed, DER or BER). From a PKCS#7 blob the end-entity (encryption) certificate is the
leaf; the other certificates are only candidates for path building, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509

from certsync.certificates.names import issuer_der
from certsync.certificates.reasons import Reason
from certsync.certificates.signed_data import read_signed_data

if TYPE_CHECKING:
    from asn1crypto import cms

log = logging.getLogger(__name__)

USER_CERTIFICATE = "userCertificate"
USER_SMIME_CERTIFICATE = "userSMIMECertificate"
ATTRIBUTES = (USER_CERTIFICATE, USER_SMIME_CERTIFICATE)
# Real blobs (a leaf plus a chain or two) stay far below this; anything bigger is hostile or junk.
MAX_VALUE_BYTES = 64 * 1024
MS_ENCRYPTION_KEY_PREFERENCE = "1.3.6.1.4.1.311.16.4"
SMIME_ENCRYPTION_KEY_PREFERENCE = "1.2.840.113549.1.9.16.2.11"  # asn1crypto's "encrypt_key_pref"


class Parsed(NamedTuple):
    """One value read: its leaf and the other certificates, or why it could not be. A NamedTuple,
    not a frozen dataclass: validation makes one per value (see Verdict)."""

    attribute: str
    sha256: bytes
    leaf: bytes | None = None
    extra: tuple[bytes, ...] = ()
    error: Reason | None = None
    detail: str = ""
    certificate: x509.Certificate | None = None
    serial_number: int | None = None
    extra_certificates: tuple[x509.Certificate, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


def load_certificate(der: bytes) -> x509.Certificate:
    return load_with_serial(der)[0]


def load_with_serial(der: bytes) -> tuple[x509.Certificate, int]:
    """Load DER quietly: negative serials warn on every access, and the verdict reports them."""
    if _serial_looks_positive(der):
        # Silencing warnings costs more than the load itself; only pay for it when needed.
        cert = x509.load_der_x509_certificate(der)
        return cert, cert.serial_number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cert = x509.load_der_x509_certificate(der)
        return cert, cert.serial_number


def _header_end(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    return pos + 2 + (first & 0x7F if first & 0x80 else 0)


def _serial_looks_positive(der: bytes) -> bool:
    """Peek at the serial INTEGER of Certificate.tbsCertificate without parsing the rest."""
    try:
        pos = _header_end(der, _header_end(der, 0))  # into Certificate, then into TBSCertificate
        if der[pos] == 0xA0:  # [0] version
            pos = _header_end(der, pos) + der[pos + 1] if der[pos + 1] < 0x80 else -1
        if pos < 0 or der[pos] != 0x02 or der[pos + 1] & 0x80:
            return False
        length, first = der[pos + 1], der[pos + 2]
        return not first & 0x80 and (length > 1 or first != 0)
    except IndexError:
        return False


def parse_value(*, attribute: str, value: bytes, max_bytes: int = MAX_VALUE_BYTES) -> Parsed:
    """Parse one attribute value; never raises (errors come back as a reason)."""
    digest = hashlib.sha256(value).digest()
    if len(value) > max_bytes:
        detail = f"value of {len(value)} bytes exceeds the {max_bytes} byte limit"
        return Parsed(attribute=attribute, sha256=digest, error=Reason.TOO_LARGE, detail=detail)
    try:
        if attribute == USER_SMIME_CERTIFICATE:
            return _parse_pkcs7(attribute, digest, bytes(value))
        if attribute == USER_CERTIFICATE:
            cert, serial = load_with_serial(bytes(value))
            return Parsed(
                attribute=attribute,
                sha256=digest,
                leaf=bytes(value),
                certificate=cert,
                serial_number=serial,
            )
        detail = f"unsupported attribute {attribute[:64]!r}"
    except Exception as exc:  # hostile input must never escape as an exception
        message = " ".join(str(exc).split())[:200]
        detail = f"cannot parse {attribute[:64]}: {type(exc).__name__}: {message}"
    return Parsed(attribute=attribute, sha256=digest, error=Reason.MALFORMED, detail=detail)


def _parse_pkcs7(attribute: str, digest: bytes, value: bytes) -> Parsed:
    parts = read_signed_data(value)
    if parts is None:  # BER, something unusual or broken: asn1crypto reads it and says what is wrong
        return _parse_pkcs7_asn1(attribute, digest, value)
    return _with_leaf(attribute, digest, parts.certificates, parts.preferred)


def _parse_pkcs7_asn1(attribute: str, digest: bytes, value: bytes) -> Parsed:
    # Imported here: asn1crypto's CMS module costs as much to import as cryptography's x509, and only
    # userSMIMECertificate values that the DER reader leaves need it.
    from asn1crypto import cms

    info = cms.ContentInfo.load(value, strict=True)
    if info["content_type"].native != "signed_data":
        detail = f"PKCS#7 content type {info['content_type'].dotted} is not SignedData"
        return Parsed(attribute=attribute, sha256=digest, error=Reason.MALFORMED, detail=detail)
    signed = info["content"]
    choices = signed["certificates"]
    asn1_certs = [c.chosen for c in choices if c.name == "certificate"] if choices else []
    if not asn1_certs:
        detail = "PKCS#7 SignedData without certificates"
        return Parsed(attribute=attribute, sha256=digest, error=Reason.NO_CERTIFICATE, detail=detail)
    return _with_leaf(attribute, digest, [c.dump() for c in asn1_certs], _preferred_keys(signed))


def _with_leaf(
    attribute: str, digest: bytes, ders: list[bytes], preferred: list[tuple[bytes, int]]
) -> Parsed:
    loaded = [load_with_serial(d) for d in ders]
    certs = [cert for cert, _serial in loaded]
    index = _pick_leaf(ders, certs, [serial for _cert, serial in loaded], preferred)
    return Parsed(
        attribute=attribute,
        sha256=digest,
        leaf=ders[index],
        extra=tuple(d for i, d in enumerate(ders) if i != index),
        certificate=certs[index],
        serial_number=loaded[index][1],
        extra_certificates=tuple(c for i, c in enumerate(certs) if i != index),
    )


def _preferred_keys(signed: cms.SignedData) -> list[tuple[bytes, int]]:
    """(issuer DER, serial) of the encryption certificates the signers named.

    SMIMEEncryptionKeyPreference and Microsoft's attribute name the encryption certificate, which
    may differ from the signing certificate when a user has separate keys.
    """
    preferred: list[tuple[bytes, int]] = []
    for info in signed["signer_infos"]:
        for attr in info["signed_attrs"] or []:
            preferred.extend(_preference_from(attr))
    return preferred


def _preference_from(attr: cms.CMSAttribute) -> list[tuple[bytes, int]]:
    from asn1crypto import cms

    kind = attr["type"].dotted
    if kind not in (SMIME_ENCRYPTION_KEY_PREFERENCE, MS_ENCRYPTION_KEY_PREFERENCE):
        return []  # decoding the values of every other attribute cost more than the rest of the parse
    keys = []
    for value in attr["values"]:
        if kind == SMIME_ENCRYPTION_KEY_PREFERENCE and value.name == "issuer_and_serial_number":
            keys.append(_ias_key(value.chosen))
        elif kind == MS_ENCRYPTION_KEY_PREFERENCE:
            keys.append(_ias_key(cms.IssuerAndSerialNumber.load(value.dump())))
    return keys


def _ias_key(ias: cms.IssuerAndSerialNumber) -> tuple[bytes, int]:
    return ias["issuer"].dump(), ias["serial_number"].native


def _pick_leaf(ders: list[bytes], certs: list[x509.Certificate], serials: list[int], wanted: list) -> int:
    for issuer, serial in wanted:
        # The serial (already read) first, then the issuer as the certificate encodes it.
        for i, cert in enumerate(certs):
            if serials[i] == serial and issuer_der(ders[i]) == issuer:
                if not _is_ca(cert):
                    return i
                break  # the first certificate with that key decides, as before
    end_entities = [i for i, c in enumerate(certs) if not _is_ca(c)]
    for i in end_entities:
        if _can_encrypt(certs[i]):
            return i
    return end_entities[0] if end_entities else 0


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except Exception:  # absent or unreadable: the validator decides later
        return False


def _can_encrypt(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except Exception:  # absent means unrestricted
        return True
    return usage.key_encipherment or usage.key_agreement
