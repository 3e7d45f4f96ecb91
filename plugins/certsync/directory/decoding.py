"""Search entries decoded to raw bytes only.

ldap3 turns every search entry into two copies: the raw values, and values formatted through the
schema into a case-insensitive dict. certsync reads only the raw values, and building the second copy
took half of the reader's CPU (bench/README.md, "Directory extraction"), which on a small domain
controller is CPU taken from the server. The reader's connections therefore decode entries lean.

Attribute names are kept as the server sends them: Active Directory (and Samba) return an attribute
under its schema name (lDAPDisplayName) whatever case it was requested in, and certsync requests
every attribute by that name.
"""

from __future__ import annotations

from typing import Any

import ldap3

SEARCH_RESULT_ENTRY = 4  # LDAP protocolOp of a searchResEntry (RFC 4511)


def decode_entries_raw(conn: ldap3.Connection) -> ldap3.Connection:
    """Make `conn` decode search entries without the formatted copy; other messages, and entries
    that carry controls, go through ldap3's own decoder."""
    strategy = conn.strategy
    decode_with_ldap3 = strategy.decode_response_fast

    def decode(message: dict[str, Any]) -> dict[str, Any]:
        if message["protocolOp"] != SEARCH_RESULT_ENTRY or message["controls"]:
            return decode_with_ldap3(message)
        dn, attributes = message["payload"][0][3], message["payload"][1][3]
        raw = {bytes(a[3][0][3]).decode("utf-8"): [bytes(v[3]) for v in a[3][1][3]] for a in attributes}
        return {
            "type": "searchResEntry",
            "raw_dn": dn,
            "dn": bytes(dn).decode("utf-8", "replace"),
            "raw_attributes": raw,
            # ldap3's auto_range completes `name;range=` values in both dicts: give it its own.
            "attributes": dict(raw),
        }

    strategy.decode_response_fast = decode
    return conn
