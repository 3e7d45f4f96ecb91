# ruff: noqa: S608 - the attacks are SQL built from fixed names and integers
"""The audit log partitioned by month (sql/0014), on a database that already held a signed history of
four months: the migration keeps every row and the chain; old months are taken out by
`certsync audit detach` only with a covering checkpoint, and what remains (and each month's export on
its own) still verifies, while tampering, a month missing in the middle and a missing oldest month
are named. Then the verify_audit check: incremental after its signed mark, full on demand.

The tests run in file order on one database: each cut is permanent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from certsync.audit import checkpoints, partitions, writer
from certsync.audit.checkpoints import CUT
from certsync.audit.partitions import CutRefused, db_cuts, verify_export
from certsync.audit.rows import db_rows
from certsync.audit.selfcheck import AuditBroken, after_run
from certsync.audit.signing import AuditSigner, SigningKey
from certsync.audit.verify import Report, verify_rows
from certsync.cli import main
from certsync.store.db import APP_ROLE

DATABASE = "audit_partitions"
KEY = SigningKey.generate()
SIGNER = AuditSigner(key=KEY)
KEYS = {KEY.key_id: KEY.private.public_key()}
PER_MONTH = 6


def _month(back: int) -> date:
    today = datetime.now(UTC).date().replace(day=1)
    year, month = divmod(today.year * 12 + today.month - 1 - back, 12)
    return date(year, month + 1, 1)


MONTHS = [_month(back) for back in (4, 3, 2, 1)]  # four whole months before this one


def _fields(run_id: int, n: int) -> dict:
    return {
        "run_id": run_id,
        "dag_id": "certsync",
        "airflow_run_id": f"run {n}",
        "object_guid": uuid.UUID(int=n + 1),
        "recipient_id": f"r-{n}",
        "primary_smtp": f"user{n}@example.test",
        "cmdlet": "Set-Mailbox",
        "action": "replace",
        "user_certificate": [bytes([n % 256]) * 32],
        "user_smime_certificate": [],
        "attempt": 1,
        "client_request_id": uuid.uuid4(),
        "phase": "intent",
        "action_no": n,
        "task_try": 1,
    }


def _write_back_dated(owner: sa.Engine, run_id: int) -> None:
    """Signed rows as the writer makes them, dated in each of the past months (the writer takes the
    database's clock; here the time is set, as if the rows had been written then)."""
    seq, prev = 0, b""
    with owner.begin() as conn:
        for m, first in enumerate(MONTHS):
            for i in range(PER_MONTH):
                at = datetime(first.year, first.month, 1 + 3 * i, 12, tzinfo=UTC)
                if seq == 0:
                    row = writer._key_row(
                        {"run_id": run_id, "dag_id": "certsync", "airflow_run_id": "x", "task_try": 1},
                        SIGNER,
                        seq=1,
                        at=at,
                        prev_hash=b"",
                    )
                else:
                    row = writer._complete(
                        _fields(run_id, m * PER_MONTH + i), seq=seq + 1, at=at, prev_hash=prev, key=KEY
                    )
                conn.execute(writer.INSERT, row)
                seq, prev = seq + 1, row["row_hash"]


def _stored(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text("SELECT seq, at, row_hash, signature FROM certsync.audit_log ORDER BY seq")
            )
        ]


def _head_checkpoint(engine: sa.Engine) -> checkpoints.Checkpoint:
    with engine.connect() as conn:
        head = conn.execute(
            sa.text("SELECT seq, row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
        ).one()
    return checkpoints.sign(seq=head.seq, head=bytes(head.row_hash), at=datetime.now(UTC), key=KEY)


@pytest.fixture(scope="module")
def log(embedded_pg, tmp_path_factory) -> Iterator[dict]:
    """A database migrated to 0013, given four months of signed rows, then migrated to the end."""
    from yoyo import get_backend, read_migrations

    from certsync.store.db import sql_dir

    dsn = embedded_pg.ensure_database(DATABASE)
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    backend = get_backend(url)
    migrations = read_migrations(str(sql_dir())).filter(lambda m: m.path.endswith(".sql"))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations.filter(lambda m: m.id < "0014")))
    owner = sa.create_engine(url)
    with owner.begin() as conn:
        run_id = conn.execute(
            sa.text(
                "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
                " VALUES ('certsync', 'history', now(), 'full', false) RETURNING run_id"
            )
        ).scalar_one()
    _write_back_dated(owner, run_id)
    before = _stored(owner)
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations))
    app = sa.create_engine(f"postgresql+psycopg://{APP_ROLE}@127.0.0.1:{embedded_pg.port}/{DATABASE}")
    directory = tmp_path_factory.mktemp("checkpoints")
    yield {"owner": owner, "app": app, "run_id": run_id, "before": before, "dir": directory, "dsn": dsn,
           "exports": tmp_path_factory.mktemp("exports")}  # fmt: skip
    app.dispose()
    owner.dispose()


def _verify(conn: sa.Connection, given: list[checkpoints.Checkpoint]) -> Report:
    cuts = db_cuts(conn)
    return verify_rows(db_rows(conn), public_keys=KEYS, checkpoints=[*given, *cuts])


def _tampered(log: dict, given: list, *statements: str) -> Report:
    with log["owner"].connect() as conn:
        conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        for statement in statements:
            conn.execute(sa.text(statement))
        report = _verify(conn, given)
        conn.rollback()
    return report


def _first(report: Report) -> tuple[int, str]:
    assert not report.intact
    return report.problems[0].seq, report.problems[0].kind


def test_the_migration_partitions_a_populated_log_and_keeps_its_chain(log) -> None:
    assert _stored(log["owner"]) == log["before"]  # same rows, hashes and signatures
    with log["owner"].connect() as conn:
        held = dict(
            conn.execute(
                sa.text("SELECT tableoid::regclass::text, count(*) FROM certsync.audit_log GROUP BY 1")
            ).all()
        )
        kind = conn.execute(
            sa.text("SELECT relkind FROM pg_class WHERE oid = 'certsync.audit_log'::regclass")
        ).scalar()
        report = _verify(conn, [_head_checkpoint(log["owner"])])
    assert kind == "p"
    assert held == {f"certsync.audit_log_{m:%Y_%m}": PER_MONTH for m in MONTHS}
    assert report.intact, report.problems
    # The application appends through the partitioned table (this month's partition) ...
    assert "audit_log_" + f"{_month(0):%Y_%m}" in partitions.ensure(log["app"])
    signing = log["app"].execution_options(**{writer.SIGNER_OPTION: SIGNER})
    with signing.begin() as conn:
        writer.append(conn, _fields(log["run_id"], 100))
    # ... but can neither make nor remove a partition itself.
    with log["app"].connect() as conn, pytest.raises(sa.exc.ProgrammingError):
        conn.execute(sa.text(f"DROP TABLE certsync.audit_log_{MONTHS[0]:%Y_%m}"))


def test_no_cut_without_a_checkpoint_at_or_after_it(log) -> None:
    early = log["before"][PER_MONTH - 3]  # a checkpoint inside the first month only
    inside = checkpoints.sign(seq=early[0], head=bytes(early[2]), at=datetime.now(UTC), key=KEY)
    with pytest.raises(CutRefused, match=f"no signed checkpoint at or after row {PER_MONTH}"):
        partitions.detach(log["owner"], before=MONTHS[1], signer=SIGNER, given=[inside],
                          export_dir=log["exports"], checkpoint_dir=None, drop=False)  # fmt: skip
    with log["owner"].connect() as conn:
        assert len(partitions.months(conn)) >= 4 and not db_cuts(conn)


def test_detaching_the_oldest_months_keeps_the_rest_and_their_exports_verifiable(log) -> None:
    head = _head_checkpoint(log["owner"])
    checkpoints.append(log["dir"], head)
    done = partitions.detach(log["owner"], before=MONTHS[2], signer=SIGNER, given=[head],
                             export_dir=log["exports"], checkpoint_dir=log["dir"], drop=False)  # fmt: skip
    assert [t.month.month for t in done] == MONTHS[:2]
    cut_seq = 2 * PER_MONTH
    with log["owner"].connect() as conn:
        report = _verify(conn, [head])
        recorded = conn.execute(
            sa.text("SELECT month, last_seq, vouched_by_seq FROM certsync.audit_cut ORDER BY month")
        ).all()
        detached = conn.execute(
            sa.text(f"SELECT count(*) FROM certsync.audit_log_{MONTHS[0]:%Y_%m}")
        ).scalar()
    assert report.intact, report.problems
    assert report.first_seq == cut_seq + 1 and report.cut.seq == cut_seq
    assert [(r.month, r.last_seq, r.vouched_by_seq) for r in recorded] == [
        (MONTHS[0], PER_MONTH, head.seq), (MONTHS[1], cut_seq, head.seq)]  # fmt: skip
    assert detached == PER_MONTH  # detached, not dropped: a plain table now
    with log["owner"].connect() as conn:  # the database's own quick look agrees
        assert conn.execute(sa.text("SELECT count(*) FROM certsync.audit_chain_breaks")).scalar() == 0
    # Each month's export verifies on its own, with only the public key (its cuts are in it) ...
    for item in done:
        assert verify_export(item.export, keys=KEYS).intact
    # ... and the checkpoint file, which now holds the cuts, verifies what remains by itself.
    from_file = checkpoints.read(log["dir"] / checkpoints.FILE_NAME)
    assert [c.kind for c in from_file] == ["checkpoint", CUT, CUT]
    with log["owner"].connect() as conn:
        assert verify_rows(db_rows(conn), public_keys=KEYS, checkpoints=from_file).intact
    # An export cut short, or a row changed in it, is named.
    lines = done[0].export.read_text().splitlines()
    short = done[0].export.with_name("short.jsonl")
    short.write_text("\n".join(lines[:-2]) + "\n")
    assert _first(verify_export(short, keys=KEYS))[1] == "truncated"
    edited = json.loads(lines[3])
    edited["detail"] = "edited"
    short.write_text("\n".join([*lines[:3], json.dumps(edited), *lines[4:]]) + "\n")
    assert _first(verify_export(short, keys=KEYS)) == (3, "altered")


def test_after_a_cut_tampering_and_missing_months_are_named(log) -> None:
    given = [_head_checkpoint(log["owner"])]
    third, fourth = (f"certsync.audit_log_{m:%Y_%m}" for m in MONTHS[2:])
    first_kept = 2 * PER_MONTH + 1
    altered = _tampered(
        log, given, f"UPDATE certsync.audit_log SET detail = 'x' WHERE seq = {first_kept + 2}"
    )
    assert _first(altered) == (first_kept + 2, "altered")
    # A month in the middle gone (the third kept, the fourth and this month's remain) ...
    middle = _tampered(log, given, f"DELETE FROM {fourth}")
    assert _first(middle) == (4 * PER_MONTH + 1, "deleted")
    # ... or the oldest month kept gone without a cut ...
    oldest = _tampered(log, given, f"DELETE FROM {third}")
    assert _first(oldest) == (3 * PER_MONTH + 1, "deleted")
    # ... or with a cut made up in the database for it (the attacker has no key to sign it).
    with log["owner"].connect() as conn:
        conn.begin()
        at_edge = conn.execute(
            sa.text(f"SELECT row_hash FROM certsync.audit_log WHERE seq = {3 * PER_MONTH}")
        ).scalar()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        conn.execute(sa.text(f"DELETE FROM {third}"))
        genuine = db_cuts(conn)[-1]
        forged = {**genuine.to_json(), "seq": 3 * PER_MONTH, "head": bytes(at_edge).hex(), "label": "made up"}
        conn.execute(sa.text("INSERT INTO certsync.audit_cut (month, partition_name, action, row_count, cut)"
                             " VALUES ('1999-01-01', 'x', 'dropped', 0, CAST(:c AS jsonb))"), {"c": json.dumps(forged)})  # fmt: skip
        report = _verify(conn, given)
        conn.rollback()
    found = [(p.seq, p.kind) for p in report.problems]
    assert (3 * PER_MONTH, "forged") in found and (3 * PER_MONTH + 1, "deleted") in found


def test_dropping_the_next_month_from_the_command_line(log) -> None:
    env = {
        "AIRFLOW_CONN_CERTSYNC_AUDIT_SIGNING": json.dumps(
            {"conn_type": "generic", "password": KEY.private_text()}
        ),
        "AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps({"audit_checkpoint_dir": str(log["dir"])}),
    }
    result = CliRunner().invoke(
        main,
        ["audit", "detach", "--before", f"{MONTHS[3]:%Y-%m}", "--drop", "--export-dir", str(log["exports"]),
         "--owner-dsn", log["dsn"]],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{MONTHS[2]:%Y-%m}: rows {2 * PER_MONTH + 1}..{3 * PER_MONTH} dropped" in result.output
    with log["owner"].connect() as conn:
        assert (
            conn.execute(sa.text(f"SELECT to_regclass('certsync.audit_log_{MONTHS[2]:%Y_%m}')")).scalar()
            is None
        )
        assert _verify(conn, [_head_checkpoint(log["owner"])]).first_seq == 3 * PER_MONTH + 1
    verified = CliRunner().invoke(
        main,
        ["audit", "verify", "--public-key", str(_public_key_file(log)), "--export",
         str(log["exports"] / f"audit_log_{MONTHS[2]:%Y_%m}.jsonl")],
    )  # fmt: skip
    assert verified.exit_code == 0, verified.output
    # An export of what remains carries the cuts, so a run's checkpoint alone verifies it offline.
    remaining, only_head = log["exports"] / "remaining.jsonl", log["exports"] / "head.jsonl"
    checkpoints.append(log["exports"], _head_checkpoint(log["owner"]))
    (log["exports"] / checkpoints.FILE_NAME).rename(only_head)
    exported = CliRunner().invoke(main, ["audit", "export", "--out", str(remaining), "--dsn", log["dsn"]])
    assert exported.exit_code == 0, exported.output
    offline = CliRunner().invoke(
        main,
        ["audit", "verify", "--public-key", str(_public_key_file(log)), "--checkpoint", str(only_head),
         "--export", str(remaining)],
    )  # fmt: skip
    assert offline.exit_code == 0 and f"after the cut at row {3 * PER_MONTH}" in offline.output, (
        offline.output
    )
    # This month is never taken out: rows are still arriving in it.
    with pytest.raises(CutRefused, match="only past months"):
        partitions.detach(log["owner"], before=_month(-1), signer=SIGNER, given=[], export_dir=log["exports"],
                          checkpoint_dir=None, drop=True)  # fmt: skip


def _public_key_file(log: dict) -> Path:
    path = log["dir"] / "public.key"
    path.write_text(KEY.public_text() + "\n")
    return path


def _commit(log: dict, statement: str) -> None:
    with log["owner"].begin() as conn:
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        conn.execute(sa.text(statement))
        for trigger in (
            "audit_log_chain",
            "audit_log_pairing",
            "audit_log_no_update",
            "audit_log_no_truncate",
            "audit_log_track_open_intent",
        ):
            conn.execute(sa.text(f"ALTER TABLE certsync.audit_log ENABLE ALWAYS TRIGGER {trigger}"))


def test_verify_audit_is_incremental_after_its_mark_and_full_on_demand(log) -> None:
    checkpoints.append(log["dir"], _head_checkpoint(log["owner"]))
    first = after_run(log["app"], signer=SIGNER, directory=log["dir"])
    assert first.resumed is None  # no mark yet: the whole log
    signing = log["app"].execution_options(**{writer.SIGNER_OPTION: SIGNER})
    with signing.begin() as conn:
        new = [writer.append(conn, _fields(log["run_id"], 200 + n)) for n in range(3)]
    checkpoints.append(log["dir"], _head_checkpoint(log["owner"]))
    second = after_run(log["app"], signer=SIGNER, directory=log["dir"])
    # Only the new rows (and the key row the writer adds: the cut took the last one out).
    assert second.resumed is not None and second.resumed.seq == first.last_seq
    assert (second.first_seq, second.last_seq) == (first.last_seq + 1, new[-1])
    # Tampering after the mark is caught by the incremental check.
    with signing.begin() as conn:
        after = writer.append(conn, _fields(log["run_id"], 300))
    checkpoints.append(log["dir"], _head_checkpoint(log["owner"]))
    _commit(log, f"UPDATE certsync.audit_log SET detail = 'x' WHERE seq = {after}")
    with pytest.raises(AuditBroken, match=f"row {after}: altered"):
        after_run(log["app"], signer=SIGNER, directory=log["dir"])
    _commit(log, f"UPDATE certsync.audit_log SET detail = NULL WHERE seq = {after}")
    assert after_run(log["app"], signer=SIGNER, directory=log["dir"]).resumed is not None
    # Tampering before the mark is not looked at incrementally; the full check names it.
    _commit(log, f"UPDATE certsync.audit_log SET detail = 'x' WHERE seq = {new[0]}")
    assert after_run(log["app"], signer=SIGNER, directory=log["dir"]).rows == 0
    with pytest.raises(AuditBroken, match=f"row {new[0]}: altered"):
        after_run(log["app"], signer=SIGNER, directory=log["dir"], full=True)
    _commit(log, f"UPDATE certsync.audit_log SET detail = NULL WHERE seq = {new[0]}")
    # A mark written without the key is refused, not resumed from.
    with log["owner"].begin() as conn:
        mark = json.loads(json.dumps(conn.execute(sa.text(
            "SELECT mark FROM certsync.audit_verification ORDER BY verification_no DESC LIMIT 1")).scalar()))  # fmt: skip
        mark["seq"] += 1
        conn.execute(sa.text("INSERT INTO certsync.audit_verification (mode, to_seq, row_count, seconds, mark)"
                             " VALUES ('incremental', 0, 0, 0, CAST(:m AS jsonb))"), {"m": json.dumps(mark)})  # fmt: skip
    with pytest.raises(AuditBroken, match="forged"):
        after_run(log["app"], signer=SIGNER, directory=log["dir"])


def test_a_full_check_runs_by_itself_when_the_last_is_old(log) -> None:
    with log["owner"].begin() as conn:
        conn.execute(sa.text("DELETE FROM certsync.audit_verification WHERE mark ->> 'seq' <> to_seq::text"))
    report = after_run(log["app"], signer=SIGNER, directory=log["dir"], full_every_days=0)
    assert report.resumed is not None
    stale = datetime.now(UTC) - timedelta(days=8)
    with log["owner"].begin() as conn:  # every full mark re-signed as of 8 days ago
        for no, mark in conn.execute(
            sa.text("SELECT verification_no, mark FROM certsync.audit_verification")
        ).all():
            m = checkpoints.Checkpoint.from_json(mark, where="test")
            again = checkpoints.sign(seq=m.seq, head=m.head, at=stale, key=KEY, kind=m.kind, first_seq=m.first_seq,
                                     active_key=m.active_key, label=m.label)  # fmt: skip
            conn.execute(sa.text("UPDATE certsync.audit_verification SET mark = CAST(:m AS jsonb) WHERE verification_no = :n"),
                         {"m": json.dumps(again.to_json()), "n": no})  # fmt: skip
    assert after_run(log["app"], signer=SIGNER, directory=log["dir"], full_every_days=7).resumed is None


def test_a_row_without_its_month_partition_is_kept_in_the_default_one(log) -> None:
    """No partition for this month (here: taken away inside a transaction): the append still
    succeeds, into the default partition, and the month's partition is then not made over it."""
    this_month = f"audit_log_{_month(0):%Y_%m}"
    signing = log["owner"].execution_options(**{writer.SIGNER_OPTION: SIGNER})
    with signing.connect() as conn:
        conn.begin()
        conn.execute(sa.text(f"ALTER TABLE certsync.audit_log DETACH PARTITION certsync.{this_month}"))
        conn.execute(sa.text(f"ALTER TABLE certsync.{this_month} RENAME TO set_aside"))
        seq = writer.append(conn, _fields(log["run_id"], 400))
        where = conn.execute(
            sa.text("SELECT tableoid::regclass::text FROM certsync.audit_log WHERE seq = :s"), {"s": seq}
        ).scalar()
        made = conn.execute(sa.text("SELECT certsync.audit_log_ensure_partition(CAST(:m AS date))"),
                            {"m": _month(0)}).scalar()  # fmt: skip
        conn.rollback()
    assert where == "certsync.audit_log_default"
    assert made is None
