"""The merge of a directory read into the source view writes only what differs: after random
changes a full read leaves the untouched users' rows as they were (not even rewritten), marks
exactly the users whose plan inputs changed with the run (what the next plan re-plans), and still
drops the users it no longer returned. PostgreSQL only: the reads are staged as the extract stages
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from certsync.config import database_dsn
from certsync.directory import DirectoryUser
from certsync.store import db, planning, runs, source
from certsync_lab.stack import certsync_database

WHEN = datetime(2026, 6, 1, tzinfo=UTC)
DATABASE = "certsync_merge"


@pytest.fixture(scope="module")
def engine(embedded_pg):
    engine = db.create_engine(database_dsn(certsync_database(embedded_pg, DATABASE)))
    yield engine
    engine.dispose()


def _user(rng: random.Random, n: int) -> DirectoryUser:
    return DirectoryUser(
        object_guid=uuid.UUID(int=n + 1),
        dn=f"CN=u{n},OU=People,DC=x",
        sam_account_name=f"u{n}",
        display_name=f"User {n}",
        mail=f"u{n}@x.test",
        proxy_addresses=(f"smtp:alias{n}@x.test",),
        user_certificate=tuple(rng.randbytes(40) for _ in range(rng.randint(0, 3))),
        user_smime_certificate=tuple(rng.randbytes(40) for _ in range(rng.randint(0, 1))),
        user_account_control=512,
        usn_changed=1000 + n,
    )


def _merge(engine, users: list[DirectoryUser], key: str, *, full: bool = True) -> tuple[int, int]:
    with engine.begin() as conn:
        run_id = runs.begin_run(
            conn, dag_id="merge-test", airflow_run_id=key, logical_date=WHEN, mode="full" if full else "delta",
            dry_run=True, trust_fingerprint="-",
        )  # fmt: skip
        source.clear_staging(conn, run_id=run_id)
        source.stage_users(conn, run_id=run_id, users=users, page_size=97)
        return run_id, source.merge_source(conn, run_id=run_id, full=full)


def _rows(engine) -> dict[uuid.UUID, tuple]:
    """Each user's row version (xmin), changed_run_id, what a read would return, and its values'
    row versions."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT u.object_guid, u.xmin::text AS version, u.changed_run_id, u.dn, u.display_name, u.mail,"
                " u.proxy_addresses, u.user_account_control, u.usn_changed,"
                " array(SELECT v.attribute || ':' || encode(v.sha256, 'hex') || ':' || v.ordinal"
                "       FROM certsync.source_value v WHERE v.object_guid = u.object_guid ORDER BY 1) AS vals,"
                " array(SELECT v.xmin::text FROM certsync.source_value v WHERE v.object_guid = u.object_guid"
                "       ORDER BY 1) AS versions"
                " FROM certsync.source_user u"
            )
        )
        return {
            r.object_guid: (r.version, r.changed_run_id, (r.dn, r.display_name, r.mail, tuple(r.proxy_addresses),
                            r.user_account_control, r.usn_changed, tuple(r.vals)), tuple(r.versions))
            for r in rows
        }  # fmt: skip


def _blobs(engine) -> dict[bytes, tuple[int, str]]:
    """Each stored certificate's first run and row version, by SHA-256, which its content matches."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT sha256, value, first_run_id, xmin::text AS version FROM certsync.cert_blob")
        )
        blobs = {bytes(r.sha256): (r.first_run_id, r.version, hashlib.sha256(r.value).digest()) for r in rows}
    assert all(sha256 == digest for sha256, (_, _, digest) in blobs.items())
    return {sha256: (run, version) for sha256, (run, version, _) in blobs.items()}


def _expected(user: DirectoryUser) -> tuple:
    values = [
        f"{attribute}:{hashlib.sha256(v).hexdigest()}:{ordinal}"
        for attribute, listed in (("userCertificate", user.user_certificate),
                                  ("userSMIMECertificate", user.user_smime_certificate))
        for ordinal, v in enumerate(listed)
    ]  # fmt: skip
    return (user.dn, user.display_name, user.mail, user.proxy_addresses, user.user_account_control,
            user.usn_changed, tuple(sorted(values)))  # fmt: skip


def _change(rng: random.Random, users: list[DirectoryUser]) -> tuple[list[DirectoryUser], set, set, set]:
    """Random changes: some the plan uses (mail, proxies, account state, values added, dropped or
    reordered), some it does not (display name, DN, USN only); users deleted and added.
    Returns (users now, plan-changed, changed otherwise, deleted)."""
    users = list(users)
    for_plan: set[uuid.UUID] = set()
    other: set[uuid.UUID] = set()
    edits = [
        (True, lambda u: dataclasses.replace(u, mail=f"new-{u.sam_account_name}@x.test")),
        (True, lambda u: dataclasses.replace(u, proxy_addresses=())),
        (True, lambda u: dataclasses.replace(u, user_account_control=514)),
        (True, lambda u: dataclasses.replace(u, user_certificate=(*u.user_certificate, rng.randbytes(40)))),
        (True, lambda u: dataclasses.replace(u, user_smime_certificate=())),
        (False, lambda u: dataclasses.replace(u, display_name="renamed", usn_changed=u.usn_changed + 1)),
        (False, lambda u: dataclasses.replace(u, dn=u.dn.replace("People", "Moved"))),
    ]
    for i in rng.sample(range(len(users)), 40):
        relevant, edit = rng.choice(edits)
        changed = edit(users[i])
        if changed == users[i]:
            continue
        users[i] = changed
        (for_plan if relevant else other).add(changed.object_guid)
    for i in rng.sample(range(len(users)), 4):  # values in another order: the plan reads them in order
        u = users[i]
        if len(u.user_certificate) > 1 and u.object_guid not in other:
            users[i] = dataclasses.replace(u, user_certificate=tuple(reversed(u.user_certificate)))
            for_plan.add(u.object_guid)
    deleted = {users.pop(rng.randrange(len(users))).object_guid for _ in range(5)}
    new = [_user(rng, 10_000 + n) for n in range(6)]
    for_plan |= {u.object_guid for u in new}
    return users + new, for_plan - deleted, other - for_plan - deleted, deleted


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_full_read_writes_only_what_changed(engine, seed: int) -> None:
    rng = random.Random(seed)
    users = [_user(rng, seed * 1000 + n) for n in range(200)]
    first, _ = _merge(engine, users, f"first {seed}")
    before, blobs_before = _rows(engine), _blobs(engine)
    now, for_plan, other, deleted = _change(rng, users)
    second, gone = _merge(engine, now, f"second {seed}")
    after, blobs_after = _rows(engine), _blobs(engine)

    assert {g: row[2] for g, row in after.items()} == {u.object_guid: _expected(u) for u in now}
    assert gone == len(deleted) and not deleted & after.keys()
    assert {g for g, row in after.items() if row[1] == second} == for_plan
    untouched = after.keys() - for_plan - other
    assert {g: after[g][:2] + after[g][3:] for g in untouched} == {
        g: before[g][:2] + before[g][3:] for g in untouched
    }
    assert all(after[g][3] == before[g][3] for g in other)  # their values were not rewritten either
    assert all(after[g][1] == first for g in other)
    with engine.connect() as conn:
        reasons = dict(conn.execute(sa.text("SELECT object_guid, reason FROM certsync.source_gone")).all())
    assert all(reasons[g] == "deleted" for g in deleted)
    # Every value's certificate is stored once: the new ones by this read, the others left as they were.
    hashes = {
        hashlib.sha256(v).digest() for u in now for v in (*u.user_certificate, *u.user_smime_certificate)
    }
    assert hashes <= blobs_after.keys()
    assert {h: blobs_after[h] for h in blobs_before} == blobs_before
    assert {run for h, (run, _) in blobs_after.items() if h not in blobs_before} == {second}
    # Read again unchanged: nothing is written at all.
    _, gone = _merge(engine, now, f"third {seed}")
    assert gone == 0 and _rows(engine) == after and _blobs(engine) == blobs_after


def test_a_delta_read_merges_only_the_users_it_read(engine) -> None:
    rng = random.Random(7)
    users = [_user(rng, 9000 + n) for n in range(50)]
    _merge(engine, users, "delta base")
    before = _rows(engine)
    changed = [
        dataclasses.replace(users[3], mail="moved@x.test"),
        dataclasses.replace(users[4], usn_changed=1),
    ]
    run_id, gone = _merge(engine, changed, "delta read", full=False)
    after = _rows(engine)
    assert gone == 0
    assert {g for g in after if after[g][1] == run_id} == {users[3].object_guid}
    assert after[users[4].object_guid][2] == _expected(changed[1])
    assert all(after[u.object_guid] == before[u.object_guid] for u in users[5:])


def test_a_user_whose_every_value_was_removed_is_marked_changed(engine) -> None:
    """A read that returns a user with no certificate left (all removed in AD) changes that user's
    plan inputs: the merge marks it and removes its values, in a delta read as in a full one."""
    rng = random.Random(7)
    users = [
        dataclasses.replace(_user(rng, 900 + n), user_certificate=(rng.randbytes(40),)) for n in range(3)
    ]
    _merge(engine, users, "all-values-before", full=False)
    bare = dataclasses.replace(users[0], user_certificate=(), user_smime_certificate=(), usn_changed=5000)
    run_id, _ = _merge(engine, [bare], "all-values-removed", full=False)
    with engine.connect() as conn:
        marked = conn.execute(
            sa.text("SELECT changed_run_id FROM certsync.source_user WHERE object_guid = :g"),
            {"g": bare.object_guid},
        ).scalar_one()
        left = conn.execute(
            sa.text("SELECT count(*) FROM certsync.source_value WHERE object_guid = :g"),
            {"g": bare.object_guid},
        ).scalar_one()
    assert (marked, left) == (run_id, 0)


def test_a_rerun_of_a_run_keeps_the_values_its_earlier_try_merged(engine) -> None:
    """A cleared or reprocessed run extracts again under its own id: its earlier try marked every
    user it merged with that id, and this try reads only what changed since (a delta). The users
    this try did not read keep their values; the one it read gets its new ones."""
    rng = random.Random(11)
    users = [_user(rng, 7000 + n) for n in range(30)]
    run_id, _ = _merge(engine, users, "rerun")
    before = _rows(engine)
    changed = dataclasses.replace(users[0], user_certificate=(rng.randbytes(40),), usn_changed=9999)
    again, _ = _merge(engine, [changed], "rerun", full=False)
    after = _rows(engine)
    assert again == run_id
    assert after[changed.object_guid][2] == _expected(changed)
    assert {u.object_guid: after[u.object_guid][2] for u in users[1:]} == {
        u.object_guid: before[u.object_guid][2] for u in users[1:]
    }


def test_a_plan_analyzes_the_tables_a_stage_rewrote_and_only_those(engine) -> None:
    """A run plans seconds after writing its tables, before autovacuum analyzed them, and
    PostgreSQL without statistics joined the verdicts by a nested loop (sql/0021). A delta plan's
    refresh analyzes a table rewritten since its statistics, then none until it changes again."""
    rng = random.Random(13)
    with engine.begin() as conn:
        planning.refresh_statistics(conn)  # whatever earlier tests left
    _merge(engine, [_user(rng, 20_000 + n) for n in range(3000)], "statistics")
    with engine.connect() as conn:  # the merging session reports its counts when it goes idle
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _changed_since_analyze(conn, "source_user") < 3000:
            time.sleep(0.2)
    with engine.begin() as conn:
        analyzed = planning.refresh_statistics(conn)
    with engine.begin() as conn:  # a new transaction: each caches the statistics views it read
        again = planning.refresh_statistics(conn)
    assert {"source_user", "source_value"} <= set(analyzed) and again == [], (analyzed, again)


def _changed_since_analyze(conn, table: str) -> int:
    return conn.execute(
        sa.text(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE schemaname = 'certsync' AND relname = :t"
        ),
        {"t": table},
    ).scalar_one()


# 100,000 users with 1.5 values each, a verdict for each value: the first run's shape at the size
# where a nested loop cost minutes (sql/0021).
SYNTHETIC_FIRST_RUN = """
WITH run AS (
    INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run, trust_fingerprint)
    VALUES ('statistics-test', 'synthetic', %(at)s, 'full', true, 'fp') RETURNING run_id
), blobs AS (
    INSERT INTO certsync.cert_blob (sha256, value, first_run_id)
    SELECT sha256(int4send(i)), int4send(i), run_id FROM generate_series(1, 150000) i, run
), users AS (
    INSERT INTO certsync.source_user (object_guid, dn, sam_account_name, mail, user_account_control,
                                      usn_changed, last_seen_run_id, changed_run_id)
    SELECT md5(i::text)::uuid, 'CN=s' || i, 's' || i, 's' || i || '@x.test', 512, i, run_id, run_id
    FROM generate_series(1, 100000) i, run
), verdicts AS (
    INSERT INTO certsync.cert_verdict (sha256, attribute, trust_fingerprint, ok, reason, detail,
                                       checked_run_id, checked_at)
    SELECT sha256(int4send(i)), 'userCertificate', 'fp', i %% 2 = 0,
           CASE WHEN i %% 2 = 1 THEN 'expired' END, 'synthetic', run_id, %(at)s
    FROM generate_series(1, 150000) i, run
)
INSERT INTO certsync.source_value (object_guid, attribute, sha256, ordinal)
SELECT md5((1 + (i - 1) %% 100000)::text)::uuid, 'userCertificate', sha256(int4send(i)), 0
FROM generate_series(1, 150000) i
"""
PLAN_TABLES = ("source_user", "source_value", "cert_blob", "cert_verdict")
PARAMETER_TYPES = {
    "run_id": "bigint",
    "fp": "text",
    "at": "timestamptz",
    "low": "uuid",
    "high": "uuid",
    "only": "uuid[]",
}


def test_the_plan_reads_its_users_by_key_while_their_statistics_are_missing(engine, embedded_pg) -> None:
    """A full plan reads its users before their tables are analyzed (pipeline.plan leaves the
    ANALYZE to autovacuum): without statistics, each part's statements must read users and values by
    their keys' ranges and look each verdict up by cert_verdict's key, never scan a whole table
    (once per part, that would grow with the square of the users)."""
    statements = {
        "values": planning.VALUES_TO_PLAN.format(where=planning.IN_RANGE),
        "users": planning.USERS_TO_PLAN.format(where=planning.IN_RANGE),
        "listed values": planning.VALUES_TO_PLAN.format(where=planning.LISTED),
        "listed users": planning.USERS_TO_PLAN.format(where=planning.LISTED),
    }
    with psycopg.connect(embedded_pg.dsn_for(DATABASE)) as owner:  # rolled back at the end
        owner.execute(SYNTHETIC_FIRST_RUN, {"at": WHEN})
        for table in PLAN_TABLES:  # as right after the first extract and validation
            owner.execute("DELETE FROM pg_statistic WHERE starelid = %s::regclass", (f"certsync.{table}",))
            owner.execute(
                "UPDATE pg_class SET reltuples = -1 WHERE oid = %s::regclass", (f"certsync.{table}",)
            )
        low, high = uuid.UUID(int=1 << 124), uuid.UUID(int=2 << 124)  # a sixteenth of the users
        params = {"run_id": 1, "fp": "fp", "at": WHEN, "low": low, "high": high, "only": [low]}
        plans = {
            name: "\n".join(row[0] for row in owner.execute(f"EXPLAIN {query}", params))
            for name, query in statements.items()
        }
        # psycopg prepares a statement run five times on a connection, as the parts' are: the
        # plan PostgreSQL then may keep for every part must not scan whole tables either.
        owner.execute("SET plan_cache_mode = force_generic_plan")
        for name, query in statements.items():
            names = [n for n in params if f"%({n})s" in query]
            for number, n in enumerate(names, start=1):
                query = query.replace(f"%({n})s", f"${number}")
            types = ", ".join(PARAMETER_TYPES[n] for n in names)
            owner.execute(f"PREPARE part ({types}) AS {query}")
            values = ", ".join(f"%({n})s" for n in names)
            # Quoted by the client: EXPLAIN EXECUTE takes no parameters of the protocol's own.
            generic = psycopg.ClientCursor(owner).execute(f"EXPLAIN EXECUTE part ({values})", params)
            plans[f"{name}, generic"] = "\n".join(row[0] for row in generic)
            owner.execute("DEALLOCATE part")
        owner.rollback()
    for name, plan in plans.items():
        assert "Seq Scan" not in plan, (name, plan)
    for name in ("values", "listed values", "values, generic", "listed values, generic"):
        assert "Index Scan Backward using cert_verdict_pkey" in plans[name], plans[name]
        assert "source_value_pkey" in plans[name], plans[name]
    for name in ("users", "users, generic", "listed users", "listed users, generic"):
        assert "source_user_pkey" in plans[name], plans[name]
