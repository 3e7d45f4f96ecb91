# ruff: noqa: S608 - the attacks are SQL built from fixed column names and integers
"""The signed audit log against an attacker with full database rights but without the signing key:
every tampering is found by `certsync audit verify` and the first row it touched is named.

The history is written by the real writer (certsync.audit.writer, as the certsync_app login, as the
publish stage writes it), with a key rotation in the middle and hostile strings in its texts; the
attacks run as the superuser with the guard triggers disabled, inside a transaction the verifier
reads and that is rolled back afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from certsync.audit import checkpoints, encoding, writer
from certsync.audit.checkpoints import CheckpointError
from certsync.audit.rows import db_rows
from certsync.audit.signing import AuditSigner, SigningKey
from certsync.audit.verify import Report, verify_rows
from certsync.cli import main
from certsync.store import publishing
from certsync.store.db import APP_ROLE, AUDITOR_ROLE
from certsync_lab.stack import certsync_database

DATABASE = "audit_signing"
HOSTILE = [
    'a", "b',
    "x\x00y".replace("\x00", "\\u0000"),
    "line\nbreak\r\t",
    '\\"]}, ["',
    "é 🙂 \u202e",
    "",
    "' OR 1=1 --",
]
FIRST = SigningKey.from_private(
    __import__(
        "cryptography.hazmat.primitives.asymmetric.ed25519", fromlist=["x"]
    ).Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
)
SECOND = SigningKey.generate()
ROWS_PER_KEY = 12


def _url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def _app_dsn(embedded_pg, role: str = APP_ROLE) -> str:
    return f"postgresql+psycopg://{role}@127.0.0.1:{embedded_pg.port}/{DATABASE}"


def _write(engine: sa.Engine, signer: AuditSigner, run_id: int, count: int) -> None:
    signing = engine.execution_options(**{writer.SIGNER_OPTION: signer})
    for n in range(count):
        with signing.begin() as conn:
            intent = writer.append(conn, _fields(run_id, n, phase="intent"))
            writer.append(conn, {**_fields(run_id, n, phase="outcome"), "intent_seq": intent})


def _fields(run_id: int, n: int, *, phase: str) -> dict:
    text = HOSTILE[n % len(HOSTILE)]
    return {
        "run_id": run_id,
        "dag_id": "certsync",
        "airflow_run_id": f"manual {text}",
        "object_guid": uuid.UUID(int=n + 1),
        "recipient_id": f"r-{n}",
        "primary_smtp": f"{text}@example.test",
        "cmdlet": "Set-Mailbox",
        "action": "replace",
        "user_certificate": [bytes([n]) * 32],
        "user_smime_certificate": [],
        "attempt": 1,
        "outcome": None if phase == "intent" else "rejected",
        "http_status": None if phase == "intent" else 400,
        "error_code": None if phase == "intent" else "bad",
        "detail": None if phase == "intent" else text,
        "client_request_id": uuid.UUID(int=1000 + n),
        "phase": phase,
        "action_no": n,
        "task_try": 1,
    }


@pytest.fixture(scope="module")
def history(embedded_pg) -> Iterator[dict]:
    """A history of two keys (the second endorsed by the first) and the checkpoint after it."""
    certsync_database(embedded_pg, DATABASE)
    app = sa.create_engine(_app_dsn(embedded_pg))
    with app.begin() as conn:
        run_id = conn.execute(
            sa.text(
                "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
                " VALUES ('certsync', 'audit', now(), 'full', false) RETURNING run_id"
            )
        ).scalar_one()
    _write(app, AuditSigner(key=FIRST), run_id, ROWS_PER_KEY)
    _write(app, AuditSigner(key=SECOND, previous=FIRST), run_id, ROWS_PER_KEY)
    with app.connect() as conn:
        head = conn.execute(
            sa.text("SELECT seq, row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
        ).one()
    checkpoint = checkpoints.sign(seq=head.seq, head=bytes(head.row_hash), at=datetime.now(UTC), key=SECOND)
    owner = sa.create_engine(_url(embedded_pg.dsn_for(DATABASE)))
    yield {"app": app, "owner": owner, "run_id": run_id, "checkpoint": checkpoint, "last": head.seq}
    app.dispose()
    owner.dispose()


KEYS = {FIRST.key_id: FIRST.private.public_key()}  # the auditor holds the first key only


def _verify(conn: sa.Connection, history: dict, **kw) -> Report:
    return verify_rows(
        db_rows(conn),
        public_keys=kw.get("keys", KEYS),
        checkpoints=kw.get("checkpoints", [history["checkpoint"]]),
    )


def _tampered(history: dict, *statements: str, python=None) -> Report:
    """The verdict on the history after the superuser ran `statements` with the guards off."""
    with history["owner"].connect() as conn:
        conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        # Full rights: the constraints that would get in the way go too.
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DROP CONSTRAINT audit_log_phase_shape"))
        conn.execute(sa.text("DROP INDEX certsync.audit_log_closed_once"))
        for statement in statements:
            conn.execute(sa.text(statement))
        if python:
            python(conn)
        report = _verify(conn, history)
        conn.rollback()
    return report


def _first(report: Report) -> tuple[int, str]:
    assert not report.intact
    return report.problems[0].seq, report.problems[0].kind


def test_the_written_history_verifies_with_the_first_key_and_the_rotation_in_the_chain(history) -> None:
    with history["owner"].connect() as conn:
        report = _verify(conn, history)
        keys = conn.execute(sa.text("SELECT key_id, endorsed FROM certsync.audit_keys ORDER BY seq")).all()
    assert report.intact, report.problems
    assert report.rows == history["last"] == 2 * 2 * ROWS_PER_KEY + 2
    assert [tuple(k) for k in keys] == [(FIRST.key_id, False), (SECOND.key_id, True)]
    assert report.keys == [FIRST.key_id, SECOND.key_id]


def test_an_altered_row_is_named(history) -> None:
    assert _first(_tampered(history, "UPDATE certsync.audit_log SET detail = 'edited' WHERE seq = 5")) == (
        5,
        "altered",
    )


def test_a_rehashed_chain_is_named_at_its_first_row(history) -> None:
    def rehash(conn: sa.Connection) -> None:
        rows = list(db_rows(conn))
        prev = rows[5]["prev_hash"]
        for row in rows[5:]:
            row = {**row, "prev_hash": prev, "detail": "rewritten" if row["seq"] == 6 else row["detail"]}
            prev = encoding.row_hash(row)
            conn.execute(
                sa.text(
                    "UPDATE certsync.audit_log SET detail = :d, prev_hash = :p, row_hash = :h WHERE seq = :s"
                ),
                {"d": row["detail"], "p": row["prev_hash"], "h": prev, "s": row["seq"]},
            )

    report = _tampered(history, python=rehash)
    assert _first(report) == (6, "forged")
    assert any(p.kind == "rewritten" for p in report.problems)  # and the checkpoint disagrees too


def test_redefined_views_and_functions_change_nothing(history) -> None:
    report = _tampered(
        history,
        "CREATE OR REPLACE VIEW certsync.audit_chain_breaks AS SELECT 0::bigint AS seq, 'x'::text AS problem WHERE false",
        "CREATE OR REPLACE FUNCTION certsync.audit_row_text(r certsync.audit_log) RETURNS text LANGUAGE sql AS $$ SELECT '' $$",
        "CREATE FUNCTION public.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT $1 $$",
        "UPDATE certsync.audit_log SET outcome = 'accepted' WHERE seq = 8",
    )
    assert _first(report) == (8, "altered")


def test_a_row_forged_by_the_application_role_is_named(history, embedded_pg) -> None:
    """certsync_app may append (the triggers stay on): it can compute a hash but not a signature."""
    with sa.create_engine(_app_dsn(embedded_pg)).connect() as conn:
        conn.begin()
        conn.execute(writer.LOCK)
        head = conn.execute(writer.HEAD).one()
        row = {c: None for c in encoding.COLUMNS}
        row.update(
            _fields(history["run_id"], 99, phase="intent"),
            seq=head.seq + 1,
            at=head.now,
            prev_hash=bytes(head.row_hash),
            key_id=SECOND.key_id,
        )
        row.update(row_hash=encoding.row_hash(row), signature=b"\x00" * 64)
        conn.execute(writer.INSERT, row)
        report = _verify(conn, history)
        # A key of the attacker's own, introduced by a key row, is no better.
        intruder = AuditSigner(key=SigningKey.generate())
        signing = conn.execution_options(**{writer.SIGNER_OPTION: intruder})
        writer.append(signing, _fields(history["run_id"], 100, phase="intent"))
        second = _verify(conn, history)
        conn.rollback()
    assert _first(report) == (history["last"] + 1, "forged")
    assert [(p.seq, p.kind) for p in second.problems][:2] == [
        (history["last"] + 1, "forged"),
        (history["last"] + 2, "untrusted"),
    ]


def test_a_deleted_tail_is_named_against_the_checkpoint(history) -> None:
    last = history["last"]
    assert _first(_tampered(history, f"DELETE FROM certsync.audit_log WHERE seq > {last - 3}")) == (
        last - 2,
        "truncated",
    )


def test_a_deleted_row_is_named(history) -> None:
    assert _first(_tampered(history, "DELETE FROM certsync.audit_log WHERE seq = 9")) == (10, "deleted")


def test_reordered_rows_are_named(history) -> None:
    swap = (
        "UPDATE certsync.audit_log a SET {cols} FROM certsync.audit_log b"
        " WHERE (a.seq, b.seq) IN ((6, 7), (7, 6))"
    ).format(cols=", ".join(f"{c} = b.{c}" for c in encoding.COLUMNS if c != "seq"))
    report = _tampered(history, swap)
    assert _first(report) == (6, "moved")
    assert "signed row 7" in report.problems[0].detail


def test_a_row_inserted_by_renumbering_is_named(history) -> None:
    report = _tampered(
        history,
        "UPDATE certsync.audit_log SET seq = -seq WHERE seq >= 10",
        "UPDATE certsync.audit_log SET seq = 1 - seq WHERE seq < 0",
        f"INSERT INTO certsync.audit_log ({', '.join(encoding.COLUMNS)}) SELECT 10, "
        + ", ".join(encoding.COLUMNS[1:])
        + " FROM certsync.audit_log WHERE seq = 3",
    )
    seq, kind = _first(report)
    assert (seq, kind) == (10, "moved"), report.problems[:3]  # the copy of row 3 ...
    assert any(
        p.seq == 11 and "signed row 10" in p.detail for p in report.problems
    )  # ... pushed row 10 along


def test_a_wrong_key_or_a_forged_checkpoint_is_said_plainly(history) -> None:
    other = SigningKey.generate()
    with history["owner"].connect() as conn:
        with pytest.raises(CheckpointError, match="wrong public key"):
            _verify(conn, history, keys={other.key_id: other.private.public_key()})
        conn.rollback()
        forged = checkpoints.Checkpoint(**{**history["checkpoint"].__dict__, "seq": history["last"] + 5})
        with pytest.raises(CheckpointError, match="does not verify"):
            _verify(conn, history, checkpoints=[forged])
        conn.rollback()
        with pytest.raises(CheckpointError, match="no checkpoint given"):
            _verify(conn, history, checkpoints=[])


def test_the_command_line_and_an_offline_export(history, embedded_pg, tmp_path: Path) -> None:
    public = tmp_path / "auditor.pub"
    public.write_text(FIRST.public_text() + "\n")
    cps = tmp_path / "checkpoints.jsonl"
    checkpoints.append(tmp_path, history["checkpoint"])
    auditor = f"postgresql://{AUDITOR_ROLE}@127.0.0.1:{embedded_pg.port}/{DATABASE}"
    runner = CliRunner()
    ok = runner.invoke(
        main, ["audit", "verify", "--public-key", str(public), "--checkpoint", str(cps), "--dsn", auditor]
    )
    assert ok.exit_code == 0, ok.output
    assert "audit log intact" in ok.output
    missing = runner.invoke(main, ["audit", "verify", "--checkpoint", str(cps), "--dsn", auditor])
    assert missing.exit_code == 2 and "no --public-key given" in missing.output
    wrong = tmp_path / "wrong.pub"
    wrong.write_text(SigningKey.generate().public_text() + "\n")
    refused = runner.invoke(
        main, ["audit", "verify", "--public-key", str(wrong), "--checkpoint", str(cps), "--dsn", auditor]
    )
    assert refused.exit_code == 2 and "wrong public key" in refused.output

    out = tmp_path / "audit.jsonl"
    exported = runner.invoke(main, ["audit", "export", "--out", str(out), "--dsn", auditor])
    assert exported.exit_code == 0, exported.output
    offline = ["audit", "verify", "--export", str(out), "--public-key", str(public), "--checkpoint", str(cps)]
    assert runner.invoke(main, offline).exit_code == 0
    lines = out.read_text().splitlines()
    row = json.loads(lines[4])
    row["primary_smtp"] = "someone-else@example.test"
    out.write_text("\n".join([*lines[:4], json.dumps(row), *lines[5:]]) + "\n")
    tampered = runner.invoke(main, offline)
    assert tampered.exit_code == 1
    assert f"row {row['seq']}: altered" in tampered.output


def test_the_auditor_role_reads_and_cannot_write(history, embedded_pg) -> None:
    dsn = f"postgresql://{AUDITOR_ROLE}@127.0.0.1:{embedded_pg.port}/{DATABASE}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM certsync.audit_log").fetchone()[0] == history["last"]
        for statement in (
            "INSERT INTO certsync.audit_log (seq) VALUES (0)",
            "UPDATE certsync.audit_log SET detail = 'x'",
            "DELETE FROM certsync.audit_log",
            "UPDATE certsync.sync_run SET state = 'failed'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()


LEGACY_INSERT = """
INSERT INTO certsync.audit_log (run_id, dag_id, airflow_run_id, object_guid, recipient_id, primary_smtp,
    cmdlet, action, user_certificate, user_smime_certificate, attempt, outcome, http_status, error_code,
    detail, client_request_id, {phased} seq, prev_hash, row_hash)
VALUES (:run_id, 'certsync', :airflow_run_id, :object_guid, 'r', :smtp, 'Set-Mailbox', 'add', :uc, '{{}}', 1,
    :outcome, :status, NULL, :detail, :crid, {phased_values} 0, '', '')
RETURNING seq
"""  # as certsync wrote rows before 0009 (and before 0006): the database's trigger chained and hashed them
BEFORE_0006 = LEGACY_INSERT.format(phased="", phased_values="")
BEFORE_0009 = LEGACY_INSERT.format(
    phased="phase, intent_seq, action_no, task_try, settled_by_run_id,",
    phased_values=":phase, :intent_seq, 1, 1, NULL,",
)


def _migrate(backend, migrations, below: str) -> None:
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations.filter(lambda m: m.id < below)))


def _legacy_rows(owner: sa.Engine, statement: str, run_id: int, phased: bool) -> None:
    with owner.begin() as conn:
        for n, text in enumerate(HOSTILE):
            values = {"run_id": run_id, "airflow_run_id": f"old {text}", "object_guid": uuid.UUID(int=n + 1),
                      "smtp": f"{text}@x", "uc": [bytes([n]) * 32], "crid": uuid.UUID(int=500 + n)}  # fmt: skip
            if not phased:
                conn.execute(
                    sa.text(statement), {**values, "outcome": "accepted", "status": 200, "detail": text}
                )
                continue
            intent = {"outcome": None, "status": None, "detail": None, "phase": "intent", "intent_seq": None}
            seq = conn.execute(sa.text(statement), {**values, **intent}).scalar_one()
            outcome = {
                "outcome": "rejected",
                "status": 400,
                "detail": text,
                "phase": "outcome",
                "intent_seq": seq,
            }
            conn.execute(sa.text(statement), {**values, **outcome})


def test_rows_from_before_signing_are_recomputed_in_python_and_covered_by_the_first_key_row(
    embedded_pg,
) -> None:
    from yoyo import get_backend, read_migrations

    from certsync.store.db import sql_dir

    dsn = embedded_pg.ensure_database("audit_upgrade")
    backend = get_backend(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    migrations = read_migrations(str(sql_dir())).filter(lambda m: m.path.endswith(".sql"))
    _migrate(backend, migrations, "0006")
    owner = sa.create_engine(_url(dsn))
    with owner.begin() as conn:
        run_id = conn.execute(
            sa.text(
                "INSERT INTO certsync.sync_run (dag_id, airflow_run_id, logical_date, mode, dry_run)"
                " VALUES ('certsync', 'old', now(), 'full', false) RETURNING run_id"
            )
        ).scalar_one()
    _legacy_rows(owner, BEFORE_0006, run_id, phased=False)
    _migrate(backend, migrations, "0009")
    _legacy_rows(owner, BEFORE_0009, run_id, phased=True)
    _migrate(backend, migrations, "9999")
    legacy = 3 * len(HOSTILE)
    _write(owner, AuditSigner(key=FIRST), run_id, 2)
    with owner.connect() as conn:
        head = conn.execute(
            sa.text("SELECT seq, row_hash FROM certsync.audit_log ORDER BY seq DESC LIMIT 1")
        ).one()
        checkpoint = checkpoints.sign(
            seq=head.seq, head=bytes(head.row_hash), at=datetime.now(UTC), key=FIRST
        )
        report = verify_rows(db_rows(conn), public_keys=KEYS, checkpoints=[checkpoint])
        conn.rollback()
        assert report.intact, report.problems
        assert report.unsigned_before_signing == legacy and report.rows == legacy + 1 + 4
        conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        for check in ("audit_log_phase_shape", "audit_log_signed"):
            conn.execute(sa.text(f"ALTER TABLE certsync.audit_log DROP CONSTRAINT {check}"))
        conn.execute(sa.text("UPDATE certsync.audit_log SET detail = 'edited' WHERE seq = 4"))
        tampered = verify_rows(db_rows(conn), public_keys=KEYS, checkpoints=[checkpoint])
        conn.rollback()
    owner.dispose()
    assert (tampered.problems[0].seq, tampered.problems[0].kind) == (4, "altered")


def test_a_cut_at_a_checkpoint_keeps_what_remains_verifiable(history) -> None:
    """Old rows dropped (as a detached partition would be): the cut signed at the last row taken out
    carries verification of the rest; without it (or with only a run's checkpoint there) the missing
    head is named."""
    cut = ROWS_PER_KEY  # inside the first key's rows
    with history["owner"].connect() as conn:
        at_cut = conn.execute(
            sa.text("SELECT row_hash FROM certsync.audit_log WHERE seq = :s"), {"s": cut}
        ).scalar()
        conn.rollback()
    carried = checkpoints.sign(
        seq=cut, head=bytes(at_cut), at=datetime.now(UTC), key=FIRST, kind=checkpoints.CUT,
        first_seq=1, first_prev=b"", active_key=FIRST.key_id, label="test",
    )  # fmt: skip
    plain = checkpoints.sign(seq=cut, head=bytes(at_cut), at=datetime.now(UTC), key=FIRST)
    with history["owner"].connect() as conn:
        conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        conn.execute(sa.text("DELETE FROM certsync.audit_log WHERE seq <= :s"), {"s": cut})
        kept = _verify(conn, history, checkpoints=[carried, history["checkpoint"]])
        conn.rollback()
        conn.begin()
        conn.execute(sa.text("ALTER TABLE certsync.audit_log DISABLE TRIGGER USER"))
        conn.execute(sa.text("DELETE FROM certsync.audit_log WHERE seq <= :s"), {"s": cut})
        bare = _verify(conn, history)
        run_checkpoint_only = _verify(conn, history, checkpoints=[plain, history["checkpoint"]])
        conn.rollback()
    assert kept.intact, kept.problems
    assert kept.first_seq == cut + 1
    assert _first(bare) == (cut + 1, "deleted")
    # A run's checkpoint is no cut: rows deleted up to it are still named.
    assert _first(run_checkpoint_only) == (cut + 1, "deleted")


def test_a_refused_closing_row_names_its_rule(history) -> None:
    """sql/0031: a second closing row of an intent is refused as audit_log_closed_once (by which a
    publish task knows another settled the intent meanwhile), a row closing no intent of its
    request as audit_log_pairing; neither is written."""
    signing = history["app"].execution_options(**{writer.SIGNER_OPTION: AuditSigner(key=SECOND)})
    with history["owner"].connect() as conn:
        closed = conn.execute(
            sa.text(
                "SELECT min(seq) FROM certsync.audit_log WHERE phase = 'intent' AND client_request_id = :c"
            ),
            {"c": uuid.UUID(int=1000)},  # the first key's first intent, closed by the row after it
        ).scalar_one()
    refusals = {}
    for label, n in (("again", 0), ("another request", 1)):
        with pytest.raises(sa.exc.IntegrityError) as caught, signing.begin() as conn:
            closing = {**_fields(history["run_id"], n, phase="outcome"), "intent_seq": closed}
            writer.append(conn, {**closing, "recipient_id": "r-0"})
        refusals[label] = caught.value
    assert refusals["again"].orig.diag.constraint_name == "audit_log_closed_once"
    assert publishing.closed_meanwhile(refusals["again"])
    assert refusals["another request"].orig.diag.constraint_name == "audit_log_pairing"
    assert not publishing.closed_meanwhile(refusals["another request"])
    with history["owner"].connect() as conn:
        last = conn.execute(sa.text("SELECT max(seq) FROM certsync.audit_log")).scalar_one()
    assert last == history["last"]
