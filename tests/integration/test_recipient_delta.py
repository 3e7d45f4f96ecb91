"""Delta reads of Exchange Online against the emulator over TLS, in each way the real service may
treat the changed-since filter (honoured, refused, accepted but ignored) and write WhenChanged
(shapes, a skewed clock, minute precision): a recipient someone else changed is in the next delta
run's snapshot, a refused filter becomes a full read that says so, the overlap covers writes that
reach reads late, a full read replaces the snapshot whole, and a delta plan corrects what someone
else changed. A database of its own; the emulator's settings are reset after each test."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from emulator_support import app_connections

from certsync.config import EnvSource, load_settings
from certsync.exchange.client import ExchangeClient
from certsync.failures import RunFailed
from certsync.pipeline import Services, begin, finish, read_recipients, run_all
from certsync_lab.stack import sync_environment

pytestmark = pytest.mark.integration
DATABASE = "certsync_recipients"


@pytest.fixture(scope="module")
def environment(sync_env, populated_dc, embedded_pg, own_tenant, app_credential_files) -> dict:
    """sync_env's settings over a database and a tenant of this module's own (its runs publish,
    and a full run here must find the tenant as seeded); the overlap is set per test."""
    connections = app_connections(
        dc=populated_dc,
        emulator=own_tenant,
        credentials=app_credential_files,
        pg=embedded_pg,
        database=DATABASE,
    )
    exchange = connections["certsync_exchange"]
    return {"connections": connections, "exchange": exchange, "sync_env": sync_env}


def _services(environment: dict, *, overlap_minutes: int) -> Services:
    connections = dict(environment["connections"])
    exchange = environment["exchange"]
    connections["certsync_exchange"] = dataclasses.replace(
        exchange, extra={**exchange.extra, "changed_overlap_minutes": overlap_minutes}
    )
    env = sync_environment(connections, json.loads(environment["sync_env"]["AIRFLOW_VAR_CERTSYNC_CONFIG"]))
    return Services(settings=load_settings(EnvSource(environ=env)))


@pytest.fixture()
def db(embedded_pg) -> Iterator[psycopg.Connection]:
    with psycopg.connect(embedded_pg.dsn_for(DATABASE), autocommit=True) as conn:
        yield conn


@pytest.fixture()
def control(own_tenant):
    own_tenant.control.reset_config()
    yield own_tenant.control
    own_tenant.control.reset_config()


class OtherAdmin:
    """Someone else writing to Exchange with Set-Mailbox; `restore` puts back what it replaced."""

    def __init__(self, client: ExchangeClient) -> None:
        self.client = client
        self._saved: dict[str, tuple[tuple[bytes, ...], tuple[bytes, ...]] | None] = {}

    def change(self, identity: str) -> bytes:
        """Replace the recipient's certificates with one new value; returns its SHA-256."""
        self._saved.setdefault(identity, self.client.held_certificates(identity, cmdlet="Set-Mailbox"))
        blob = os.urandom(64)
        outcome = self.client.set_certificates(
            cmdlet="Set-Mailbox", identity=identity, user_certificate=[blob], user_smime_certificate=[]
        )
        assert outcome.kind == "accepted", outcome
        return hashlib.sha256(blob).digest()

    def restore(self) -> None:
        for identity, held in self._saved.items():
            assert held is not None
            self.client.set_certificates(
                cmdlet="Set-Mailbox",
                identity=identity,
                user_certificate=held[0],
                user_smime_certificate=held[1],
            )


@pytest.fixture()
def other_admin(environment, control) -> Iterator[OtherAdmin]:
    admin = OtherAdmin(ExchangeClient.connect(_services(environment, overlap_minutes=0).settings.exchange))
    yield admin
    control.reset_config()
    admin.restore()


def _writable(control, count: int) -> list[str]:
    """Recipients a Set-Mailbox may write (not owned by directory synchronisation)."""
    found = [
        r["ExternalDirectoryObjectId"] or r["Guid"]
        for r in control.state()["recipients"]
        if r["RecipientTypeDetails"] == "UserMailbox"
        and (not r["IsDirSynced"] or r["IsExchangeCloudManaged"])
    ]
    assert len(found) >= count
    return found[-count:]


def _read(services: Services, lab_at, *, mode: str = "delta") -> dict:
    """One run that only reads Exchange (then closes, failed for want of a plan)."""
    run_id = begin(
        services, dag_id="recipients", airflow_run_id=f"recipients__{uuid.uuid4()}",
        logical_date=lab_at + timedelta(days=1), mode=mode, dry_run=True,
    )  # fmt: skip
    try:
        return {**read_recipients(services, run_id=run_id), "run_id": run_id}
    finally:
        with contextlib.suppress(RunFailed):  # closed as failed: it stopped before its plan
            finish(services, run_id=run_id)


def _held(db, run_id: int, identity: str) -> list[bytes] | None:
    row = db.execute(
        "SELECT user_certificate FROM certsync.exo_recipient WHERE seen_run_id = %s AND recipient_id = %s",
        (run_id, identity),
    ).fetchone()
    return None if row is None else [bytes(h) for h in row[0]]


def _why(db, run_id: int) -> tuple[str, str]:
    return db.execute("SELECT mode, why FROM certsync.exo_read WHERE run_id = %s", (run_id,)).fetchone()


MODES = {
    "honoured": {},
    "honoured-iso_z-minute-precision": {"when_changed_shape": "iso_z", "when_changed_precision_s": 60},
    "honoured-date_ms-clock-2h-behind": {"when_changed_shape": "date_ms", "clock_offset_s": -7200},
    "honoured-clock-3h-ahead": {"clock_offset_s": 10800},
    "ignored": {"filter_mode": "ignored"},
    "refused": {"filter_mode": "refused"},
    "no-when-changed": {"when_changed_shape": "absent"},
}


@pytest.mark.parametrize("name", list(MODES))
def test_next_delta_run_picks_up_a_change_made_by_someone_else(
    name, environment, control, other_admin, db, lab_at
) -> None:
    control.set_config(**MODES[name])
    # One minute of overlap covers stamps cut to the minute; a skewed clock needs none, since the
    # bound comes from Exchange's own stamps.
    services = _services(environment, overlap_minutes=1)
    first = _read(services, lab_at, mode="full")
    total = first["recipients"]
    assert _why(db, first["run_id"]) == ("full", "requested") and first["read"] == total
    (someone,) = _writable(control, 1)
    changed = other_admin.change(someone)

    second = _read(services, lab_at)
    mode, why = _why(db, second["run_id"])
    assert _held(db, second["run_id"], someone) == [changed]
    assert second["recipients"] == total  # the snapshot stays whole after a merge
    if name == "refused":
        assert (mode, why) == ("full", "filter refused (ParameterBindingException): full read")
    elif name == "no-when-changed":
        assert (mode, why) == ("full", "the earlier read had recipients without WhenChanged")
    else:
        assert mode == "delta" and why.startswith("changed since ")

    # Nothing changed since: with no overlap a honoured filter returns only what the newest stamp
    # names; an ignored one returns everything (merged all the same).
    third = _read(_services(environment, overlap_minutes=0), lab_at)
    assert _held(db, third["run_id"], someone) == [changed] and third["recipients"] == total
    if name.startswith("honoured") and "minute" not in name:
        assert third["read"] == 1
    elif name == "ignored":
        assert third["read"] == total


def test_overlap_covers_a_write_that_reaches_reads_late(
    environment, control, other_admin, db, lab_at
) -> None:
    """A write can stay invisible to reads for minutes while later ones show: its stamp is then
    older than the newest one read, and only the overlap brings it in."""
    none, minute = _services(environment, overlap_minutes=0), _services(environment, overlap_minutes=1)
    _read(none, lab_at, mode="full")
    late, prompt = _writable(control, 2)
    control.set_config(read_lag_s=4)
    late_hash = other_admin.change(late)
    written = time.monotonic()
    control.set_config(read_lag_s=0)
    time.sleep(1.1)  # a later stamp, to the second
    prompt_hash = other_admin.change(prompt)

    seen = _read(none, lab_at)
    assert _held(db, seen["run_id"], prompt) == [prompt_hash]
    assert _held(db, seen["run_id"], late) != [late_hash]  # not visible yet
    time.sleep(max(0.0, 4.2 - (time.monotonic() - written)))
    missed = _read(none, lab_at)  # visible now, but stamped before the newest stamp read
    assert _held(db, missed["run_id"], late) != [late_hash]
    caught = _read(minute, lab_at)
    assert _why(db, caught["run_id"])[0] == "delta"
    assert _held(db, caught["run_id"], late) == [late_hash]


def test_full_read_replaces_the_snapshot_whole(environment, control, db, lab_at) -> None:
    """A recipient deleted in Exchange stays in delta snapshots until the next full read, unless a
    write to it was answered "not found": then the next delta looks it up and drops it."""
    services = _services(environment, overlap_minutes=0)
    base = _read(services, lab_at, mode="full")
    for identity in ("deleted-in-exchange", "write-found-missing"):
        db.execute(
            "INSERT INTO certsync.exo_recipient (recipient_id, primary_smtp, recipient_type, is_dir_synced,"
            " is_cloud_managed, seen_run_id) VALUES (%s, %s, 'UserMailbox', false, false, %s)",
            (identity, f"{identity}@example.test", base["run_id"]),
        )
    db.execute(
        "INSERT INTO certsync.planned_action (run_id, action_no, object_guid, recipient_id, cmdlet, kind,"
        " batch, state, reason) VALUES (%s, 1, %s, 'write-found-missing', 'Set-Mailbox', 'replace', 0,"
        " 'failed', 'not_found:ManagementObjectNotFoundException')",
        (base["run_id"], uuid.uuid4()),
    )
    delta = _read(services, lab_at)
    assert _why(db, delta["run_id"])[0] == "delta" and delta["recipients"] == base["recipients"] + 1
    assert _held(db, delta["run_id"], "deleted-in-exchange") == []
    assert _held(db, delta["run_id"], "write-found-missing") is None
    full = _read(services, lab_at, mode="full")
    assert full["recipients"] == base["recipients"]
    assert _held(db, full["run_id"], "deleted-in-exchange") is None


def test_delta_run_corrects_what_someone_else_changed(environment, control, other_admin, db, lab_at) -> None:
    """A whole delta run: the directory did not change, Exchange did; the delta plan sees the
    recipient's change and publishes the directory's certificates back."""
    services = _services(environment, overlap_minutes=1)
    when = lab_at + timedelta(days=2)
    run_all(
        services,
        dag_id="recipients-e2e",
        airflow_run_id=f"e2e__{uuid.uuid4()}",
        logical_date=when,
        mode="full",
    )
    identity, cmdlet = db.execute(
        "SELECT p.recipient_id, a.cmdlet FROM certsync.published_state p JOIN certsync.planned_action a"
        " USING (recipient_id) WHERE a.cmdlet = 'Set-Mailbox' AND cardinality(p.user_certificate) > 0"
        " ORDER BY p.recipient_id LIMIT 1"
    ).fetchone()
    before = other_admin.client.held_certificates(identity, cmdlet=cmdlet)
    other_admin.change(identity)

    run_all(
        services, dag_id="recipients-e2e", airflow_run_id=f"e2e__{uuid.uuid4()}",
        logical_date=when + timedelta(hours=1), mode="delta",
    )  # fmt: skip
    run_id = db.execute("SELECT max(run_id) FROM certsync.sync_run").fetchone()[0]
    assert _why(db, run_id)[0] == "delta"
    scope = db.execute("SELECT plan_scope FROM certsync.sync_run WHERE run_id = %s", (run_id,)).fetchone()
    assert scope == ("delta",)
    published = db.execute(
        "SELECT count(*) FROM certsync.planned_action WHERE run_id = %s AND recipient_id = %s"
        " AND state = 'published'",
        (run_id, identity),
    ).fetchone()
    assert published == (1,)
    assert other_admin.client.held_certificates(identity, cmdlet=cmdlet) == before
