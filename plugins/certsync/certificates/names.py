"""The subject and issuer of a certificate as RFC 4514 text, read straight from its DER.

cryptography builds a Python object for every attribute of a Name before it can format it, which
costs about a tenth of a full validation. Names made only of common single-valued attributes with
ordinary string types are formatted here exactly as `Name.rfc4514_string()` would format them; for
anything else (multi-valued RDNs, other OIDs or string types, length limits cryptography enforces,
undecodable bytes) `subject_from_der` answers None and the caller asks cryptography.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from certsync.certificates.der import Element, Unusual, element, element_end, header_end

# Attribute OID (DER content) -> the name cryptography's rfc4514_string() shows for it: RFC 4514 short
# names where cryptography has one, the dotted OID otherwise.
_ATTRIBUTE_NAMES = {
    bytes.fromhex("550403"): "CN",
    bytes.fromhex("550405"): "2.5.4.5",  # serialNumber
    bytes.fromhex("550406"): "C",
    bytes.fromhex("550407"): "L",
    bytes.fromhex("550408"): "ST",
    bytes.fromhex("550409"): "STREET",
    bytes.fromhex("55040a"): "O",
    bytes.fromhex("55040b"): "OU",
    bytes.fromhex("55040c"): "2.5.4.12",  # title
    bytes.fromhex("55042a"): "2.5.4.42",  # givenName
    bytes.fromhex("550404"): "2.5.4.4",  # surname
    bytes.fromhex("0992268993f22c640119"): "DC",
    bytes.fromhex("0992268993f22c640101"): "UID",
    bytes.fromhex("2a864886f70d010901"): "1.2.840.113549.1.9.1",  # emailAddress
}
# cryptography refuses (or warns about) values outside these UTF-8 byte lengths; leave them to it.
_LENGTH_LIMITS = {bytes.fromhex("550403"): (1, 64), bytes.fromhex("550406"): (2, 2)}
UTF8_STRING, PRINTABLE_STRING, IA5_STRING = 0x0C, 0x13, 0x16
_PRINTABLE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
_SPECIAL = re.compile(r'[\\"+,;<>\x00]')
_SPECIALS = str.maketrans(
    {"\\": "\\\\", '"': '\\"', "+": "\\+", ",": "\\,", ";": "\\;", "<": "\\<", ">": "\\>", "\0": "\\00"}
)


RDN_CACHE_SIZE = 4096
_rdn_texts: dict[bytes, str] = {}


class SubjectText(NamedTuple):
    text: str
    rdn_count: int


def subject_from_der(der: bytes) -> SubjectText | None:
    """The subject's RFC 4514 text and RDN count, or None when cryptography has to read it."""
    return _name_text(der, _SUBJECT)


def issuer_from_der(der: bytes) -> str | None:
    """The issuer's RFC 4514 text, or None when cryptography has to read it."""
    found = _name_text(der, _ISSUER)
    return found.text if found else None


def issuer_der(der: bytes) -> bytes | None:
    """The issuer Name exactly as encoded (as PKCS#7 signers name a certificate), or None."""
    try:
        name = _tbs_name(der, _ISSUER)
    except (Unusual, IndexError):
        return None
    return der[name.start : name.end]


_ISSUER, _SUBJECT = 3, 5  # TBSCertificate: serial, signature, issuer, validity, subject (after version)


def _name_text(der: bytes, index: int) -> SubjectText | None:
    try:
        name = _tbs_name(der, index)
        start, parts = name.content, []
        while start < name.end:
            text, start = _rdn(der, start)
            parts.append(text)
    except (Unusual, IndexError, UnicodeDecodeError):
        return None
    if start != name.end:
        return None
    return SubjectText(",".join(reversed(parts)), len(parts))


def _tbs_name(der: bytes, index: int) -> Element:
    """The issuer or subject Name of a certificate, without reading the fields after it."""
    pos = header_end(der, header_end(der, 0))  # into Certificate, then into TBSCertificate
    if der[pos] == 0xA0:  # [0] EXPLICIT version
        pos = element_end(der, pos)
    for expected in (0x02, 0x30, 0x30, 0x30)[: index - 1]:  # serial, signature, issuer, validity
        if der[pos] != expected:
            raise Unusual
        pos = element_end(der, pos)
    if der[pos] != 0x30:
        raise Unusual
    return element(der, pos, len(der))


def _rdn(der: bytes, pos: int) -> tuple[str, int]:
    """One RDN's text and the offset after it. A directory's issuers repeat, and so do its
    subjects' RDNs but the common name: each encoding is formatted once per process."""
    if der[pos] != 0x31 or der[pos + 1] & 0x80:
        raise Unusual
    end = pos + 2 + der[pos + 1]
    if end > len(der):
        raise Unusual
    raw = der[pos:end]
    text = _rdn_texts.get(raw)
    if text is None:
        text = _rdn_text(raw)
        if len(_rdn_texts) >= RDN_CACHE_SIZE:
            _rdn_texts.clear()  # unique common names fill it; the shared RDNs come back at once
        _rdn_texts[raw] = text
    return text, end


def _rdn_text(rdn: bytes) -> str:
    """One RDN holding exactly one attribute, all with short-form lengths:
    SET { SEQUENCE { OID, string } } is 31 L1 30 L2 06 L3 <oid> T L4 <value>."""
    if rdn[2] != 0x30 or rdn[4] != 0x06:
        raise Unusual
    seq_len, oid_len = rdn[3], rdn[5]
    oid_end = 6 + oid_len
    tag, value_len = rdn[oid_end], rdn[oid_end + 1]
    if (seq_len | oid_len | value_len) & 0x80:
        raise Unusual
    end = len(rdn)
    if 4 + seq_len != end or oid_end + 2 + value_len != end:
        raise Unusual
    oid = rdn[6:oid_end]
    name = _ATTRIBUTE_NAMES.get(oid)
    low, high = _LENGTH_LIMITS.get(oid, (1, value_len))
    if name is None or not low <= value_len <= high:
        raise Unusual
    return f"{name}={_escape(_decode(tag, rdn[oid_end + 2 : end]))}"


def _decode(tag: int, raw: bytes) -> str:
    if tag == UTF8_STRING:
        return raw.decode("utf-8")
    if tag == PRINTABLE_STRING and not raw.translate(None, _PRINTABLE):
        return raw.decode("ascii")
    if tag == IA5_STRING and raw.isascii():
        return raw.decode("ascii")
    raise Unusual


def _escape(value: str) -> str:
    """RFC 4514 2.4 escaping, as cryptography applies it."""
    if _SPECIAL.search(value) is None and value[0] not in "# " and value[-1] != " ":
        return value
    value = value.translate(_SPECIALS)
    if value[0] == "#" or (value[0] == " " and len(value) > 1):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value
