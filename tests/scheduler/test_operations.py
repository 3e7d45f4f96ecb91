"""The certsync DAG operated through a real Airflow scheduler as operators do: manual triggers with and
without a logical date, a dry run, clearing a whole run, and a worker killed in the middle of publish.

The tests share one Airflow and one lab (see conftest.py). A first run publishes the tenant's
initial state (synced_lab), and each test changes a few users in the directory so that its run has
something to publish. The scheduler creates no runs of its own (use_job_schedule is
off): every run here is one a test made.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.scheduler.harness import SchedulerLab, now

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 180.0


def test_dry_run_with_a_logical_date_publishes_nothing(synced_lab: SchedulerLab) -> None:
    lab = synced_lab
    removed = lab.drop_certificates(2)
    try:
        since = len(lab.requests())
        at = now()
        run_id = lab.trigger(logical_date=at, conf={"dry_run": True})
        assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)
        assert lab.writes(since) == [], "a dry run sent Set-* requests"
        record = lab.sync_run(run_id)
        assert record is not None and record["dry_run"] and record["logical_date"] == at, record
        held_back = lab.query(
            "SELECT count(*) FROM certsync.planned_action WHERE run_id = %s AND state = 'dry_run'",
            (record["run_id"],),
        )[0][0]
        assert held_back >= 2, f"the dry run planned {held_back} changes for 2 changed users"
    finally:
        lab.restore_certificates(removed)


def _published_actions(lab: SchedulerLab, sync_run_id: int) -> list[tuple]:
    return lab.query(
        "SELECT action_no, recipient_id FROM certsync.planned_action"
        " WHERE run_id = %s AND state = 'published' ORDER BY action_no",
        (sync_run_id,),
    )


def test_clearing_a_successful_run_changes_nothing_twice(synced_lab: SchedulerLab) -> None:
    lab = synced_lab
    lab.drop_certificates(2)
    since = len(lab.requests())
    at = now()
    run_id = lab.trigger(logical_date=at)
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)
    first = lab.writes(since)
    assert len(first) >= 2, f"the run sent {len(first)} Set-* for 2 changed users"
    record = lab.sync_run(run_id)
    assert record is not None
    audit = lab.query("SELECT seq, phase, outcome FROM certsync.audit_log WHERE run_id = %s ORDER BY seq",
                      (record["run_id"],))  # fmt: skip
    published = _published_actions(lab, record["run_id"])
    assert len(published) >= 2, f"the run published {published} for 2 changed users"

    mid = len(lab.requests())
    lab.clear_tasks(at)
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)
    tries = {t["task_id"]: t["try_number"] for t in lab.task_instances(run_id)}
    assert tries["begin"] >= 2 and tries["finish"] >= 2, f"the clear did not re-run the run: {tries}"
    again = lab.writes(mid)
    assert again == [], f"the cleared run sent {len(again)} Set-* again: {[w['identity'] for w in again]}"
    after = lab.query("SELECT seq, phase, outcome FROM certsync.audit_log WHERE run_id = %s ORDER BY seq",
                      (record["run_id"],))  # fmt: skip
    assert after == audit, "the cleared run wrote audit rows for changes it had already made"
    assert _published_actions(lab, record["run_id"]) == published, "the clear lost published actions"
    assert lab.sync_run(run_id)["state"] == "succeeded"
    assert lab.disagreements(record["run_id"]) == []


def _publish_with_a_request_in_flight(lab: SchedulerLab, run_id: str, timeout: float = 60.0) -> dict:
    """The running publish task instance that has committed an intent whose Set-* is not answered yet.

    Each mapped publish sends its batch concurrently, so a batch can be finished by the time its
    first answer shows in the emulator's log; an open intent under slow writes is still in flight.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = lab.sync_run(run_id)
        batches = lab.query(
            "SELECT p.batch FROM certsync.audit_log i JOIN certsync.planned_action p"
            " ON p.run_id = i.run_id AND p.action_no = i.action_no"
            " WHERE i.run_id = %s AND i.phase = 'intent'"
            " AND NOT EXISTS (SELECT 1 FROM certsync.audit_log c WHERE c.intent_seq = i.seq)",
            (record["run_id"] if record else -1,),
        )
        running = {
            t["map_index"]: t
            for t in lab.task_instances(run_id)
            if t["task_id"] == "publish" and t["state"] == "running"
        }
        for (batch,) in batches:
            if batch in running:
                return running[batch]
        time.sleep(0.2)
    raise AssertionError(f"no publish had a request in flight: {lab.describe_tasks(run_id)}")


def _wait_for_loss(lab: SchedulerLab, run_id: str, killed: dict[str, Any], timeout: float = 60.0) -> str:
    """The state the scheduler gives the killed try (each try has its own task instance id)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ti = next(
            t
            for t in lab.task_instances(run_id)
            if t["task_id"] == "publish" and t["map_index"] == killed["map_index"]
        )
        if ti["state"] in {"up_for_retry", "failed"}:
            return str(ti["state"])
        time.sleep(0.5)
    raise AssertionError(
        f"the killed publish[{killed['map_index']}] was never failed: {lab.describe_tasks(run_id)}"
    )


def test_worker_killed_during_publish_then_cleared_publishes_every_change_once(
    synced_lab: SchedulerLab,
) -> None:
    lab = synced_lab
    lab.drop_certificates(6)
    since = len(lab.requests())
    # Slow writes keep a request in flight long enough to kill its publish after the intent committed.
    lab.set_emulator(latency_ms=4000)
    at = now()
    run_id = lab.trigger(logical_date=at)
    lab.wait_for_task(run_id, "publish", {"running"}, timeout=RUN_TIMEOUT_S)
    publish = _publish_with_a_request_in_flight(lab, run_id)
    lab.kill_task_process(publish["id"])
    _wait_for_loss(lab, run_id, publish)
    lab.reset_emulator()
    # The DAG waits minutes before a retry; an operator clears the task instead.
    lab.clear_tasks(at, task_regex="publish")
    assert lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S) == "success", lab.describe_tasks(run_id)

    writes = lab.writes(since)
    assert len(writes) >= 6, f"{len(writes)} Set-* for 6 changed users"
    assert lab.unaudited(writes) == []
    accepted = Counter(w["identity"] for w in writes if w["status"] == 200)
    assert [i for i, n in accepted.items() if n > 1] == [], f"changes sent twice: {accepted}"
    record = lab.sync_run(run_id)
    assert record is not None and record["state"] == "succeeded", record
    assert lab.disagreements(record["run_id"]) == []
