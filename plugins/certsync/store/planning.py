"""Reads the plan's inputs (source view, verdicts, recipients, published state) and saves the plan."""

from __future__ import annotations

import itertools
import operator
import uuid
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.certificates.verdict import Verdict
from certsync.directory import smtp_addresses
from certsync.directory.entries import ACCOUNT_DISABLE
from certsync.exchange.recipients import Recipient
from certsync.plan import Plan, RecipientAddress, SourceUser, UserAddresses
from certsync.store.db import copy_rows

# Each value with the verdict that holds at the run's time (made at or before it, not yet run out):
# a backfill's verdicts for an older time, or a newer run's for a later one, are never used. A value
# can have several such verdicts (cert_verdict's key includes checked_at: a run at a later time
# checks it again), and the newest is the one that holds; each is looked up in cert_verdict's key,
# so the statement needs no statistics to be fast.
# A refused value's result is its verdict's reason, whatever else holds for its user, so the
# database records it (`refused`) and the plan reads only the other values: in one statement, one
# snapshot for both. At 100,000 users 43% of the values were refused; reading them into Python and
# writing their results back took a fifth of the plan's time.
VALUES_TO_PLAN = """
WITH valued AS (
    SELECT v.object_guid, v.attribute, v.ordinal, v.sha256, c.ok, c.reason, c.rule, c.detail, c.issuer,
           c.serial, c.not_before, c.not_after, c.valid_until, c.emails
    FROM certsync.source_value v
    LEFT JOIN LATERAL (
        SELECT * FROM certsync.cert_verdict
        WHERE sha256 = v.sha256 AND attribute = v.attribute AND trust_fingerprint = %(fp)s
          AND checked_at <= %(at)s AND (valid_until IS NULL OR %(at)s < valid_until)
        ORDER BY checked_at DESC LIMIT 1
    ) c ON true
    WHERE {where}
), refused AS (
    INSERT INTO certsync.value_result (run_id, object_guid, attribute, sha256, selected, reason, rule, detail)
    SELECT %(run_id)s, object_guid, attribute, sha256, false, reason, rule, detail FROM valued WHERE NOT ok
)
SELECT object_guid, attribute, sha256, ok, issuer, serial, not_before, not_after, valid_until, emails
FROM valued WHERE ok IS NOT FALSE ORDER BY object_guid, attribute, ordinal
"""
USERS_TO_PLAN = """
SELECT object_guid, mail, proxy_addresses, user_account_control, recipient_type_details
FROM certsync.source_user WHERE {where} ORDER BY object_guid
"""
STORE_RESULTS = """
INSERT INTO certsync.value_result (run_id, object_guid, attribute, sha256, selected, reason, rule, detail)
SELECT %(run_id)s, g, a, s, r IS NULL, r, u, d
FROM unnest(%(guids)b::uuid[], %(attributes)b::text[], %(sha256s)b::bytea[], %(reasons)b::text[],
            %(rules)b::text[], %(details)b::text[]) AS t (g, a, s, r, u, d)
"""
# A full plan reads the users in parts of about this many, by ranges of objectGUID (random, so the
# ranges hold about as many users each): the database prepares the next part while Python plans one.
USERS_PER_PART = 5000
IN_RANGE = "object_guid BETWEEN %(low)s AND %(high)s"
LISTED = "object_guid = ANY(%(only)s::uuid[])"


def _verdict(row: tuple) -> Verdict:
    """A valid value's verdict, as the plan uses it (refused ones never reach Python), from a row
    of VALUES_TO_PLAN."""
    _guid, attribute, sha256, ok, issuer, serial, not_before, not_after, valid_until, emails = row
    if ok is None:  # validation did not run for this value: never publish it unchecked
        raise RuntimeError(
            f"value {bytes(sha256).hex()} has no verdict valid at the run's time; run validation first"
        )
    return Verdict(
        sha256=bytes(sha256),
        attribute=attribute,
        ok=True,
        reason=None,
        rule=None,
        detail="Valid.",
        issuer=issuer or "",
        serial=serial or "",
        not_before=not_before,
        not_after=not_after,
        valid_until=valid_until,
        emails=tuple(emails or ()),
    )


def users_to_plan(
    conn: Connection,
    *,
    run_id: int,
    fingerprint: str,
    at: datetime,
    only: Collection[uuid.UUID] | None = None,
    plan: Plan | None = None,
    part_size: int = USERS_PER_PART,
) -> Iterator[SourceUser]:
    """Every user of the source view (or those of `only`) in objectGUID order, with the verdicts,
    valid at `at`, of its values that are not refused; the refused values' results are stored for
    `run_id` as the users are read (start_plan must have cleared the run's earlier ones).

    Read in parts of about `part_size` users on `conn`'s own transaction, in pipeline mode: the
    statements of the next part are sent before this part's users are yielded, so PostgreSQL
    reads and writes the next part while the caller plans this one. `plan` is the Plan the caller
    fills from the users yielded, user by user: the results it gained are stored with each next
    part, and all of them once the users run out (`plan.stored_results` counts them). Nothing
    else may use `conn` until then."""
    base = {"run_id": run_id, "fp": fingerprint, "at": at}
    if only is None:
        where = IN_RANGE
        parts = [base | bounds for bounds in _guid_ranges(conn, part_size)]
    else:
        where = LISTED
        listed = sorted(only)
        parts = [base | {"only": listed[i : i + part_size]} for i in range(0, max(len(listed), 1), part_size)]
    queries = (VALUES_TO_PLAN.format(where=where), USERS_TO_PLAN.format(where=where))
    raw = conn.connection.driver_connection
    with raw.pipeline():
        sent = _send_part(raw, queries, parts[0])
        for following in [*parts[1:], None]:
            users, values = (cursor.fetchall() for cursor in sent)
            # Sent only now: fetching a part's rows waits for every statement sent before them.
            if plan is not None:
                _store_results(raw, run_id, plan)
            if following is not None:
                sent = _send_part(raw, queries, following)
            yield from _with_verdicts(users, values)
        if plan is not None:
            _store_results(raw, run_id, plan)


def _guid_ranges(conn: Connection, part_size: int) -> list[dict[str, uuid.UUID]]:
    """objectGUID ranges (bounds included) that split the source view into parts of about
    `part_size` users."""
    count = conn.execute(sa.text("SELECT count(*) FROM certsync.source_user")).scalar_one()
    parts = max(1, -(-count // part_size))
    starts = [(i << 128) // parts for i in range(parts + 1)]
    return [
        {"low": uuid.UUID(int=low), "high": uuid.UUID(int=high - 1)}
        for low, high in itertools.pairwise(starts)
    ]


def _send_part(
    raw: psycopg.Connection, queries: tuple[str, str], params: dict[str, Any]
) -> list[psycopg.Cursor]:
    """Send one part's statements (values first: the users come back after them); returns the
    cursors of its users and of its values."""
    values_query, users_query = queries
    # Plain tuples, binary: named ones cost a Python call a row.
    values = raw.cursor(binary=True)
    values.execute(values_query, params)
    users = raw.cursor(binary=True)
    users.execute(users_query, params)
    return [users, values]


def _with_verdicts(users: list[tuple], values: list[tuple]) -> Iterator[SourceUser]:
    """Join the rows of USERS_TO_PLAN and VALUES_TO_PLAN (both in objectGUID order) into SourceUsers."""
    groups = itertools.groupby(values, key=operator.itemgetter(0))
    group = next(groups, None)
    for guid, mail, proxy_addresses, account_control, type_details in users:
        verdicts: tuple[Verdict, ...] = ()
        while group is not None and group[0] < guid:
            group = next(groups, None)  # values of a user deleted before its part's users were read
        if group is not None and group[0] == guid:
            verdicts = tuple(_verdict(r) for r in group[1])
            group = next(groups, None)
        yield SourceUser(
            object_guid=guid,
            mail=mail,
            addresses=smtp_addresses(mail, proxy_addresses),
            verdicts=verdicts,
            disabled=bool(account_control & ACCOUNT_DISABLE),
            recipient_type_details=type_details,
        )


def _store_results(raw: psycopg.Connection, run_id: int, plan: Plan) -> None:
    """INSERT the plan's results not stored yet (in pipeline mode, sent: it runs meanwhile)."""
    new = plan.results[plan.stored_results :]
    if not new:
        return
    columns = {
        "guids": [r.object_guid for r in new],
        "attributes": [r.attribute for r in new],
        "sha256s": [r.sha256 for r in new],
        "reasons": [r.reason for r in new],
        "rules": [r.rule for r in new],
        "details": [r.detail for r in new],
    }
    raw.execute(STORE_RESULTS, {"run_id": run_id, **columns})
    plan.stored_results += len(new)


def use_work_mem(conn: Connection, megabytes: int) -> None:
    """PostgreSQL's work_mem for the rest of `conn`'s transaction (0: leave the server's own).
    Below what a statement sorts and hashes, PostgreSQL spills it to temporary files."""
    if megabytes:
        conn.execute(sa.text("SELECT set_config('work_mem', :mem, true)"), {"mem": f"{megabytes}MB"})


def refresh_statistics(conn: Connection) -> list[str]:
    """Analyze the tables the plan reads that earlier stages rewrote (sql/0021); returns their names."""
    return list(conn.execute(sa.text("SELECT certsync.refresh_plan_statistics()")).scalars())


def gone_reasons(conn: Connection) -> dict[uuid.UUID, str]:
    """Why users left the source view: 'deleted' or 'left_scope' (certsync.source_gone)."""
    rows = conn.execute(sa.text("SELECT object_guid, reason FROM certsync.source_gone"))
    return {r.object_guid: r.reason for r in rows}


def save_recipients(conn: Connection, *, run_id: int, recipients: Iterable[Recipient]) -> int:
    """Replace this run's snapshot of Exchange (other runs keep theirs). COPY, not INSERT: a
    tenant's whole recipient list is written every run."""
    conn.execute(sa.text("DELETE FROM certsync.exo_recipient WHERE seen_run_id = :r"), {"r": run_id})
    return copy_rows(
        conn,
        "COPY certsync.exo_recipient (recipient_id, primary_smtp, recipient_type, is_dir_synced,"
        " is_cloud_managed, user_certificate, user_smime_certificate, seen_run_id) FROM STDIN",
        (
            (r.recipient_id, r.primary_smtp, r.recipient_type, r.is_dir_synced, r.is_cloud_managed,
             list(r.user_certificate), list(r.user_smime_certificate), run_id)
            for r in recipients
        ),
    )  # fmt: skip


def purge_old_snapshots(conn: Connection, *, keep_runs: int = 3) -> int:
    """Drop the snapshots of closed runs except the latest few (the newest one feeds
    certsync.expiring_within); a run still running keeps its own."""
    return conn.execute(
        sa.text(
            "DELETE FROM certsync.exo_recipient e USING certsync.sync_run s"
            " WHERE s.run_id = e.seen_run_id AND s.state <> 'running' AND e.seen_run_id < ("
            "  SELECT coalesce(min(run_id), 0) FROM ("
            "   SELECT DISTINCT seen_run_id AS run_id FROM certsync.exo_recipient"
            "   ORDER BY 1 DESC LIMIT :k) latest)"
        ),
        {"k": keep_runs},
    ).rowcount


def recipients(conn: Connection, *, run_id: int, only: Collection[str] | None = None) -> list[Recipient]:
    """The run's own snapshot of Exchange: every recipient of the tenant (or those of `only`),
    read as the driver's plain tuples on `conn`'s transaction (every full plan reads them all)."""
    query = (
        "SELECT recipient_id, primary_smtp, recipient_type, is_dir_synced, is_cloud_managed,"
        " user_certificate, user_smime_certificate FROM certsync.exo_recipient WHERE seen_run_id = %s"
    )
    with conn.connection.driver_connection.cursor() as rows:
        if only is None:
            rows.execute(query, (run_id,))
        else:
            rows.execute(f"{query} AND recipient_id = ANY(%s)", (run_id, list(only)))
        # bytea[] comes as lists of bytes: tuples of them are what the plan compares.
        return [
            Recipient(rid, smtp, kind, synced, cloud, tuple(certificates), tuple(smime))
            for rid, smtp, kind, synced, cloud, certificates, smime in rows
        ]


def recipient_addresses(conn: Connection, *, run_id: int) -> list[RecipientAddress]:
    """Every recipient of the run's snapshot, its identity and primary address only."""
    with conn.connection.driver_connection.cursor() as rows:
        rows.execute(
            "SELECT recipient_id, primary_smtp FROM certsync.exo_recipient WHERE seen_run_id = %s", (run_id,)
        )
        return [RecipientAddress(rid, smtp) for rid, smtp in rows]


def published_owners(conn: Connection) -> dict[str, uuid.UUID]:
    """Each recipient certsync has published to, and the user it published for."""
    rows = conn.execute(sa.text("SELECT recipient_id, object_guid FROM certsync.published_state"))
    return {r.recipient_id: r.object_guid for r in rows}


_SEND_ORDER = {"add": 0, "replace": 1, "remove": 2}


def _action_rows(
    run_id: int, plan: Plan, *, first_no: int, batch_size: int, superseded: bool
) -> tuple[list[tuple], int]:
    """planned_action rows, publishable actions spread over batches; returns (rows, batches). A
    superseded run keeps its plan for the record, with nothing to publish."""
    publishable = 0
    rows = []
    # Batches go out in number order, so a run cut short by its time box has sent the newly valid
    # certificates first, then the replacements, and leaves removals (the least urgent) for later.
    ordered = sorted(plan.actions, key=lambda a: _SEND_ORDER.get(a.kind, len(_SEND_ORDER)))
    for action_no, action in enumerate(ordered, start=first_no):
        batch = -1
        reason = action.reason
        if action.kind in ("add", "replace", "remove") and not superseded:
            batch = publishable // batch_size
            publishable += 1
        elif action.kind in ("add", "replace", "remove"):
            reason = "superseded"
        state = "pending" if batch >= 0 else ("conflict" if action.kind == "conflict" else "skipped")
        r = action.recipient
        rows.append(
            (run_id, action_no, action.object_guid, r.recipient_id if r else None, r.primary_smtp if r else None,
             r.cmdlet if r else None, action.kind, list(action.user_certificate),
             list(action.user_smime_certificate), batch, state, reason)
        )  # fmt: skip
    return rows, -(-publishable // batch_size)


def start_plan(conn: Connection, *, run_id: int) -> None:
    """Start this run's plan record over, before users_to_plan stores the first results. Re-planning
    a run (retry, clear) replaces what is still open but keeps the actions it already published, as
    history."""
    # First, so that a carry-over of this run (which locks the run's row too) either finished
    # before this plan and its rows are deleted below, or waits for this plan and carries again.
    conn.execute(sa.text("UPDATE certsync.sync_run SET carried_at = NULL WHERE run_id = :r"), {"r": run_id})
    conn.execute(sa.text("DELETE FROM certsync.value_result WHERE run_id = :r"), {"r": run_id})
    conn.execute(
        sa.text("DELETE FROM certsync.planned_action WHERE run_id = :r AND state <> 'published'"),
        {"r": run_id},
    )


def save_plan(conn: Connection, *, run_id: int, plan: Plan, batch_size: int, superseded: bool = False) -> int:
    """Save this run's plan (after start_plan): its results users_to_plan has not stored, and its
    actions; return the number of publish batches."""
    _store_results(conn.connection.driver_connection, run_id, plan)
    first_no = conn.execute(
        sa.text("SELECT coalesce(max(action_no), 0) + 1 FROM certsync.planned_action WHERE run_id = :r"),
        {"r": run_id},
    ).scalar_one()
    rows, batches = _action_rows(
        run_id, plan, first_no=first_no, batch_size=batch_size, superseded=superseded
    )
    copy_rows(
        conn,
        "COPY certsync.planned_action (run_id, action_no, object_guid, recipient_id, primary_smtp, cmdlet, kind,"
        " user_certificate, user_smime_certificate, batch, state, reason) FROM STDIN",
        rows,
    )
    conn.execute(sa.text("UPDATE certsync.sync_run SET planned_at = now() WHERE run_id = :r"), {"r": run_id})
    return batches


# -- delta plans: what changed since an earlier run's plan ------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeltaBase:
    """The plan a delta plan starts from: the latest plan of an earlier run that may publish."""

    run_id: int
    logical_date: datetime


def delta_base(
    conn: Connection, *, run_id: int, fingerprint: str, at: datetime, policy: str
) -> DeltaBase | None:
    """The base of a delta plan for this run, or None when it must plan every user: it read no
    directory, no earlier plan of a run that may publish exists, that plan used another trust
    configuration or account policy (or plan logic) or a later time, its snapshot of Exchange or
    its value results were purged (retention), or its carry-over did not finish. A full read merges
    only the users that differ (store.source), so it is planned from what changed like a delta read."""
    read = conn.execute(
        sa.text("SELECT mode FROM certsync.directory_read WHERE run_id = :r"), {"r": run_id}
    ).scalar()
    if read is None:
        return None
    base = conn.execute(
        sa.text(
            "SELECT run_id, logical_date, trust_fingerprint, plan_policy, plan_scope, carried_at,"
            " EXISTS (SELECT FROM certsync.exo_recipient e WHERE e.seen_run_id = s.run_id)"
            " AND EXISTS (SELECT FROM certsync.value_result v WHERE v.run_id = s.run_id) AS snapshot"
            " FROM certsync.sync_run s WHERE run_id < :r AND planned_at IS NOT NULL AND NOT dry_run"
            " ORDER BY run_id DESC LIMIT 1"
        ),
        {"r": run_id},
    ).first()
    if (
        base is None
        or base.plan_scope is None  # planned before plans were recorded
        or base.carried_at is None  # its record lacks the users it did not plan again
        or base.trust_fingerprint != fingerprint
        or base.plan_policy != policy
        or base.logical_date > at
        or not base.snapshot
    ):
        return None
    return DeltaBase(run_id=base.run_id, logical_date=base.logical_date)


@dataclass(frozen=True, kw_only=True)
class Changes:
    """What changed since the base plan, as the store can tell it (see plan.delta_users)."""

    users: set[uuid.UUID]
    recipients: set[str]
    old_addresses: set[str]


CHANGED_RECIPIENTS = """
SELECT coalesce(n.recipient_id, o.recipient_id) AS recipient_id, lower(o.primary_smtp) AS old_smtp
FROM (SELECT * FROM certsync.exo_recipient WHERE seen_run_id = :r) n
FULL JOIN (SELECT * FROM certsync.exo_recipient WHERE seen_run_id = :b) o ON o.recipient_id = n.recipient_id
WHERE n.recipient_id IS NULL OR o.recipient_id IS NULL
   OR (n.primary_smtp, n.recipient_type, n.is_dir_synced, n.is_cloud_managed, n.user_certificate,
       n.user_smime_certificate)
      IS DISTINCT FROM (o.primary_smtp, o.recipient_type, o.is_dir_synced, o.is_cloud_managed,
       o.user_certificate, o.user_smime_certificate)
"""

# Users whose entry a read changed after the base planned: read by a later run, or by a run that
# extracted again (cleared, reprocessed) after the base planned, which marks them with its own id,
# lower than the base's or the base's own.
USERS_CHANGED = """
SELECT object_guid FROM certsync.source_user
WHERE changed_run_id > :b OR changed_run_id IN (
    SELECT d.run_id FROM certsync.directory_read d JOIN certsync.sync_run b ON b.run_id = :b
    WHERE d.read_at >= b.planned_at)
"""

# Users whose verdicts may differ between the base's time and this run's: verdicts saved since the
# base (new values, re-checks), made for a later time than the base's, or run out in between.
VERDICTS_CHANGED = """
SELECT DISTINCT v.object_guid FROM certsync.source_value v
JOIN certsync.cert_verdict c ON c.sha256 = v.sha256 AND c.attribute = v.attribute
WHERE c.trust_fingerprint = :fp
  AND (c.checked_run_id > :b OR c.checked_at > :bat OR (c.valid_until > :bat AND c.valid_until <= :at))
"""

# The base's actions that did not reach Exchange (failed, pending, deferred, skipped), and users
# that lost a recipient to another user's claim.
UNFINISHED = """
SELECT object_guid, recipient_id FROM certsync.planned_action
WHERE run_id = :b AND ((kind IN ('add', 'replace', 'remove') AND state <> 'published')
                       OR reason = 'recipient_claimed_by_another_user')
"""


def changes_since(
    conn: Connection, *, base: DeltaBase, run_id: int, fingerprint: str, at: datetime
) -> Changes:
    params = {"b": base.run_id, "r": run_id, "fp": fingerprint, "bat": base.logical_date, "at": at}
    users = set(conn.execute(sa.text(USERS_CHANGED), params).scalars())
    users.update(conn.execute(sa.text(VERDICTS_CHANGED), params).scalars())
    recipients: set[str] = set()
    old_addresses: set[str] = set()
    for row in conn.execute(sa.text(CHANGED_RECIPIENTS), params):
        recipients.add(row.recipient_id)
        if row.old_smtp:
            old_addresses.add(row.old_smtp)
    contested = conn.execute(
        sa.text("SELECT plan_contested FROM certsync.sync_run WHERE run_id = :b"), params
    ).scalar()
    recipients.update(contested or ())
    for row in conn.execute(sa.text(UNFINISHED), params):
        users.add(row.object_guid)
        if row.recipient_id:
            recipients.add(row.recipient_id)
    return Changes(users=users, recipients=recipients, old_addresses=old_addresses)


def user_addresses(conn: Connection) -> Iterator[UserAddresses]:
    """Every user of the source view with its addresses only, in plan order, streamed with the
    driver's own server-side cursor on `conn`'s transaction."""
    raw = conn.connection.driver_connection
    with raw.cursor(name="certsync_plan_addresses") as rows:
        rows.itersize = 5000
        rows.execute(
            "SELECT object_guid, mail, proxy_addresses FROM certsync.source_user ORDER BY object_guid"
        )
        for guid, mail, proxy_addresses in rows:
            yield UserAddresses(guid, mail, smtp_addresses(mail, proxy_addresses))


@dataclass(frozen=True, kw_only=True)
class Carried:
    """What a carry-over copied into a run's record (zero when it was whole already)."""

    results: int
    actions: int


CARRY_RESULTS = """
INSERT INTO certsync.value_result (run_id, object_guid, attribute, sha256, selected, reason, rule, detail)
SELECT :r, v.object_guid, v.attribute, v.sha256, v.selected, v.reason, v.rule, v.detail
FROM certsync.value_result v JOIN certsync.source_user u USING (object_guid)
WHERE v.run_id = :b AND NOT v.object_guid = ANY(CAST(:planned AS uuid[]))
"""

CARRY_ACTIONS = """
INSERT INTO certsync.planned_action (run_id, action_no, object_guid, recipient_id, primary_smtp, cmdlet, kind,
                                     user_certificate, user_smime_certificate, batch, state, reason)
SELECT :r, n.first + row_number() OVER (ORDER BY p.action_no) - 1, p.object_guid, p.recipient_id,
       p.primary_smtp, p.cmdlet, p.kind, p.user_certificate, p.user_smime_certificate, -1, p.state, p.reason
FROM certsync.planned_action p JOIN certsync.source_user u USING (object_guid),
     (SELECT coalesce(max(action_no), 0) + 1 AS first FROM certsync.planned_action WHERE run_id = :r) n
WHERE p.run_id = :b AND p.kind IN ('conflict', 'no_recipient')
  AND NOT p.object_guid = ANY(CAST(:planned AS uuid[]))
"""


def carry_over(conn: Connection, *, run_id: int) -> Carried:
    """Make a delta plan's record whole (sql/0024): copy the base plan's value results and
    unpublishable actions (conflicts, users without a recipient) of every current user it did not
    plan again. Once per plan: a record already whole (a full plan's, or one carried over) or a
    run without a plan is left as it is."""
    run = conn.execute(
        sa.text(
            "SELECT planned_at, plan_base_run_id, plan_users, carried_at FROM certsync.sync_run"
            # A plan saved meanwhile waits, then starts the record over (start_plan). Not FOR UPDATE:
            # that would hold up every audit row publish writes meanwhile (their key's FOR KEY SHARE).
            " WHERE run_id = :r FOR NO KEY UPDATE"
        ),
        {"r": run_id},
    ).one()
    if run.planned_at is None or run.carried_at is not None:
        return Carried(results=0, actions=0)
    params = {"r": run_id, "b": run.plan_base_run_id, "planned": run.plan_users}
    results = conn.execute(sa.text(CARRY_RESULTS), params).rowcount
    actions = conn.execute(sa.text(CARRY_ACTIONS), params).rowcount
    conn.execute(sa.text("UPDATE certsync.sync_run SET carried_at = now() WHERE run_id = :r"), params)
    return Carried(results=results, actions=actions)


def record_scope(
    conn: Connection,
    *,
    run_id: int,
    base: DeltaBase | None,
    policy: str,
    planned: Collection[uuid.UUID] | None,
    contested: Collection[str],
) -> None:
    """How this run's plan was made (sql/0015, 0024): what its carry-over copies (`planned`: the
    users a delta plan planned again) and what the next delta plan starts from. A full plan's
    record is whole as saved."""
    conn.execute(
        sa.text(
            "UPDATE certsync.sync_run SET plan_scope = :scope, plan_base_run_id = :b, plan_policy = :p,"
            " planned_users = coalesce(:n, (SELECT count(*) FROM certsync.source_user)), plan_contested = :c,"
            " plan_users = :users, carried_at = CASE WHEN :scope = 'full' THEN now() END WHERE run_id = :r"
        ),
        {
            "scope": "full" if base is None else "delta",
            "b": base.run_id if base else None,
            "p": policy,
            "n": len(planned) if planned is not None else None,
            "users": list(planned) if planned is not None else None,
            "c": sorted(contested),
            "r": run_id,
        },
    )
