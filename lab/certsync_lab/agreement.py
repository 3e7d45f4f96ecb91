"""The demo's own check: does every writable recipient in the emulator hold exactly its user's valid
certificates? It reads the emulator's state, so it belongs to the lab, not to certsync."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.directory import smtp_addresses

SELECTED_BY_USER = """
SELECT u.mail, u.proxy_addresses, r.attribute, array_agg(r.sha256) AS hashes
FROM certsync.value_result r JOIN certsync.source_user u USING (object_guid)
WHERE r.run_id = :r AND r.selected
GROUP BY u.mail, u.proxy_addresses, r.attribute
"""


def emulator_disagreements(conn: Connection, state: dict[str, Any], *, run_id: int) -> list[str]:
    """Writable recipients whose certificates in Exchange are not exactly the valid certificates
    of their directory user, as selected by run `run_id` (no valid certificate: must hold none)."""
    wanted: dict[str, dict[str, set[bytes]]] = {}
    for row in conn.execute(sa.text(SELECTED_BY_USER), {"r": run_id}):
        for address in smtp_addresses(row.mail, row.proxy_addresses):
            wanted.setdefault(address, {})[row.attribute] = {bytes(h) for h in row.hashes}
    problems = []
    for recipient in state.get("recipients", []):
        if recipient.get("IsDirSynced") and not recipient.get("IsExchangeCloudManaged"):
            continue  # owned by directory synchronisation, not by certsync
        want = wanted.get(str(recipient.get("PrimarySmtpAddress", "")).lower(), {})
        for attribute, field in (
            ("userCertificate", "UserCertificate"),
            ("userSMIMECertificate", "UserSMimeCertificate"),
        ):
            held = {hashlib.sha256(base64.b64decode(v)).digest() for v in recipient.get(field, [])}
            if held != want.get(attribute, set()):
                problems.append(f"{recipient.get('PrimarySmtpAddress')}: {field} is not the user's valid set")
    return problems
