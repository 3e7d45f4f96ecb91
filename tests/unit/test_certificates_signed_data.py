"""The DER SignedData reader gives exactly what asn1crypto's reading gives, or steps aside."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certsync.certificates.der import Element, children, whole
from certsync.certificates.parse import _parse_pkcs7_asn1, parse_value
from certsync.certificates.reasons import Reason
from certsync.certificates.signed_data import read_signed_data
from certsync_lab.pki import Pki, pkcs7_without_certificates, to_indefinite_length

SMIME = "userSMIMECertificate"
FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def blobs() -> dict[str, bytes]:
    pki = Pki(algorithm="ec", seed=17)
    signer, encryption = pki.issue(email="a@example.org"), pki.issue(email="a@example.org")
    inter = pki.ca_der("intermediate")
    return {
        "certs_only": pki.pkcs7_certs_only([signer]),
        "certs_only_ca_first": pki.pkcs7_certs_only([inter, encryption, signer]),
        "signed": pki.pkcs7_signed(signer=signer, extra=[inter]),
        "outlook": pki.pkcs7_signed(signer=signer, encryption_cert=encryption, extra=[inter]),
        "encryption": encryption,
    }


def _by_asn1crypto(value: bytes) -> tuple[object, ...]:
    try:
        parsed = _parse_pkcs7_asn1(SMIME, hashlib.sha256(value).digest(), value)
    except Exception:  # parse_value turns any error into a refusal
        return None, (), Reason.MALFORMED, None
    return parsed.leaf, parsed.extra, parsed.error, parsed.serial_number


def _as_parsed(value: bytes) -> tuple[object, ...]:
    parsed = parse_value(attribute=SMIME, value=value)
    return parsed.leaf, parsed.extra, parsed.error, parsed.serial_number


@pytest.mark.parametrize("name", ["certs_only", "certs_only_ca_first", "signed", "outlook"])
def test_der_blobs_are_read_without_asn1crypto_and_identically(blobs, name):
    parts = read_signed_data(blobs[name])
    assert parts is not None
    assert _as_parsed(blobs[name]) == _by_asn1crypto(blobs[name])
    if name == "outlook":  # both preference attributes name the encryption certificate
        assert len(parts.preferred) == 2 and parts.preferred[0] == parts.preferred[1]


def test_the_encryption_certificate_is_picked_by_the_preference(blobs):
    parsed = parse_value(attribute=SMIME, value=blobs["outlook"])
    parts = read_signed_data(blobs["outlook"])
    assert parts is not None
    issuer, serial = parts.preferred[0]
    assert parsed.serial_number == serial and issuer in parsed.leaf
    assert parsed.leaf == blobs["encryption"] and parsed.leaf in parts.certificates


@pytest.mark.parametrize("name", ["certs_only", "outlook"])
def test_ber_and_trailing_bytes_are_left_to_asn1crypto(blobs, name):
    ber = to_indefinite_length(blobs[name])
    assert read_signed_data(ber) is None
    assert _as_parsed(ber) == _by_asn1crypto(ber) == _as_parsed(blobs[name])
    assert read_signed_data(blobs[name] + b"\x00") is None
    assert parse_value(attribute=SMIME, value=blobs[name] + b"\x00").error == Reason.MALFORMED


def test_a_blob_without_certificates_is_left_to_asn1crypto():
    empty = pkcs7_without_certificates()
    assert read_signed_data(empty) is None
    assert parse_value(attribute=SMIME, value=empty).error == Reason.NO_CERTIFICATE


@FAST
@given(data=st.data(), name=st.sampled_from(["certs_only_ca_first", "outlook"]))
def test_damaged_blobs_are_read_identically_or_left_to_asn1crypto(blobs, data, name):
    value = bytearray(blobs[name])
    # Anywhere, or among the signers' fields and attributes at the end, which the reader checks too.
    low = data.draw(st.sampled_from([0, len(value) - 700]))
    for _ in range(data.draw(st.integers(1, 4))):
        value[data.draw(st.integers(low, len(value) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(value)))
    value = bytes(value[:cut])
    if read_signed_data(value) is not None:
        assert _as_parsed(value) == _by_asn1crypto(value)


def _tag_offsets(blob: bytes, parent: Element) -> list[int]:
    """The offset of every element's tag inside `parent`, at any depth, but not inside
    certificates: cryptography reads those whole, in both readings."""
    found = []
    for child in children(blob, parent):
        found.append(child.start)
        tbs = children(blob, child)[0] if child.tag == 0x30 and child.end - child.start > 300 else None
        if child.tag & 0x20 and not (tbs and tbs.tag == 0x30 and blob[tbs.content] == 0xA0):
            found += _tag_offsets(blob, child)
    return found


@pytest.mark.parametrize("name", ["certs_only_ca_first", "outlook"])
def test_every_element_with_another_tag_is_read_identically_or_left_to_asn1crypto(blobs, name):
    blob = blobs[name]
    offsets = _tag_offsets(blob, whole(blob, 0x30))
    assert len(offsets) > 10
    for offset in offsets:
        for tag in (0x02, 0x04, 0x06, 0x0C, 0x30, 0x31, 0x80, 0xA0, 0xA1, 0xA2):
            value = blob[:offset] + bytes([tag]) + blob[offset + 1 :]
            if read_signed_data(value) is not None:
                assert _as_parsed(value) == _by_asn1crypto(value), (offset, tag)
