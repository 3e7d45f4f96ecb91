"""A plain `airflow dags trigger certsync`: Airflow 3 gives a manual run no logical date, and the run
must work and be recorded, dated by when it was queued."""

from __future__ import annotations

import json

import pytest

from tests.scheduler.harness import SchedulerLab, parse_time

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 180.0


def test_manual_trigger_without_logical_date_completes_and_is_recorded(lab: SchedulerLab) -> None:
    output = lab.airflow("dags", "trigger", "certsync", "--output", "json")
    run = json.loads(next(line for line in output.splitlines() if line.startswith("[")))[0]
    assert run["logical_date"] is None, run
    run_id = run["dag_run_id"]
    state = lab.wait_for_run(run_id, timeout=RUN_TIMEOUT_S)
    assert state == "success", lab.describe_tasks(run_id)
    record = lab.sync_run(run_id)
    assert record is not None, f"certsync recorded no run for {run_id}"
    assert record["state"] == "succeeded", record
    # Without a logical date the run is dated when it was due: its run_after.
    assert record["logical_date"] == parse_time(lab.dag_run(run_id)["run_after"]), record
