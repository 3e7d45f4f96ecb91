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

Cost: a batch reads what its actions need once (values, attempts so far, newer views), and its
sending threads share one database session whose commits take every thread's queued writes at
once (a group commit): the audit chain's lock is held from the append to the commit, and each
commit waits for the disk. A request's closing rows ride with its thread's next intent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from certsync.audit import writer as audit_writer
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
from certsync.store import db, publishing, runs
from certsync.store.runlock import RunLock

if TYPE_CHECKING:
    from certsync.pipeline import Services

log = logging.getLogger(__name__)
T = TypeVar("T")


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
) -> bool | None:
    """Read the intent's recipient back and record the settlement; True when the write was applied,
    None when another task settled the intent meanwhile (two cleared batches can both list it open).
    `lost` is the answer this process got (a timeout, a gateway error) when it is still running;
    without it, the request came from a process that died, and a request still on its way gets the
    client timeout to arrive or fail before the recipient is read."""
    if lost is None:
        grace = services.settings.exchange.timeout_s + 1.0 - intent.age_s
        if grace > 0:
            time.sleep(grace)
    applied, found = _read_back(services, intent)
    why = f"{lost.code or 'no answer'}: {(lost.detail or '')[:500]}; " if lost else "answer lost; "
    try:
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
                publishing.settle_applied(
                    conn, intent=intent, snapshot_run_ids=tuple({intent.run_id, by_run_id})
                )
    except sa.exc.IntegrityError as exc:
        if not publishing.closed_meanwhile(exc):
            raise
        log.warning(
            "request %s (run %s) was settled by another task meanwhile",
            intent.client_request_id,
            intent.run_id,
        )
        return None
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
    be sending. Returns counts of applied / not applied / left to a live task / settled by another
    task meanwhile."""
    with services.engine.connect() as conn:
        intents = publishing.open_intents(conn)
    counts = {"applied": 0, "not_applied": 0, "in_flight": 0, "settled_elsewhere": 0}
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
        counts["settled_elsewhere" if applied is None else "applied" if applied else "not_applied"] += 1
    if intents:
        log.warning("open intents settled before sending anything: %s", counts)
    return counts


@dataclass(frozen=True, kw_only=True)
class _Lookups:
    """What every action of a batch needs from the database, read once under the run lock. The run
    slot keeps every other run out until the batch ends, so none of it can change meanwhile."""

    blobs: dict[bytes, bytes]  # value by SHA-256
    attempts: dict[str, int]  # requests this run already sent, by recipient
    newer: set[str]  # recipients a newer run's view covers: never overwritten


def _lookups(services: Services, info: runs.RunInfo, actions: list[publishing.PendingAction]) -> _Lookups:
    hashes = sorted({h for a in actions for h in (*a.user_certificate, *a.user_smime_certificate)})
    ids = sorted({a.recipient_id for a in actions})
    with services.engine.connect() as conn:
        return _Lookups(
            blobs=publishing.values_by_hash(conn, hashes),
            attempts=publishing.attempts_so_far(conn, run_id=info.run_id, recipient_ids=ids),
            newer=publishing.newer_views(conn, run=info, recipient_ids=ids),
        )


class _Unit:
    """One sending thread's writes, waiting for the group commit that takes them."""

    def __init__(self, work: Callable[[Connection], object]) -> None:
        self.work = work
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False


class _GroupCommit:
    """The batch's one database session for its writes, shared by the sending threads: whoever
    finds the session free commits every thread's writes queued meanwhile in one transaction.
    Each audit append holds the chain's lock until its commit, and the commit waits for the WAL
    to reach the disk (several ms): one commit per request would cap publishing at a few dozen
    requests a second however many threads send. A failing transaction fails every write of its
    group; nothing of it is kept, and the threads stop (intents it held are settled by read-back)."""

    def __init__(self, conn: Connection, *, ensure: Callable[[], None]) -> None:
        self._conn = conn
        self._ensure = ensure
        self._queue: list[_Unit] = []
        self._queued = threading.Lock()
        self._committing = threading.Lock()

    def run(self, work: Callable[[Connection], T]) -> T:
        unit = _Unit(work)
        with self._queued:
            self._queue.append(unit)
        with self._committing:
            if not unit.done:  # no other thread committed it meanwhile: commit the queue
                with self._queued:
                    group, self._queue = self._queue, []
                self._commit(group)
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]

    def _commit(self, group: list[_Unit]) -> None:
        try:
            self._ensure()  # no request without the run lock (a restarted database drops it)
            with self._conn.begin(), audit_writer.together(self._conn), db.held(self._conn):
                for unit in group:
                    unit.result = unit.work(self._conn)
        except BaseException as exc:
            for unit in group:
                unit.error = exc
        finally:
            for unit in group:
                unit.done = True


class _Sender:
    """One sending thread's writes. The closing writes of a request (its outcome row and state)
    are held back and committed with this thread's next write, usually the next request's intent:
    one write to wait for per request instead of two. Nothing is sent before its intent commits,
    and what was held back is committed before this thread waits, settles or ends; a process that
    dies in between leaves an open intent, which the next stage settles by reading back."""

    def __init__(self, group: _GroupCommit) -> None:
        self._group = group
        self._closing: list[Callable[[Connection], None]] = []

    def write(self, work: Callable[[Connection], T]) -> T:
        """Commit `work`, after the closing writes held back, and return its result."""
        closing, self._closing = self._closing, []

        def both(conn: Connection) -> T:
            for close in closing:
                close(conn)
            return work(conn)

        return self._group.run(both)

    def hold(self, close: Callable[[Connection], None]) -> None:
        self._closing.append(close)

    def flush(self) -> None:
        if self._closing:
            self.write(lambda _conn: None)


def publish_action(
    services: Services,
    info: runs.RunInfo,
    action: publishing.PendingAction,
    *,
    task_try: int,
    lookups: _Lookups,
    sender: _Sender,
) -> str:
    """Send one action: intent, request, outcome per attempt; returns the action's final state
    ("pending" when the circuit breaker opened before it was done: the next try sends it)."""
    if info.dry_run:
        _set_state(sender, info, action, state="dry_run")
        return "dry_run"
    blobs = lookups.blobs
    done = lookups.attempts.get(action.recipient_id, 0)
    exchange = services.exchange
    last = done + services.settings.exchange.max_attempts
    for attempt in range(done + 1, last + 1):
        if exchange.breaker.open:
            return "pending"
        if action.recipient_id in lookups.newer:
            # No stale overwrite: skip (and say why) when a newer run's view is already published.
            _set_state(sender, info, action, state="skipped", reason="newer_run_published")
            return "skipped"
        request_id = uuid.uuid4()
        intent = sender.write(
            lambda conn, attempt=attempt, request_id=request_id: publishing.record_intent(
                conn, run=info, action=action, attempt=attempt, task_try=task_try, request_id=request_id
            )
        )
        outcome = exchange.set_certificates(
            cmdlet=action.cmdlet,
            identity=action.recipient_id,
            user_certificate=[blobs[h] for h in action.user_certificate],
            user_smime_certificate=[blobs[h] for h in action.user_smime_certificate],
            request_id=request_id,
        )
        if outcome_unknown(outcome):
            sender.flush()
            _wait(outcome, attempt - done, action, why="answer lost; reading the recipient back")
            if settle(services, intent, by_run_id=info.run_id, task_try=task_try, lost=outcome):
                return "published"
            continue
        state = _record(sender, info, action, intent, outcome, task_try)
        if state != "retry":
            return state
        if attempt < last and not exchange.breaker.open:
            sender.flush()
            _wait(outcome, attempt - done, action, why="retrying")
    if exchange.breaker.open:
        return "pending"
    _set_state(sender, info, action, state="failed", reason="out_of_attempts")
    return "failed"


def _set_state(
    sender: _Sender,
    info: runs.RunInfo,
    action: publishing.PendingAction,
    *,
    state: str,
    reason: str | None = None,
) -> None:
    sender.write(
        lambda conn: publishing.set_action_state(
            conn, run_id=info.run_id, action_no=action.action_no, state=state, reason=reason
        )
    )


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
    box_left = None if info.dry_run else _box_left(services, info)
    if actions and box_left is not None and box_left <= 0:
        # The box ended before this batch began: no lookups, one statement defers it all.
        return _defer(services, info, actions, started=time.monotonic())
    lookups = _lookups(services, info, actions) if actions else _Lookups(blobs={}, attempts={}, newer=set())
    deadline = None if box_left is None else time.monotonic() + box_left
    todo = iter(actions)
    taking = threading.Lock()
    stop = threading.Event()  # a thread failed, or the time box ended: no thread takes a new action

    def take() -> publishing.PendingAction | None:
        with taking:
            if deadline is not None and time.monotonic() >= deadline:
                stop.set()
            return None if stop.is_set() else next(todo, None)

    def send(group: _GroupCommit) -> Counter[str]:
        done: Counter[str] = Counter()
        sender = _Sender(group)
        try:
            while (action := take()) is not None:
                state = publish_action(
                    services, info, action, task_try=task_try, lookups=lookups, sender=sender
                )
                done[state] += 1
            sender.flush()
        except BaseException:
            stop.set()
            _flush_quietly(sender)
            raise
        return done

    # Twice the client's window: threads commit their intents while others' requests are in flight
    # (the window still bounds what is sent at once). Only the window's size with a time box (no
    # intent committed before the box ends waits long for its turn) or a window of one (one
    # request's life at a time: intent, request, outcome).
    window = services.settings.exchange.max_concurrency
    threads = window if deadline is not None or window == 1 else 2 * window
    workers = max(1, min(threads, len(actions)))
    counts: Counter[str] = Counter()
    started = time.monotonic()
    with services.engine.connect() as conn, ThreadPoolExecutor(workers, thread_name_prefix="publish") as pool:
        group = _GroupCommit(conn, ensure=shared.ensure)
        for future in [pool.submit(send, group) for _ in range(workers)]:
            counts.update(future.result())
    breaker = services.exchange.breaker
    if breaker.open:
        left = counts.get("pending", 0)
        raise Unavailable(
            f"{breaker.describe()}; batch stopped after {len(actions) - left} of {len(actions)} actions,"
            f" {left} left pending for the next try"
        ) from ExchangeDown(breaker.describe())
    if rest := list(todo):
        counts.update(_defer(services, info, rest, started=started, done=counts))
    return dict(counts)


def _defer(
    services: Services,
    info: runs.RunInfo,
    actions: list[publishing.PendingAction],
    *,
    started: float,
    done: Counter[str] | None = None,
) -> dict[str, int]:
    """Defer the actions the time box left unsent to the next run, in one statement (a box that ends
    early in a large plan leaves thousands)."""
    with services.engine.begin() as conn:
        deferred = publishing.defer_actions(
            conn, run_id=info.run_id, action_nos=[a.action_no for a in actions]
        )
    counts = {"deferred": deferred}
    _log_deferred(services, {**(done or {}), **counts}, time.monotonic() - started)
    return counts


def _flush_quietly(sender: _Sender) -> None:
    """Commit what a failing thread held back, if the database still takes it; an intent left open
    is settled by reading back."""
    try:
        sender.flush()
    except Exception:  # the thread's own error is the one to raise
        log.warning("could not record the outcome of this thread's last request; the next run settles it")


def _box_left(services: Services, info: runs.RunInfo) -> float | None:
    """Seconds left of this run's time box (None: no box), counted from the run's first request by
    the database's clock, so retries and sibling batch tasks share one box."""
    box = services.settings.publish_time_box_s
    if not box:
        return None
    with services.engine.connect() as conn:
        elapsed = publishing.publishing_for_s(conn, run_id=info.run_id)
    return box - elapsed


def _log_deferred(services: Services, counts: dict[str, int], elapsed_s: float) -> None:
    done = counts.get("published", 0)
    if not done:  # the box ended before this batch sent anything: no pace of its own to tell
        log.warning("time box of %ds used up: %d actions deferred to the next run", services.settings.publish_time_box_s, counts["deferred"])  # fmt: skip
        return
    pace = done / elapsed_s if elapsed_s > 0 else float("inf")
    log.warning(
        "time box of %ds used up: %d actions deferred to the next run (at this batch's pace of %.1f/s,"
        " about %.0f s more)",
        services.settings.publish_time_box_s,
        counts["deferred"],
        pace,
        counts["deferred"] / pace,
    )


def backlog(conn: Connection, *, run_id: int) -> dict[str, float | int] | None:
    """What a time-boxed run left for the next one, and an estimate of how long that takes at this
    run's pace (None when nothing was deferred)."""
    return publishing.backlog(conn, run_id=run_id)


def _record(
    sender: _Sender,
    info: runs.RunInfo,
    action: publishing.PendingAction,
    intent: publishing.Intent,
    outcome: Outcome,
    task_try: int,
) -> str:
    """Close the intent with Exchange's answer and move state, in one transaction that the sender
    commits with its next one (the state is decided here)."""
    state = {ACCEPTED: "published", CONFLICT: "conflict"}.get(outcome.kind, "retry")
    if outcome.kind in FINAL_REFUSALS or outcome.kind == AUTH:  # AUTH: refused again after a token refresh
        state = "failed"

    def close(conn: Connection) -> None:
        # State first, the audit row last: the chain's lock is held from the append to the commit.
        reason = outcome.code if outcome.kind == ACCEPTED else f"{outcome.kind}:{outcome.code}"
        if state == "published":
            publishing.record_published(conn, run=info, action=action, reason=reason)
        elif state != "retry":
            publishing.set_action_state(
                conn, run_id=info.run_id, action_no=action.action_no, state=state, reason=reason
            )
        publishing.record_outcome(conn, intent=intent, outcome=outcome, task_try=task_try)

    sender.hold(close)
    return state
