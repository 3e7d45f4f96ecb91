"""Search entries decoded to raw bytes only, by a decoder made for them.

ldap3 turns every search entry into two copies: the raw values, and values formatted through the
schema into a case-insensitive dict. certsync reads only the raw values, and building the second copy
took half of the reader's CPU (bench/README.md, "Directory extraction"). Before that, ldap3's generic
BER decoder builds a tuple for every element of the message; it then took 44% of a full extract's
samples. While this process decodes a page, the server waits for the next page's request (the
cookie comes last), so every second spent here lengthens the read.

The reader's connections therefore decode a search entry with a decoder that knows its one shape
(RFC 4511 SearchResultEntry) and keeps the DN and the values as bytes. Anything else (other
messages, entries with controls, a shape it does not expect) goes through ldap3's own decoder.

Attribute names are kept as the server sends them: Active Directory (and Samba) return an attribute
under its schema name (lDAPDisplayName) whatever case it was requested in, and certsync requests
every attribute by that name.
"""

from __future__ import annotations

import types
from typing import Any

import ldap3
from ldap3.strategy import sync
from ldap3.utils.asn1 import decode_message_fast

SEARCH_RESULT_ENTRY = 4  # LDAP protocolOp of a searchResEntry (RFC 4511)
SEQUENCE, SET, INTEGER, OCTET_STRING, ENTRY = 0x30, 0x31, 0x02, 0x04, 0x64  # BER tags


class _Shape(ValueError):
    """Not a searchResEntry this decoder reads (ldap3's decoder takes the message)."""


def _element(message: bytes, at: int, tag: int) -> tuple[int, int]:
    """(start, end) of the content of the element at `at`, which must carry `tag` (definite length,
    as LDAP requires)."""
    if message[at] != tag:
        raise _Shape
    first = message[at + 1]
    if first < 0x80:
        return at + 2, at + 2 + first
    width = first & 0x7F
    start = at + 2 + width
    return start, start + int.from_bytes(message[at + 2 : start], "big")


def decode_entry(message: bytes) -> tuple[int, bytes, dict[str, list[bytes]]]:
    """(messageID, DN, {attribute: values}) of a searchResEntry without controls; raises ValueError
    for anything else."""
    at, end = _element(message, 0, SEQUENCE)
    if end != len(message):
        raise _Shape  # ldap3 hands over one whole message
    start, at = _element(message, at, INTEGER)
    message_id = int.from_bytes(message[start:at], "big", signed=True)
    at, entry_end = _element(message, at, ENTRY)
    if entry_end != end:
        raise _Shape  # controls follow the entry
    start, at = _element(message, at, OCTET_STRING)
    dn = message[start:at]
    at, attributes_end = _element(message, at, SEQUENCE)
    attributes: dict[str, list[bytes]] = {}
    while at < attributes_end:
        at, attribute_end = _element(message, at, SEQUENCE)
        start, at = _element(message, at, OCTET_STRING)
        name = message[start:at].decode("utf-8")
        at, values_end = _element(message, at, SET)
        values = attributes[name] = []
        while at < values_end:
            start, at = _element(message, at, OCTET_STRING)
            values.append(message[start:at])
        if at != attribute_end:
            raise _Shape
    if at != entry_end or attributes_end != entry_end:
        raise _Shape
    return message_id, dn, attributes


def _decode_message(message: bytes) -> dict[str, Any]:
    try:
        message_id, dn, attributes = decode_entry(message)
    except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
        return decode_message_fast(message)
    return {"messageID": message_id, "protocolOp": SEARCH_RESULT_ENTRY, "controls": None, "entry": (dn, attributes)}  # fmt: skip


# ldap3's own receive loop (SyncStrategy._get_response), run with this module's decoder in place of
# the one it names: a copy of its code object with other globals, so no line of ldap3 is copied and
# no other connection in the process changes.
_get_response = types.FunctionType(
    sync.SyncStrategy._get_response.__code__,
    {**vars(sync), "decode_message_fast": _decode_message},
    "_get_response",
    sync.SyncStrategy._get_response.__defaults__,
    sync.SyncStrategy._get_response.__closure__,
)


def decode_entries_raw(conn: ldap3.Connection) -> ldap3.Connection:
    """Make `conn` (a synchronous one) decode search entries lean; other messages, and entries that
    carry controls, go through ldap3's own decoder."""
    strategy = conn.strategy
    if type(strategy) is not sync.SyncStrategy:
        raise TypeError(f"lean decoding needs ldap3's SyncStrategy, not {type(strategy).__name__}")
    decode_with_ldap3 = strategy.decode_response_fast

    def decode(message: dict[str, Any]) -> dict[str, Any]:
        if "entry" not in message:
            return decode_with_ldap3(message)
        dn, raw = message["entry"]
        return {
            "type": "searchResEntry",
            "raw_dn": dn,
            "dn": dn.decode("utf-8", "replace"),
            "raw_attributes": raw,
            # ldap3's auto_range completes `name;range=` values in both dicts: give it its own.
            "attributes": dict(raw),
        }

    strategy.decode_response_fast = decode
    strategy._get_response = types.MethodType(_get_response, strategy)
    return conn
