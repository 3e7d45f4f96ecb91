"""Publishing with a write-ahead audit: every Set-* has an intent row that commits before the request
leaves and one closing row after it, and an intent whose answer was lost is settled by reading the
recipient back before anything else is sent.

- Normal case: intent, request, outcome. No read-back, so no extra request per changed recipient.
- Unknown answer in this process (client timeout, broken connection, gateway error): wait, read the
  recipient back, record a settlement (applied / not applied). Applied counts as published and is
  never sent again; not applied is sent again under a new intent.
- Open intents left by a process that died (kill -9, database gone): the next stage of any run that
  may send (snapshot, publish) settles them first, under the run lock, so no other process can be
  sending them. An open intent of a sibling publish task of the same run is settled only when that
  task's stage lock is free (the task is gone).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

from certsync.exchange.outcomes import (
    ACCEPTED,
    AUTH,
    CONFLICT,
    FINAL_REFUSALS,
    Outcome,
    backoff_s,
    outcome_unknown,
)
from certsync.exchange.recipients import hashes
from certsync.exchange.throttle import ExchangeDown
from certsync.failures import Unavailable
from certsync.store import publishing, runs
from certsync.store.runlock import RunLock

if TYPE_CHECKING:
    from certsync.pipeline import Services

log = logging.getLogger(__name__)


def _read_back(services: Services, intent: publishing.Intent) -> tuple[bool, str]:
    """(applied, what was found): does the recipient hold exactly the intent's certificates?"""
    held = services.exchange.held_certificates(intent.recipient_id, cmdlet=intent.cmdlet)
    if held is None:
        return False, "read back: Exchange has no such recipient"
    user_certificate, user_smime = (hashes(values) for values in held)
    applied = sorted(user_certificate) == sorted(intent.user_certificate) and sorted(user_smime) == sorted(
        intent.user_smime_certificate
    )
    found = f"{len(user_certificate)} userCertificate, {len(user_smime)} userSMIMECertificate values"
    return applied, f"read back: {'holds' if applied else 'does not hold'} the intended values ({found})"


def settle(
    services: Services,
    intent: publishing.Intent,
    *,
    by_run_id: int,
    task_try: int,
    lost: Outcome | None = None,
) -> bool:
    """Read the intent's recipient back and record the settlement; True when the write was applied.
    `lost` is the answer this process got (a timeout, a gateway error) when it is still running;
    without it, the request came from a process that died, and a request still on its way gets the
    client timeout to arrive or fail before the recipient is read."""
    if lost is None:
        grace = services.settings.exchange.timeout_s + 1.0 - intent.age_s
        if grace > 0:
            time.sleep(grace)
    applied, found = _read_back(services, intent)
    why = f"{lost.code or 'no answer'}: {(lost.detail or '')[:500]}; " if lost else "answer lost; "
    with services.engine.begin() as conn:
        publishing.record_settlement(
            conn,
            intent=intent,
            applied=applied,
            by_run_id=by_run_id,
            task_try=task_try,
            detail=why + found,
            status=lost.status if lost else None,
            code=lost.code if lost else None,
        )
        if applied:
            publishing.settle_applied(conn, intent=intent, snapshot_run_ids=tuple({intent.run_id, by_run_id}))
    log.warning(
        "request %s (run %s, %s to %s) settled by read-back: %s",
        intent.client_request_id,
        intent.run_id,
        intent.cmdlet,
        intent.primary_smtp,
        "applied" if applied else "not applied",
    )
    return applied


def settle_open_intents(services: Services, lock: RunLock, *, task_try: int) -> dict[str, int]:
    """Settle every intent nobody closed, except those a live sibling task of this run may still
    be sending. Returns counts of applied / not applied / left to a live task."""
    with services.engine.connect() as conn:
        intents = publishing.open_intents(conn)
    counts = {"applied": 0, "not_applied": 0, "in_flight": 0}
    for intent in intents:
        stage = f"publish:{intent.batch}"
        # Other runs cannot be working now (this run holds the run slot); a batch of this run can.
        guarded = intent.run_id == lock.run_id and intent.batch is not None and stage != lock.stage
        if guarded and not lock.try_stage(stage):
            counts["in_flight"] += 1
            continue
        try:
            applied = settle(services, intent, by_run_id=lock.run_id, task_try=task_try)
        finally:
            if guarded:
                lock.release_stage(stage)
        counts["applied" if applied else "not_applied"] += 1
    if intents:
        log.warning("open intents settled before sending anything: %s", counts)
    return counts


def publish_action(
    services: Services,
    lock: RunLock,
    info: runs.RunInfo,
    action: publishing.PendingAction,
    *,
    task_try: int,
    deadline: float | None = None,
) -> str:
    """Send one action: intent, request, outcome per attempt; returns the action's final state
    ("pending" when the circuit breaker opened before it was done: the next try sends it;
    "deferred" when the run's time box was used up before it started)."""
    if deadline is not None and time.monotonic() >= deadline and not info.dry_run:
        with services.engine.begin() as conn:
            publishing.set_action_state(
                conn, run_id=info.run_id, action_no=action.action_no, state="deferred", reason="time_box"
            )
        return "deferred"
    if info.dry_run:
        with services.engine.begin() as conn:
            publishing.set_action_state(conn, run_id=info.run_id, action_no=action.action_no, state="dry_run")
        return "dry_run"
    with services.engine.connect() as conn:
        blobs = publishing.values_by_hash(conn, [*action.user_certificate, *action.user_smime_certificate])
        done = publishing.attempts_so_far(conn, run_id=info.run_id, recipient_id=action.recipient_id)
    exchange = services.exchange
    last = done + services.settings.exchange.max_attempts
    for attempt in range(done + 1, last + 1):
        if exchange.breaker.open:
            return "pending"
        if _newer_view(services, info, action):
            return "skipped"
        lock.ensure()  # no request without the run lock (a restarted database drops it)
        request_id = uuid.uuid4()
        with services.engine.begin() as conn:
            intent = publishing.record_intent(
                conn, run=info, action=action, attempt=attempt, task_try=task_try, request_id=request_id
            )
        outcome = exchange.set_certificates(
            cmdlet=action.cmdlet,
            identity=action.recipient_id,
            user_certificate=[blobs[h] for h in action.user_certificate],
            user_smime_certificate=[blobs[h] for h in action.user_smime_certificate],
            request_id=request_id,
        )
        if outcome_unknown(outcome):
            _wait(outcome, attempt - done, action, why="answer lost; reading the recipient back")
            if settle(services, intent, by_run_id=info.run_id, task_try=task_try, lost=outcome):
                return "published"
            continue
        state = _record(services, info, action, intent, outcome, task_try)
        if state != "retry":
            return state
        if attempt < last and not exchange.breaker.open:
            _wait(outcome, attempt - done, action, why="retrying")
    if exchange.breaker.open:
        return "pending"
    with services.engine.begin() as conn:
        publishing.set_action_state(
            conn, run_id=info.run_id, action_no=action.action_no, state="failed", reason="out_of_attempts"
        )
    return "failed"


def _wait(outcome: Outcome, retry: int, action: publishing.PendingAction, *, why: str) -> None:
    wait = backoff_s(outcome, retry)
    log.warning(
        "%s to %s: %s (HTTP %s %s); %s in %.1fs",
        action.cmdlet,
        action.primary_smtp,
        outcome.kind,
        outcome.status or "no answer",
        outcome.code,
        why,
        wait,
    )
    time.sleep(wait)


class _SharedLock:
    """The run lock used by several sending threads: its one connection is used by one at a time."""

    def __init__(self, lock: RunLock) -> None:
        self._lock = lock
        self._mutex = threading.Lock()

    def ensure(self) -> None:
        with self._mutex:
            self._lock.ensure()


# Newly valid certificates first, then replacements, then removals: a time-boxed run spends its
# time on what users miss most.
KIND_ORDER = {"add": 0, "replace": 1, "remove": 2}


def publish_batch(
    services: Services,
    lock: RunLock,
    info: runs.RunInfo,
    actions: list[publishing.PendingAction],
    *,
    task_try: int,
) -> dict[str, int]:
    """Send a batch's actions concurrently (the client's adaptive window bounds what is in flight),
    additions first. Raises Unavailable, with counts, when the circuit breaker opened: the actions
    not done stay pending for the task's next try, and nothing waits on a service that is down.
    With a time box, what is left when it is used up is deferred to the next run."""
    shared = _SharedLock(lock)
    actions = sorted(actions, key=lambda a: (KIND_ORDER.get(a.kind, 3), a.action_no))
    deadline = _deadline(services, info)
    workers = max(1, min(services.settings.exchange.max_concurrency, len(actions)))
    counts: dict[str, int] = {}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="publish") as pool:
        futures = [
            pool.submit(publish_action, services, shared, info, a, task_try=task_try, deadline=deadline)  # type: ignore[arg-type]
            for a in actions
        ]
        for future in futures:
            state = future.result()
            counts[state] = counts.get(state, 0) + 1
    breaker = services.exchange.breaker
    if breaker.open:
        left = counts.get("pending", 0)
        raise Unavailable(
            f"{breaker.describe()}; batch stopped after {len(actions) - left} of {len(actions)} actions,"
            f" {left} left pending for the next try"
        ) from ExchangeDown(breaker.describe())
    if counts.get("deferred"):
        _log_deferred(services, counts, time.monotonic() - started)
    return counts


def _deadline(services: Services, info: runs.RunInfo) -> float | None:
    """When this run's time box ends, on this process's monotonic clock: counted from the run's
    first request (so retries and sibling batch tasks share one box), by the database's clock."""
    box = services.settings.publish_time_box_s
    if not box:
        return None
    with services.engine.connect() as conn:
        elapsed = publishing.publishing_for_s(conn, run_id=info.run_id)
    return time.monotonic() + box - elapsed


def _log_deferred(services: Services, counts: dict[str, int], elapsed_s: float) -> None:
    done = counts.get("published", 0)
    pace = done / elapsed_s if elapsed_s > 0 else 0.0
    log.warning(
        "time box of %ds used up: %d actions deferred to the next run (at this batch's pace of %.1f/s,"
        " about %.0f s more)",
        services.settings.publish_time_box_s,
        counts["deferred"],
        pace,
        counts["deferred"] / pace if pace else float("nan"),
    )


def backlog(conn: Connection, *, run_id: int) -> dict[str, float | int] | None:
    """What a time-boxed run left for the next one, and an estimate of how long that takes at this
    run's pace (None when nothing was deferred)."""
    return publishing.backlog(conn, run_id=run_id)


def _newer_view(services: Services, info: runs.RunInfo, action: publishing.PendingAction) -> bool:
    """No stale overwrite: skip (and say why) when a newer run's view is already published."""
    with services.engine.begin() as conn:
        if not publishing.newer_view_published(conn, run=info, recipient_id=action.recipient_id):
            return False
        publishing.set_action_state(
            conn,
            run_id=info.run_id,
            action_no=action.action_no,
            state="skipped",
            reason="newer_run_published",
        )
    return True


def _record(
    services: Services,
    info: runs.RunInfo,
    action: publishing.PendingAction,
    intent: publishing.Intent,
    outcome: Outcome,
    task_try: int,
) -> str:
    """Close the intent with Exchange's answer and move state in one transaction."""
    state = {ACCEPTED: "published", CONFLICT: "conflict"}.get(outcome.kind, "retry")
    if outcome.kind in FINAL_REFUSALS or outcome.kind == AUTH:  # AUTH: refused again after a token refresh
        state = "failed"
    with services.engine.begin() as conn:
        publishing.record_outcome(conn, intent=intent, outcome=outcome, task_try=task_try)
        if state == "published":
            publishing.mark_published(conn, run=info, action=action)
        if state != "retry":
            reason = outcome.code if outcome.kind == ACCEPTED else f"{outcome.kind}:{outcome.code}"
            publishing.set_action_state(
                conn, run_id=info.run_id, action_no=action.action_no, state=state, reason=reason
            )
    return state
