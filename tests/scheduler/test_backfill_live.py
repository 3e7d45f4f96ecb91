"""Backfills beside failures and live runs, through the real scheduler: a backfill interval whose
publish Exchange refused ends failed in Airflow, and `--reprocess-behavior failed` recovers it.

This module sorts right after test_backfill.py and before the modules that run at the present time:
a backfill only reaches intervals that already ended (logical dates up to an hour ago), and a run
older than one that already planned is superseded, so the failing interval must be the newest run
so far when it plans.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.scheduler.harness import SchedulerLab, now, parse_time

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 360.0
SET_CMDLETS = ("Set-Mailbox", "Set-MailUser", "Set-MailContact")
# A refusal that is not transient (no retry status, no dirsync wording): each action fails at once.
REFUSAL = {
    "count": 10_000,
    "status": 400,
    "exception_type": "RecipientTaskException",
    "text": "Injected refusal.",
}


def _latest_interval() -> datetime:
    """The logical date of the newest hourly interval that has ended (the newest a backfill makes)."""
    return now().replace(minute=0, second=0) - timedelta(hours=1)


def _newest_planned(lab: SchedulerLab) -> datetime | None:
    return lab.query("SELECT max(logical_date) FROM certsync.sync_run WHERE planned_at IS NOT NULL")[0][0]


def _backfill_run_at(lab: SchedulerLab, logical_date: datetime) -> dict[str, Any]:
    runs = [r for r in lab.dag_runs() if r["logical_date"] and parse_time(r["logical_date"]) == logical_date]
    assert len(runs) == 1, f"{len(runs)} runs at {logical_date}: {runs}"
    return runs[0]


def _refuse_writes(lab: SchedulerLab) -> None:
    lab.set_emulator(faults=[{"cmdlet": cmdlet, **REFUSAL} for cmdlet in SET_CMDLETS])


def _ensure_published(lab: SchedulerLab, before: datetime) -> None:
    """The tenant's initial state published by a run older than `before` (test_backfill.py's
    backfill did so when the package runs whole; alone, this module backfills one interval)."""
    published = lab.query(
        "SELECT count(*) FROM certsync.published_state"
        " WHERE cardinality(user_certificate) + cardinality(user_smime_certificate) > 0"
    )[0][0]
    if published:
        return
    lab.wait_for_backfills()
    earlier = before - timedelta(hours=1)
    lab.backfill(from_date=earlier, to_date=earlier, reprocess="completed")
    run_id = _backfill_run_at(lab, earlier)["dag_run_id"]
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)


def test_failed_backfill_interval_shows_failed_and_reprocess_failed_publishes_once(
    lab: SchedulerLab, request: pytest.FixtureRequest
) -> None:
    at = _latest_interval()
    newest = _newest_planned(lab)
    assert newest is None or newest <= at, (
        f"a run at {newest} already planned: this interval would be superseded"
    )
    _ensure_published(lab, before=at)
    removed = lab.drop_certificates(2)
    request.addfinalizer(lambda: lab.restore_certificates(removed))  # later modules drop others
    since = len(lab.requests())
    lab.wait_for_backfills()
    _refuse_writes(lab)
    # "completed": the interval may already hold a green run of an earlier backfill; it runs again.
    lab.backfill(from_date=at, to_date=at, reprocess="completed")
    run_id = _backfill_run_at(lab, at)["dag_run_id"]
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "failed", lab.describe_tasks(run_id)
    record = lab.sync_run(run_id)
    assert record is not None and record["state"] == "failed", record
    # A failed run's description ends with its failed tries' logs: finish's names the failed actions.
    finish = next(t for t in lab.task_instances(run_id) if t["task_id"] == "finish")
    named = [line for line in lab.task_log(finish) if f"run {record['run_id']} failed: " in line]
    assert named and named[-1] in lab.describe_tasks(run_id), lab.describe_tasks(run_id)
    refused = lab.writes(since)
    assert refused and all(w["status"] == 400 for w in refused), refused
    failed = lab.query(
        "SELECT count(*) FROM certsync.planned_action WHERE run_id = %s AND state = 'failed'",
        (record["run_id"],),
    )[0][0]
    assert failed >= 2, f"{failed} failed actions for 2 changed users"

    lab.reset_emulator()
    lab.wait_for_backfills()
    lab.backfill(from_date=at, to_date=at, reprocess="failed")
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)
    assert _try_of(lab, run_id, "begin") >= 2, lab.describe_tasks(run_id)
    again = lab.sync_run(run_id)
    assert again is not None and again["state"] == "succeeded" and again["run_id"] == record["run_id"], again

    writes = lab.writes(since)
    assert lab.unaudited(writes) == []
    accepted = Counter(w["identity"] for w in writes if w["status"] == 200)
    assert [i for i, n in accepted.items() if n > 1] == [], f"changes published twice: {accepted}"
    assert set(accepted) == {w["identity"] for w in refused}, (accepted, refused)
    pending = lab.query(
        "SELECT action_no, state FROM certsync.planned_action WHERE run_id = %s AND state IN ('pending', 'failed')",
        (record["run_id"],),
    )
    assert pending == [], f"the recovered run left actions open: {pending}"
    assert lab.disagreements(record["run_id"]) == []


def _try_of(lab: SchedulerLab, run_id: str, task_id: str) -> int:
    return next(int(t["try_number"]) for t in lab.task_instances(run_id) if t["task_id"] == task_id)


def test_a_backfill_beside_a_live_run_waits_for_it_and_publishes_nothing_older(
    lab: SchedulerLab, request: pytest.FixtureRequest
) -> None:
    """A live manual run is publishing when an operator backfills a past interval: the backfill run
    waits for the run slot, then finds a newer run planned and is recorded superseded, with its
    validation kept and nothing sent; Exchange holds the live run's selection."""
    at = _latest_interval()
    _ensure_published(lab, before=at)
    removed = lab.drop_certificates(6)
    request.addfinalizer(lambda: lab.restore_certificates(removed))
    since = len(lab.requests())
    lab.wait_for_backfills()
    lab.set_emulator(latency_ms=1500)  # six Set-* keep the live run publishing for several seconds
    request.addfinalizer(lab.reset_emulator)
    live = lab.trigger()
    lab.wait_for_task(live, "publish", ["running"], timeout=RUN_TIMEOUT_S)
    lab.backfill(from_date=at, to_date=at, reprocess="completed")
    backfill = _backfill_run_at(lab, at)["dag_run_id"]

    assert lab.wait_for_run(live, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(live)
    assert lab.wait_for_run(backfill, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(backfill)
    live_record, old_record = lab.sync_run(live), lab.sync_run(backfill)
    assert live_record is not None and live_record["state"] == "succeeded", live_record
    assert old_record is not None and old_record["state"] == "superseded", old_record
    # The record of a re-run interval keeps its first start; its stages show when it really worked.
    worked = min(
        parse_time(t["start_date"]) for t in lab.task_instances(backfill) if t["task_id"] == "extract"
    )
    assert worked >= live_record["finished_at"], (
        f"the backfill extracted at {worked}, while the live run held the slot: {live_record}"
    )

    writes = lab.writes(since)
    assert len({w["identity"] for w in writes}) >= 6, f"{len(writes)} Set-* for 6 changed users"
    assert lab.unaudited(writes) == []
    publishers = {run for rows in lab.audit_of(writes).values() for _phase, _outcome, run in rows}
    assert publishers == {live_record["run_id"]}, f"Set-* audited to runs {sorted(publishers)}"
    repeated = [i for i, n in Counter(w["identity"] for w in writes).items() if n > 1]
    assert repeated == [], f"recipients written more than once: {repeated}"
    verdicts = lab.query(
        "SELECT count(*) FROM certsync.planned_action WHERE run_id = %s", (old_record["run_id"],)
    )[0][0]
    assert verdicts > 0, "the superseded run kept no plan for the record"
    assert lab.disagreements(live_record["run_id"]) == []
