"""The certificates and encryption-key preferences of a PKCS#7 SignedData, read straight from DER.

asn1crypto builds an object for every element it touches: 455 us a blob of the lab's, against 13 us
for a DER certificate's whole parse. Outlook and most tools publish plain DER; this reader
takes what parse.py needs from it (each certificate's encoding and the (issuer, serial) pairs the
signers prefer for encryption) and answers None for anything else: BER, other certificate choices,
other preference forms, no certificates. asn1crypto then reads the blob and gives the exact reason.
"""

from __future__ import annotations

from typing import NamedTuple

from certsync.certificates.der import Element, Unusual, children, whole

SIGNED_DATA = bytes.fromhex("2a864886f70d010702")  # 1.2.840.113549.1.7.2
_SMIME_PREFERENCE = bytes.fromhex("2a864886f70d010910020b")  # 1.2.840.113549.1.9.16.2.11
_MS_PREFERENCE = bytes.fromhex("2b0601040182371004")  # 1.3.6.1.4.1.311.16.4
SEQUENCE, SET, INTEGER, OCTET_STRING, OID = 0x30, 0x31, 0x02, 0x04, 0x06
CONTEXT_0, CONTEXT_1, KEY_ID = 0xA0, 0xA1, 0x80  # KEY_ID: [0] IMPLICIT SubjectKeyIdentifier


class SignedDataParts(NamedTuple):
    certificates: list[bytes]  # each certificate's DER, in the blob's order
    preferred: list[tuple[bytes, int]]  # (issuer Name DER, serial) named by the signers, in order


def read_signed_data(blob: bytes) -> SignedDataParts | None:
    """The blob's parts, or None when asn1crypto has to read it."""
    try:
        return _read(blob)
    except (Unusual, IndexError):
        return None


def _read(blob: bytes) -> SignedDataParts:
    oid, content = children(blob, whole(blob, SEQUENCE), OID, CONTEXT_0)  # ContentInfo
    if blob[oid.content : oid.end] != SIGNED_DATA:
        raise Unusual
    (signed,) = children(blob, content, SEQUENCE)
    # version, digestAlgorithms, encapContentInfo, [0] certificates, [1] crls (optional), signerInfos
    fields = children(blob, signed)
    tags = tuple(field.tag for field in fields)
    if tags not in (
        (INTEGER, SET, SEQUENCE, CONTEXT_0, SET),
        (INTEGER, SET, SEQUENCE, CONTEXT_0, CONTEXT_1, SET),
    ):
        raise Unusual
    choices = children(blob, fields[3])
    if not choices or any(choice.tag != SEQUENCE for choice in choices):
        raise Unusual  # no certificates, or other CertificateChoices
    preferred = [key for info in children(blob, fields[-1]) for key in _signer_preferences(blob, info)]
    return SignedDataParts([blob[choice.start : choice.end] for choice in choices], preferred)


def _signer_preferences(blob: bytes, info: Element) -> list[tuple[bytes, int]]:
    # SignerInfo: version, sid, digestAlgorithm, [0] signedAttrs (optional), signatureAlgorithm,
    # signature, [1] unsignedAttrs (optional); sid is an IssuerAndSerialNumber or a [0] key id.
    fields = children(blob, info)
    if info.tag != SEQUENCE or tuple(field.tag for field in fields) not in _SIGNER_INFO_SHAPES:
        raise Unusual
    if fields[3].tag != CONTEXT_0:
        return []
    keys = []
    for attribute in children(blob, fields[3]):
        if attribute.tag != SEQUENCE:
            raise Unusual
        oid, values = children(blob, attribute, OID, SET)
        kind = blob[oid.content : oid.end]
        for value in children(blob, values) if kind in _PREFERENCES else ():
            if value.tag != _PREFERENCES[kind]:
                raise Unusual  # a key identifier, not an issuer and serial number
            keys.append(_issuer_and_serial(blob, value))
    return keys


_SIGNER_INFO_SHAPES = {
    (INTEGER, sid, SEQUENCE, *signed, SEQUENCE, OCTET_STRING, *unsigned)
    for sid in (SEQUENCE, KEY_ID)
    for signed in ((), (CONTEXT_0,))
    for unsigned in ((), (CONTEXT_1,))
}
# SMIMEEncryptionKeyPreference is a CHOICE whose [0] IMPLICIT alternative is IssuerAndSerialNumber;
# Microsoft's attribute holds an IssuerAndSerialNumber as it is.
_PREFERENCES = {_SMIME_PREFERENCE: CONTEXT_0, _MS_PREFERENCE: SEQUENCE}


def _issuer_and_serial(blob: bytes, value: Element) -> tuple[bytes, int]:
    issuer, serial = children(blob, value, SEQUENCE, INTEGER)
    if serial.content == serial.end:
        raise Unusual
    return blob[issuer.start : issuer.end], int.from_bytes(
        blob[serial.content : serial.end], "big", signed=True
    )
