"""Staging (what one run read), the persistent source view (the directory as last merged), and the
directory watermark that lets the next run read only what changed.

A run's extract stages its entries page by page with COPY (memory stays flat however large the
directory), stages the users it found gone, merges both into the source view and moves the
watermark, all in the caller's one transaction: a run killed at any point leaves the old watermark,
and the next run reads those changes again.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.certificates.parse import ATTRIBUTES
from certsync.directory import DirectoryReader, DirectoryUser, ServerIdentity
from certsync.readahead import ReadAhead
from certsync.store.db import copy_rows

log = logging.getLogger(__name__)
MODES = ("full", "delta")


def _user_row(run_id: int, user: DirectoryUser) -> tuple:
    return (
        run_id,
        user.object_guid,
        user.dn,
        user.sam_account_name,
        user.display_name,
        user.mail,
        list(user.proxy_addresses),
        user.user_account_control,
        user.usn_changed,
        user.recipient_type_details,
    )


def _value_rows(run_id: int, users: Iterable[DirectoryUser]) -> Iterator[tuple]:
    """Each value's staging row (run, user, attribute, ordinal, SHA-256), then the value itself."""
    for user in users:
        for attribute, values in zip(
            ATTRIBUTES, (user.user_certificate, user.user_smime_certificate), strict=True
        ):
            for ordinal, value in enumerate(values):
                yield (run_id, user.object_guid, attribute, ordinal, hashlib.sha256(value).digest(), value)


def _pages(users: Iterable[DirectoryUser], size: int) -> Iterator[list[DirectoryUser]]:
    page: list[DirectoryUser] = []
    for user in users:
        page.append(user)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def clear_staging(conn: Connection, *, run_id: int) -> None:
    """Forget what an earlier try of this run staged (idempotent under task retries)."""
    for table in ("staging_value", "staging_user", "staging_rejected", "staging_gone"):
        conn.execute(sa.text(f"DELETE FROM certsync.{table} WHERE run_id = :r"), {"r": run_id})  # noqa: S608


STAGE_VALUES = "COPY certsync.staging_value (run_id, object_guid, attribute, ordinal, sha256) FROM STDIN"
STAGE_USERS = (
    "COPY certsync.staging_user (run_id, object_guid, dn, sam_account_name, display_name, mail,"
    " proxy_addresses, user_account_control, usn_changed, recipient_type_details) FROM STDIN"
)
# A certificate is stored once, in cert_blob, as its page is staged (staging keeps its hash): the
# directory serves the next pages meanwhile, and a full read of unchanged users sends only hashes.
# Staged whole and stored at the merge, a first run's 183,000 certificates took 3.2 s after the
# read, and every full read wrote 240 MB of them into staging again.
NEW_HASHES = """
SELECT h FROM unnest(CAST(:hashes AS bytea[])) AS h
WHERE NOT EXISTS (SELECT FROM certsync.cert_blob b WHERE b.sha256 = h)
"""
# By COPY into a table of the transaction (made once per stage_users), then one INSERT that skips a
# certificate stored meanwhile.
BLOB_PAGE = "CREATE TEMPORARY TABLE IF NOT EXISTS blob_page (sha256 bytea, value bytea) ON COMMIT DROP"
STORE_BLOB_PAGE = """
INSERT INTO certsync.cert_blob (sha256, value, first_run_id) SELECT sha256, value, :r FROM blob_page
ON CONFLICT (sha256) DO NOTHING
"""


def stage_users(
    conn: Connection, *, run_id: int, users: Iterable[DirectoryUser], page_size: int = 500
) -> tuple[int, int]:
    """COPY `users` into this run's staging one page at a time, and store the certificates
    cert_blob does not have yet; returns (users, values)."""
    count = values = 0
    conn.execute(sa.text(BLOB_PAGE))
    # The directory's next pages are read while this one is copied.
    with ReadAhead(_pages(users, page_size), name="directory-pages") as pages:
        for page in pages:
            rows = list(_value_rows(run_id, page))
            values += copy_rows(conn, STAGE_VALUES, (row[:5] for row in rows))
            _store_new_blobs(conn, run_id=run_id, blobs={row[4]: row[5] for row in rows})
            count += copy_rows(conn, STAGE_USERS, (_user_row(run_id, u) for u in page))
    return count, values


def _store_new_blobs(conn: Connection, *, run_id: int, blobs: dict[bytes, bytes]) -> None:
    """Store the certificates (by SHA-256) that cert_blob does not hold yet."""
    new = conn.execute(sa.text(NEW_HASHES), {"hashes": list(blobs)}).scalars().all() if blobs else []
    if not new:
        return
    copy_rows(conn, "COPY blob_page (sha256, value) FROM STDIN", ((h, blobs[h]) for h in new))
    conn.execute(sa.text(STORE_BLOB_PAGE), {"r": run_id})
    conn.execute(sa.text("TRUNCATE blob_page"))


def stage_gone(conn: Connection, *, run_id: int, gone: Iterable[tuple[uuid.UUID, str]]) -> int:
    """Users found gone ('deleted' or 'left_scope'); the merge keeps those the source view has."""
    return copy_rows(
        conn,
        "COPY certsync.staging_gone (run_id, object_guid, reason) FROM STDIN",
        ((run_id, guid, reason) for guid, reason in gone),
    )


# A full read returns every user, nearly all unchanged: the merge writes only what differs, so a
# read where nothing changed costs reads, not a rewrite of the source view (and its index and WAL).
MERGE_STATEMENTS = (
    # Users that differ in any column: update them; changed_run_id moves only when something the
    # plan uses changed (mail, proxyAddresses, userAccountControl, msExchRecipientTypeDetails).
    """UPDATE certsync.source_user s SET dn = u.dn, sam_account_name = u.sam_account_name,
           display_name = u.display_name, mail = u.mail, proxy_addresses = u.proxy_addresses,
           user_account_control = u.user_account_control, usn_changed = u.usn_changed,
           recipient_type_details = u.recipient_type_details, last_seen_run_id = u.run_id,
           changed_run_id = CASE WHEN (s.mail, s.proxy_addresses, s.user_account_control,
                                       s.recipient_type_details)
                                      IS DISTINCT FROM (u.mail, u.proxy_addresses, u.user_account_control,
                                       u.recipient_type_details)
                                 THEN u.run_id ELSE s.changed_run_id END
       FROM certsync.staging_user u
       WHERE u.run_id = :r AND s.object_guid = u.object_guid
         AND (s.dn, s.sam_account_name, s.display_name, s.mail, s.proxy_addresses, s.user_account_control,
              s.usn_changed, s.recipient_type_details)
             IS DISTINCT FROM (u.dn, u.sam_account_name, u.display_name, u.mail, u.proxy_addresses,
              u.user_account_control, u.usn_changed, u.recipient_type_details)""",
    # Users new to the source view.
    """INSERT INTO certsync.source_user (object_guid, dn, sam_account_name, display_name, mail,
           proxy_addresses, user_account_control, usn_changed, recipient_type_details,
           last_seen_run_id, changed_run_id)
       SELECT object_guid, dn, sam_account_name, display_name, mail, proxy_addresses,
              user_account_control, usn_changed, recipient_type_details, run_id, run_id
       FROM certsync.staging_user u
       WHERE run_id = :r AND NOT EXISTS (SELECT FROM certsync.source_user s WHERE s.object_guid = u.object_guid)""",
    # Staged users whose set of values (or their order) differs from the source view's.
    """UPDATE certsync.source_user s SET changed_run_id = :r, last_seen_run_id = :r
       WHERE s.changed_run_id <> :r AND s.object_guid IN (
           SELECT object_guid
           FROM (SELECT object_guid, attribute, sha256, min(ordinal) AS ordinal
                 FROM certsync.staging_value WHERE run_id = :r GROUP BY object_guid, attribute, sha256) n
           FULL JOIN (SELECT v.object_guid, v.attribute, v.sha256, v.ordinal FROM certsync.source_value v
                      JOIN certsync.staging_user u ON u.run_id = :r AND u.object_guid = v.object_guid) o
           USING (object_guid, attribute, sha256)
           WHERE n.ordinal IS DISTINCT FROM o.ordinal)""",
    # (Their certificates are in cert_blob already: stage_users stored the new ones page by page.)
    # Values of the users that changed: replace the set (each read returns a user's values whole).
    # Only the users this try read: an earlier try of the same run (cleared, reprocessed) marked
    # others with this run's id, and this try's staging does not hold their values.
    """DELETE FROM certsync.source_value v USING certsync.source_user s, certsync.staging_user u
       WHERE s.changed_run_id = :r AND u.run_id = :r AND u.object_guid = s.object_guid
         AND v.object_guid = s.object_guid""",
    """INSERT INTO certsync.source_value (object_guid, attribute, sha256, ordinal)
       SELECT n.object_guid, n.attribute, n.sha256, min(n.ordinal) FROM certsync.staging_value n
       JOIN certsync.source_user s ON s.object_guid = n.object_guid AND s.changed_run_id = :r
       WHERE n.run_id = :r GROUP BY n.object_guid, n.attribute, n.sha256""",
    # A user read in scope is not gone, whatever else said so; one that came back is no longer.
    """DELETE FROM certsync.staging_gone g USING certsync.staging_user u
       WHERE g.run_id = :r AND u.run_id = :r AND u.object_guid = g.object_guid""",
    """DELETE FROM certsync.source_gone g USING certsync.staging_user u
       WHERE u.run_id = :r AND u.object_guid = g.object_guid""",
    # Gone users of the source view: remember why, then drop them (their values go with them).
    """INSERT INTO certsync.source_gone (object_guid, reason, run_id)
       SELECT g.object_guid, g.reason, :r FROM certsync.staging_gone g
       JOIN certsync.source_user s ON s.object_guid = g.object_guid WHERE g.run_id = :r
       ON CONFLICT (object_guid) DO UPDATE SET reason = EXCLUDED.reason, run_id = EXCLUDED.run_id,
           gone_at = now()""",
    """DELETE FROM certsync.source_user s USING certsync.staging_gone g
       WHERE g.run_id = :r AND s.object_guid = g.object_guid""",
)

# A complete full read is authoritative for the scope: users it did not return are gone (the
# extract has already staged them with their reason; this catches any it could not place).
DROP_UNSEEN = """
WITH gone AS (
    DELETE FROM certsync.source_user s
    WHERE NOT EXISTS (SELECT FROM certsync.staging_user u WHERE u.run_id = :r AND u.object_guid = s.object_guid)
    RETURNING object_guid)
INSERT INTO certsync.source_gone (object_guid, reason, run_id) SELECT object_guid, 'deleted', :r FROM gone
ON CONFLICT (object_guid) DO UPDATE SET reason = EXCLUDED.reason, run_id = EXCLUDED.run_id, gone_at = now()
"""


def merge_source(conn: Connection, *, run_id: int, full: bool) -> int:
    """Merge this run's staging into the source view; returns the users no longer in scope. The
    users new or changed for the plan get changed_run_id = run_id; the others are left untouched."""
    gone = 0
    for statement in MERGE_STATEMENTS:
        result = conn.execute(sa.text(statement), {"r": run_id})
        gone = result.rowcount if statement.lstrip().startswith("DELETE FROM certsync.source_user") else gone
    if full:
        gone += conn.execute(sa.text(DROP_UNSEEN), {"r": run_id}).rowcount
    return gone


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


# -- the watermark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Watermark:
    scope_key: str
    dc_service_name: str
    invocation_id: uuid.UUID
    highest_usn: int
    last_full_at: datetime
    dirsync_cookie: bytes | None = None


def load_watermark(conn: Connection) -> Watermark | None:
    row = conn.execute(
        sa.text(
            "SELECT scope_key, dc_service_name, invocation_id, highest_usn, last_full_at, dirsync_cookie"
            " FROM certsync.directory_watermark FOR UPDATE"
        )
    ).one_or_none()
    if row is None:
        return None
    cookie = row.dirsync_cookie
    return Watermark(**{**row._mapping, "dirsync_cookie": bytes(cookie) if cookie is not None else None})


def choose_mode(
    mark: Watermark | None,
    server: ServerIdentity,
    *,
    scope_key: str,
    requested: str,
    full_every: timedelta | None,
    now: datetime,
    needs_cookie: bool = False,
) -> tuple[str, str]:
    """Full or delta, and why. A delta needs a watermark of this scope from this very DC database:
    USNs of another DC, or of a restored one, say nothing about what changed."""
    if requested == "full":
        return "full", "requested"
    if mark is None:
        return "full", "no watermark yet"
    if mark.scope_key != scope_key:
        return "full", "the scope changed"
    if mark.dc_service_name != server.dc_service_name:
        return (
            "full",
            f"another DC answered ({server.dc_service_name}, watermark from {mark.dc_service_name})",
        )
    if mark.invocation_id != server.invocation_id:
        return "full", "the DC's database identity (invocationId) changed: restored or reinstalled"
    if needs_cookie and mark.dirsync_cookie is None:
        return "full", "no DirSync cookie yet"
    if server.highest_usn < mark.highest_usn:
        return "full", "the DC's highestCommittedUSN is below the watermark"
    if full_every is not None and now - mark.last_full_at >= full_every:
        return "full", f"the last full read is older than {full_every}"
    return "delta", "watermark of this DC"


def save_watermark(
    conn: Connection,
    *,
    run_id: int,
    server: ServerIdentity,
    scope_key: str,
    scope: str,
    full: bool,
    cookie: bytes | None = None,
) -> None:
    """Move the watermark to what this run read (in the transaction that merged it)."""
    conn.execute(
        sa.text(
            "INSERT INTO certsync.directory_watermark AS w (scope_key, scope, dc_service_name, invocation_id,"
            "  highest_usn, run_id, last_full_run_id, last_full_at, dirsync_cookie)"
            " VALUES (:key, :scope, :dc, :inv, :usn, :r, :r, now(), :cookie)"
            " ON CONFLICT (only_row) DO UPDATE SET scope_key = EXCLUDED.scope_key, scope = EXCLUDED.scope,"
            "  dc_service_name = EXCLUDED.dc_service_name, invocation_id = EXCLUDED.invocation_id,"
            "  highest_usn = EXCLUDED.highest_usn, run_id = EXCLUDED.run_id, updated_at = now(),"
            "  dirsync_cookie = EXCLUDED.dirsync_cookie,"
            "  last_full_run_id = CASE WHEN :full THEN EXCLUDED.run_id ELSE w.last_full_run_id END,"
            "  last_full_at = CASE WHEN :full THEN now() ELSE w.last_full_at END"
        ),
        {
            "key": scope_key,
            "scope": scope,
            "dc": server.dc_service_name,
            "inv": server.invocation_id,
            "usn": server.highest_usn,
            "r": run_id,
            "full": full,
            "cookie": cookie,
        },
    )


# -- one extract ---------------------------------------------------------------------------------


def requested_mode(conn: Connection, run_id: int) -> str:
    return conn.execute(
        sa.text("SELECT mode FROM certsync.sync_run WHERE run_id = :r"), {"r": run_id}
    ).scalar_one()


def _guids(conn: Connection, sql: str, run_id: int | None = None) -> Iterator[uuid.UUID]:
    rows = conn.execute(sa.text(sql), {"r": run_id}, execution_options={"yield_per": 5000})
    for row in rows:
        yield row[0]


ABSENT = """SELECT object_guid FROM certsync.source_user s WHERE NOT EXISTS (
    SELECT FROM certsync.staging_user u WHERE u.run_id = :r AND u.object_guid = s.object_guid)"""


def _full(conn: Connection, ldap: object, reader: DirectoryReader, run_id: int, nc: str) -> dict[str, int]:
    """Every user in scope; those of the source view it did not return are located (moved out of
    scope, or deleted). With unreadable entries the read is incomplete: nobody is gone then."""
    page = reader.settings.page_size
    users, values = stage_users(conn, run_id=run_id, users=reader.iter_users(ldap), page_size=page)
    gone: dict[uuid.UUID, str] = {}
    if not reader.skipped:
        absent = list(_guids(conn, ABSENT, run_id))
        gone = reader.locate(ldap, absent, naming_context=nc)
    stage_gone(conn, run_id=run_id, gone=gone.items())
    return {"users": users, "values": values, **_gone_counts(gone.values())}


def _delta(
    conn: Connection, ldap: object, reader: DirectoryReader, run_id: int, since: int, nc: str
) -> dict[str, int]:
    """Users changed anywhere in the domain since the watermark (one search, tombstones included),
    read whole by objectGUID below the base DNs with the scope's filter; those that read does not
    return moved out, were filtered out or are deleted (tombstones); and, when the scope names a
    group whose membership may have changed, the users that entered or left it."""
    page = reader.settings.page_size
    changed, group_changed = reader.changed_in_domain(ldap, since=since, naming_context=nc)
    live = sorted({guid for guid, deleted in changed if not deleted})
    users, values = stage_users(conn, run_id=run_id, users=reader.iter_by_guid(ldap, live), page_size=page)
    gone: dict[uuid.UUID, str] = {guid: ("deleted" if deleted else "left_scope") for guid, deleted in changed}
    if reader.settings.group_dn and group_changed:
        more_users, more_values = _regroup(conn, ldap, reader, run_id, gone)
        users, values = users + more_users, values + more_values
    staged = set(_guids(conn, "SELECT object_guid FROM certsync.staging_user WHERE run_id = :r", run_id))
    gone = {g: why for g, why in gone.items() if g not in staged}
    stage_gone(conn, run_id=run_id, gone=gone.items())
    return {"users": users, "values": values, **_gone_counts(gone.values())}


def _dirsync_delta(
    conn: Connection, ldap: object, reader: DirectoryReader, run_id: int, cookie: bytes, nc: str
) -> tuple[dict[str, int], bytes]:
    """What DirSync reports changed since `cookie`: changed users are read whole by objectGUID
    (DirSync returns only the changed attributes); those no longer in scope left it, tombstones
    are deleted; a changed group re-reads the scope's membership."""
    changes, cookie = reader.dirsync(ldap, cookie=cookie, naming_context=nc)
    changed = sorted({guid for guid, deleted, group in changes if not group and not deleted})
    page = reader.settings.page_size
    users, values = stage_users(conn, run_id=run_id, users=reader.iter_by_guid(ldap, changed), page_size=page)
    gone = {guid: "left_scope" for guid in changed}
    gone.update((guid, "deleted") for guid, deleted, group in changes if deleted and not group)
    if reader.settings.group_dn and any(group for _, _, group in changes):
        more_users, more_values = _regroup(conn, ldap, reader, run_id, gone)
        users, values = users + more_users, values + more_values
    staged = set(_guids(conn, "SELECT object_guid FROM certsync.staging_user WHERE run_id = :r", run_id))
    gone = {g: why for g, why in gone.items() if g not in staged}
    stage_gone(conn, run_id=run_id, gone=gone.items())
    return {"users": users, "values": values, **_gone_counts(gone.values())}, cookie


def _regroup(
    conn: Connection, ldap: object, reader: DirectoryReader, run_id: int, gone: dict[uuid.UUID, str]
) -> tuple[int, int]:
    """Membership changes never touch the member's USN: compare the scope's identities with the
    source view, read the users that entered whole, and mark those that left."""
    scope = set(reader.iter_scope_guids(ldap))
    known = set(_guids(conn, "SELECT object_guid FROM certsync.source_user"))
    staged = set(_guids(conn, "SELECT object_guid FROM certsync.staging_user WHERE run_id = :r", run_id))
    for guid in known - scope:
        gone.setdefault(guid, "left_scope")
    entered = sorted(scope - known - staged)
    page = reader.settings.page_size
    return stage_users(conn, run_id=run_id, users=reader.iter_by_guid(ldap, entered), page_size=page)


def _gone_counts(reasons: Iterable[str]) -> dict[str, int]:
    listed = list(reasons)
    return {"deleted": listed.count("deleted"), "left_scope": listed.count("left_scope")}


def extract(
    conn: Connection, *, reader: DirectoryReader, run_id: int, full_every: timedelta | None
) -> dict[str, object]:
    """Read the directory (full or delta) into staging, merge it and move the watermark, all in
    `conn`'s transaction. Returns the counts and the mode used, with why."""
    clear_staging(conn, run_id=run_id)
    settings = reader.settings
    with reader.session() as ldap:
        server = reader.identity(ldap)  # first: its USN bounds what the reads below may miss
        mark = load_watermark(conn)
        mode, why = choose_mode(
            mark, server, scope_key=settings.scope_key(), requested=requested_mode(conn, run_id),
            full_every=full_every, now=datetime.now(UTC), needs_cookie=settings.change_tracking == "dirsync",
        )  # fmt: skip
        log.info(
            "directory read: %s (%s), DC %s at USN %d", mode, why, server.dc_service_name, server.highest_usn
        )
        nc = server.naming_context
        dirsync = settings.change_tracking == "dirsync"
        cookie = None
        if mode == "full":
            if dirsync:  # first: changes made while the full read runs come with the next delta
                cookie = reader.dirsync(ldap, cookie=None, naming_context=nc, collect=False)[1]
            counts = _full(conn, ldap, reader, run_id, nc)
        elif dirsync:
            assert mark is not None and mark.dirsync_cookie is not None
            counts, cookie = _dirsync_delta(conn, ldap, reader, run_id, mark.dirsync_cookie, nc)
        else:
            assert mark is not None
            counts = _delta(conn, ldap, reader, run_id, mark.highest_usn, nc)
    skipped = stage_rejected(conn, run_id=run_id, rejected=reader.skipped)
    gone = merge_source(conn, run_id=run_id, full=mode == "full" and not reader.skipped)
    save_watermark(
        conn, run_id=run_id, server=server, scope_key=settings.scope_key(), scope=settings.scope_text(),
        full=mode == "full", cookie=cookie,
    )  # fmt: skip
    _record_read(conn, run_id, mode, why, server, None if mode == "full" else mark, counts)
    if settings.change_tracking != "usn":
        conn.execute(
            sa.text("UPDATE certsync.directory_read SET tracking = :t WHERE run_id = :r"),
            {"t": settings.change_tracking, "r": run_id},
        )
    purge_old_staging(conn)
    return {**counts, "skipped": skipped, "gone": gone, "mode": mode, "why": why}


def _record_read(
    conn: Connection, run_id: int, mode: str, why: str, server: ServerIdentity, mark: Watermark | None,
    counts: dict[str, int],
) -> None:  # fmt: skip
    conn.execute(
        sa.text(
            "INSERT INTO certsync.directory_read (run_id, mode, why, dc_service_name, invocation_id, from_usn,"
            "  to_usn, changed, deleted, left_scope)"
            " VALUES (:r, :mode, :why, :dc, :inv, :from_usn, :to_usn, :changed, :deleted, :left)"
            " ON CONFLICT (run_id) DO UPDATE SET mode = EXCLUDED.mode, why = EXCLUDED.why,"
            "  dc_service_name = EXCLUDED.dc_service_name, invocation_id = EXCLUDED.invocation_id,"
            "  from_usn = EXCLUDED.from_usn, to_usn = EXCLUDED.to_usn, changed = EXCLUDED.changed,"
            "  deleted = EXCLUDED.deleted, left_scope = EXCLUDED.left_scope, read_at = now()"
        ),
        {
            "r": run_id, "mode": mode, "why": why, "dc": server.dc_service_name, "inv": server.invocation_id,
            "from_usn": mark.highest_usn if mark else None, "to_usn": server.highest_usn,
            "changed": counts["users"], "deleted": counts["deleted"], "left": counts["left_scope"],
        },
    )  # fmt: skip
