"""A backfill over past hours through the real scheduler: the runs it creates start together (a
backfill ignores max_active_runs) but work one at a time, in the order they win the run slot. The
first publishes what the tenant lacks; a later one finds nothing left to change, or, older than a
run that already planned, is superseded (its validation recorded, nothing published); Exchange ends
up holding the newest run's selection.

This module sorts first in its package on purpose: a run older than one that already planned is
superseded and publishes nothing, so the backfill over the past must come before the tests that run
at the present time in the same session.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from tests.scheduler.harness import SchedulerLab, now, parse_time

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 360.0


@pytest.fixture(scope="module")
def window() -> tuple[datetime, datetime]:
    """The first and last of three past hourly intervals (fixed once: an hour may turn mid-module)."""
    hour = now().replace(minute=0, second=0)
    return hour - timedelta(hours=3), hour - timedelta(hours=1)


def _backfill_records(lab: SchedulerLab) -> list[dict[str, Any]]:
    runs = lab.dag_runs(run_type="backfill")
    for run in runs:
        state = lab.wait_for_run(run["dag_run_id"], timeout=RUN_TIMEOUT_S)
        assert state == "success", f"{run['dag_run_id']}: {lab.describe_tasks(run['dag_run_id'])}"
    records = [lab.sync_run(r["dag_run_id"]) for r in runs]
    assert all(records), f"a backfill run left no certsync record: {records}"
    return [r for r in records if r is not None]


def test_backfill_over_three_hours_runs_one_at_a_time_and_publishes_once(
    lab: SchedulerLab, window: tuple[datetime, datetime]
) -> None:
    first, last = window
    since = len(lab.requests())
    lab.backfill(from_date=first, to_date=last, reprocess="none")
    dates = sorted(parse_time(r["logical_date"]) for r in lab.dag_runs(run_type="backfill"))
    assert dates == [first, first + timedelta(hours=1), last], dates
    records = _backfill_records(lab)
    spans = sorted((r["started_at"], r["finished_at"], r["run_id"]) for r in records)
    assert all(end is not None for _start, end, _id in spans), f"a run was never closed: {spans}"
    for (_s, end, earlier), (start, _e, later) in pairwise(spans):
        assert end <= start, f"certsync runs {earlier} and {later} overlapped: {end} > {start}"

    writes = lab.writes(since)
    assert writes, "the backfill published nothing, yet the tenant started without the valid certificates"
    assert lab.unaudited(writes) == []
    publishers = {run for rows in lab.audit_of(writes).values() for _phase, _outcome, run in rows}
    assert len(publishers) == 1, f"more than one backfill run wrote to Exchange: runs {sorted(publishers)}"
    repeated = [i for i, n in Counter(w["identity"] for w in writes).items() if n > 1]
    assert repeated == [], f"recipients written more than once: {repeated}"
    newest = max(records, key=lambda r: r["logical_date"])
    assert lab.disagreements(newest["run_id"]) == []


def test_reprocessing_the_completed_backfill_reruns_it_and_changes_nothing(
    lab: SchedulerLab, window: tuple[datetime, datetime]
) -> None:
    first, last = window
    lab.wait_for_backfills()
    since = len(lab.requests())
    lab.backfill(from_date=first, to_date=last, reprocess="completed")
    records = _backfill_records(lab)
    assert len(records) == 3, records
    tries = {
        r["dag_run_id"]: _try_of(lab, r["dag_run_id"], "begin") for r in lab.dag_runs(run_type="backfill")
    }
    assert all(n >= 2 for n in tries.values()), f"the reprocess did not re-run every run: {tries}"
    again = lab.writes(since)
    assert again == [], f"reprocessing sent {len(again)} Set-* again: {[w['identity'] for w in again]}"
    pending = lab.query(
        "SELECT run_id, action_no FROM certsync.planned_action WHERE run_id = ANY(%s) AND state = 'pending'",
        ([r["run_id"] for r in records],),
    )
    assert pending == [], f"green runs left actions pending: {pending}"
    newest = max(records, key=lambda r: r["logical_date"])
    assert lab.disagreements(newest["run_id"]) == []


def _try_of(lab: SchedulerLab, run_id: str, task_id: str) -> int:
    return next(int(t["try_number"]) for t in lab.task_instances(run_id) if t["task_id"] == task_id)
