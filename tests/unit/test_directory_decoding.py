"""The lean decoder of search entries reads what ldap3's generic BER decoder reads, and hands every
message it was not made for back to ldap3."""

from __future__ import annotations

import ldap3
import pytest
from ldap3.strategy.sync import SyncStrategy
from ldap3.utils.asn1 import decode_message_fast

from certsync.directory.decoding import _decode_message, decode_entries_raw, decode_entry


def tlv(tag: int, content: bytes) -> bytes:
    """One BER element with a definite length (short form below 128, else long form)."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    width = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | width]) + n.to_bytes(width, "big") + content


def entry(
    message_id: int, dn: bytes, attributes: list[tuple[bytes, list[bytes]]], tail: bytes = b""
) -> bytes:
    attrs = b"".join(
        tlv(0x30, tlv(0x04, name) + tlv(0x31, b"".join(tlv(0x04, v) for v in values)))
        for name, values in attributes
    )
    mid = message_id.to_bytes((message_id.bit_length() + 8) // 8, "big", signed=True)
    return tlv(0x30, tlv(0x02, mid) + tlv(0x64, tlv(0x04, dn) + tlv(0x30, attrs)) + tail)


def ldap3_reads(message: bytes) -> tuple[int, bytes, dict[str, list[bytes]]]:
    decoded = decode_message_fast(message)
    assert decoded["protocolOp"] == 4
    dn, attributes = decoded["payload"][0][3], decoded["payload"][1][3]
    raw = {bytes(a[3][0][3]).decode(): [bytes(v[3]) for v in a[3][1][3]] for a in attributes}
    return decoded["messageID"], bytes(dn), raw


CASES = {
    "lengths of every form": (
        300,
        b"CN=Anna,OU=Users,DC=corp",
        [
            (b"objectGUID", [bytes(range(16))]),
            (b"userCertificate", [b"", b"\x01" * 127, b"\x02" * 128, b"\x03" * 255, b"\x04" * 256, b"\x05" * 70_000]),
            (b"proxyAddresses", [b"SMTP:anna@corp.example.test", b"smtp:a@corp.example.test"]),
            (b"mail", []),
        ],
    ),
    "no attributes": (1, b"CN=Ben,DC=corp", []),
    "a long DN and a large message id": (2**31 - 1, "CN=Zoë ".encode() * 40, [(b"displayName", [b"Zo\xc3\xab"])]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_reads_what_ldap3_reads(case: str) -> None:
    message = entry(*CASES[case])
    assert decode_entry(message) == ldap3_reads(message)
    assert _decode_message(message)["entry"] == ldap3_reads(message)[1:]


def test_an_entry_with_controls_goes_to_ldap3() -> None:
    controls = tlv(0xA0, tlv(0x30, tlv(0x04, b"1.2.840.113556.1.4.319")))
    message = entry(5, b"CN=Cy,DC=corp", [(b"mail", [b"cy@corp.example.test"])], tail=controls)
    with pytest.raises(ValueError):
        decode_entry(message)
    decoded = _decode_message(message)
    assert "entry" not in decoded and decoded["controls"] is not None


def test_other_messages_and_odd_shapes_go_to_ldap3() -> None:
    done = tlv(0x30, tlv(0x02, b"\x07") + tlv(0x65, tlv(0x0A, b"\x00") + tlv(0x04, b"") + tlv(0x04, b"")))
    decoded = _decode_message(done)
    assert decoded["protocolOp"] == 5 and "entry" not in decoded  # searchResDone
    good = entry(9, b"CN=Di,DC=corp", [(b"mail", [b"di@corp.example.test"])])
    # A value that is not an OCTET STRING, and a message cut short: ldap3 decides what they are.
    odd = good.replace(b"\x04\x14di@", b"\x02\x14di@")
    for message in (odd, good[:-3]):
        with pytest.raises((ValueError, IndexError)):
            decode_entry(message)


def test_the_reader_connections_decode_entries_lean() -> None:
    """The lean decoder runs inside ldap3's receive loop, which must still name the decoder it
    calls (an ldap3 upgrade that renamed it would leave every entry to the generic decoder)."""
    assert "decode_message_fast" in SyncStrategy._get_response.__code__.co_names
    conn = decode_entries_raw(ldap3.Connection(ldap3.Server("ldap.invalid"), read_only=True))
    message = entry(3, b"CN=Eve,DC=corp", [(b"mail", [b"eve@corp.example.test"])])
    assert conn.strategy._get_response.__globals__["decode_message_fast"](message)["entry"] == (
        b"CN=Eve,DC=corp",
        {"mail": [b"eve@corp.example.test"]},
    )
    assert conn.strategy.decode_response_fast(_decode_message(message))["raw_attributes"] == {
        "mail": [b"eve@corp.example.test"]
    }
    # Other connections in the process keep ldap3's own loop.
    assert (
        ldap3.Connection(ldap3.Server("ldap.invalid")).strategy._get_response.__func__
        is SyncStrategy._get_response
    )
