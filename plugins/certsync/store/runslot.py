"""The run slot: one run at a time, from a run's begin to its finish (certsync.run_slot, one row).

A run's begin claims the slot in the transaction that registers it; its finish releases it in the
transaction that closes it. A run finds the slot free when nobody holds it, when it holds it already
(a retried or cleared run keeps it), or when the holder is closed or dead (no live lease, and
nothing else, such as Airflow, vouches for it). Otherwise begin is refused with RunBusy, which
names the holder: the command line waits and tries again, the DAG reschedules its begin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.store import runs
from certsync.store.runlock import RunLocked


class RunBusy(RunLocked):
    """Another run holds the run slot; `holder` names it for the log and the refusal."""

    def __init__(self, *, waiting: str, holder: str) -> None:
        super().__init__(f"{waiting} waits for {holder} to finish: one certsync run at a time")
        self.waiting = waiting
        self.holder = holder


@dataclass(frozen=True, kw_only=True)
class Holder:
    run_id: int
    dag_id: str
    airflow_run_id: str
    closed: bool

    def describe(self) -> str:
        return f"run {self.run_id} ({self.dag_id} / {self.airflow_run_id})"


def lock(conn: Connection) -> Holder | None:
    """Lock the slot row for this transaction and return its holder (None when free). Run it as
    the transaction's first statement: a begin that waited here for a finish then starts after it."""
    held = conn.execute(sa.text("SELECT run_id FROM certsync.run_slot FOR UPDATE")).scalar()
    if held is None:
        return None
    # A statement of its own: after waiting for the lock, its snapshot sees the holder's row that
    # the transaction we waited for registered (a join in the locking statement would not).
    row = conn.execute(
        sa.text(
            "SELECT run_id, dag_id, airflow_run_id,"
            " (finished_at IS NOT NULL OR state IN ('succeeded', 'failed', 'abandoned')) AS closed"
            " FROM certsync.sync_run WHERE run_id = :r"
        ),
        {"r": held},
    ).one()
    return Holder(**row._mapping)


def claim(
    conn: Connection,
    *,
    run_id: int,
    waiting: str,
    holder: Holder | None,
    live: Callable[[runs.OpenRun], bool] | None,
) -> None:
    """Give the slot (locked by `lock`) to `run_id`, or raise RunBusy when a live run holds it
    (`waiting` names the claiming run in the refusal)."""
    if holder is not None and holder.run_id != run_id and not holder.closed:
        other = runs.OpenRun(run_id=holder.run_id, dag_id=holder.dag_id, airflow_run_id=holder.airflow_run_id)
        if runs.leased(conn, holder.run_id) or (live is not None and live(other)):
            raise RunBusy(waiting=waiting, holder=holder.describe())
    conn.execute(
        sa.text(
            "UPDATE certsync.run_slot SET run_id = :r, claimed_at = now() WHERE run_id IS DISTINCT FROM :r"
        ),
        {"r": run_id},
    )


def release(conn: Connection, *, run_id: int) -> None:
    """Free the slot if `run_id` holds it (a run closed after it lost the slot releases nothing)."""
    conn.execute(
        sa.text("UPDATE certsync.run_slot SET run_id = NULL, claimed_at = NULL WHERE run_id = :r"),
        {"r": run_id},
    )


def check(conn: Connection, *, run_id: int) -> None:
    """Let a stage of `run_id` work: it holds the slot, or takes it when free or held by a closed
    run (a cleared task of a finished run). Refused while another open run holds it (this run was
    closed as abandoned and another took over, or its begin never won the slot)."""
    holder = lock(conn)
    if holder is None or holder.closed or holder.run_id == run_id:
        claim(conn, run_id=run_id, waiting=f"run {run_id}", holder=None, live=None)
        return
    raise RunLocked(
        f"run {run_id} does not hold the certsync run slot, {holder.describe()} does: this stage is"
        " refused (run it again from begin)"
    )
