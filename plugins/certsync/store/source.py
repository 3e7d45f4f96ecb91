"""Staging (what one run read) and the persistent source view (the directory as last merged)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.certificates.parse import ATTRIBUTES
from certsync.directory import DirectoryUser
from certsync.store.db import copy_rows

log = logging.getLogger(__name__)


def _value_rows(run_id: int, users: Iterable[DirectoryUser], user_rows: list[tuple]) -> Iterable[tuple]:
    """Yield value rows for COPY while collecting the (small) user rows for the second COPY."""
    for user in users:
        user_rows.append(
            (
                run_id,
                user.object_guid,
                user.dn,
                user.sam_account_name,
                user.display_name,
                user.mail,
                list(user.proxy_addresses),
                user.user_account_control,
                user.usn_changed,
            )
        )
        for attribute, values in zip(
            ATTRIBUTES, (user.user_certificate, user.user_smime_certificate), strict=True
        ):
            for ordinal, value in enumerate(values):
                yield (run_id, user.object_guid, attribute, ordinal, hashlib.sha256(value).digest(), value)


def stage_users(conn: Connection, *, run_id: int, users: Iterable[DirectoryUser]) -> tuple[int, int]:
    """Replace this run's staging rows with `users` (idempotent under task retries)."""
    for table in ("staging_value", "staging_user", "staging_rejected"):
        conn.execute(sa.text(f"DELETE FROM certsync.{table} WHERE run_id = :r"), {"r": run_id})  # noqa: S608
    user_rows: list[tuple] = []
    values = copy_rows(
        conn,
        "COPY certsync.staging_value (run_id, object_guid, attribute, ordinal, sha256, value) FROM STDIN",
        _value_rows(run_id, users, user_rows),
    )
    count = copy_rows(
        conn,
        "COPY certsync.staging_user (run_id, object_guid, dn, sam_account_name, display_name, mail,"
        " proxy_addresses, user_account_control, usn_changed) FROM STDIN",
        user_rows,
    )
    return count, values


MERGE_STATEMENTS = (
    # New distinct values, content-addressed.
    """INSERT INTO certsync.cert_blob (sha256, value, first_run_id)
       SELECT DISTINCT ON (sha256) sha256, value, run_id FROM certsync.staging_value WHERE run_id = :r
       ON CONFLICT (sha256) DO NOTHING""",
    # Users: insert or update; changed_run_id moves only when something the pipeline uses changed.
    """INSERT INTO certsync.source_user AS s (object_guid, dn, sam_account_name, display_name, mail,
           proxy_addresses, user_account_control, usn_changed, last_seen_run_id, changed_run_id)
       SELECT object_guid, dn, sam_account_name, display_name, mail, proxy_addresses,
              user_account_control, usn_changed, run_id, run_id
       FROM certsync.staging_user WHERE run_id = :r
       ON CONFLICT (object_guid) DO UPDATE SET
           dn = EXCLUDED.dn, sam_account_name = EXCLUDED.sam_account_name,
           display_name = EXCLUDED.display_name, mail = EXCLUDED.mail,
           proxy_addresses = EXCLUDED.proxy_addresses,
           user_account_control = EXCLUDED.user_account_control,
           usn_changed = EXCLUDED.usn_changed, last_seen_run_id = EXCLUDED.last_seen_run_id,
           changed_run_id = CASE WHEN s.usn_changed IS DISTINCT FROM EXCLUDED.usn_changed
                                 THEN EXCLUDED.changed_run_id ELSE s.changed_run_id END""",
    # Values of the staged users: replace the set (a full read is authoritative per user).
    """DELETE FROM certsync.source_value v USING certsync.staging_user u
       WHERE u.run_id = :r AND v.object_guid = u.object_guid""",
    """INSERT INTO certsync.source_value (object_guid, attribute, sha256, ordinal)
       SELECT object_guid, attribute, sha256, min(ordinal) FROM certsync.staging_value WHERE run_id = :r
       GROUP BY object_guid, attribute, sha256""",
)

# A full read is authoritative for the scope: users it did not return are gone.
DROP_UNSEEN = """DELETE FROM certsync.source_user WHERE last_seen_run_id <> :r"""


def merge_source(conn: Connection, *, run_id: int, full: bool) -> int:
    """Merge this run's staging into the source view; returns users no longer in the directory."""
    for statement in MERGE_STATEMENTS:
        conn.execute(sa.text(statement), {"r": run_id})
    if not full:
        return 0
    return conn.execute(sa.text(DROP_UNSEEN), {"r": run_id}).rowcount


def stage_rejected(conn: Connection, *, run_id: int, rejected: Iterable[tuple[str, str]]) -> int:
    """Record the directory entries that could not be read as users, each with its reason."""
    return copy_rows(
        conn,
        "COPY certsync.staging_rejected (run_id, dn, reason) FROM STDIN",
        ((run_id, *r) for r in rejected),
    )


def purge_old_staging(conn: Connection, *, keep_runs: int = 3) -> int:
    """Drop the raw values of all but the latest runs: the merge has them, and they are the bulk."""
    return conn.execute(
        sa.text(
            "DELETE FROM certsync.staging_value WHERE run_id < ("
            " SELECT coalesce(min(run_id), 0) FROM ("
            "  SELECT run_id FROM certsync.sync_run ORDER BY run_id DESC LIMIT :k) latest)"
        ),
        {"k": keep_runs},
    ).rowcount
