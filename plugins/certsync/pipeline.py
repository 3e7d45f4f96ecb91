"""The stages of one sync run. Each stage is a plain function over (settings, run id) that reads
its input from Postgres and writes its output there, so DAG tasks stay thin, XCom carries only
ids and counts, and any stage can be re-run (retry, clear, backfill) without doubling anything.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from certsync import audit, publisher
from certsync.audit import checkpoints
from certsync.audit import partitions as audit_partitions
from certsync.audit import writer as audit_writer
from certsync.audit.signing import AUDIT_SIGNING_CONN_ID
from certsync.certificates.parallel import Checking, ValidationPool
from certsync.certificates.trust import TrustConfigError
from certsync.config import ConfigError, SyncSettings
from certsync.directory import DirectoryError, DirectoryReader
from certsync.exchange import changes as exchange_changes
from certsync.exchange.auth import AuthError
from certsync.exchange.client import ExchangeClient, ExchangeError
from certsync.failures import RunFailed, Unavailable, short_message, transient_reason
from certsync.heap import cycle_collection_paused
from certsync.plan import AccountPolicy, DeltaScope, Plan, build_plan, delta_users
from certsync.store import db, planning, publishing, retention, runlock, runs, runslot, source, validation
from certsync.store import recipients as recipient_store
from certsync.store.db import DatabaseError

log = logging.getLogger(__name__)
T = TypeVar("T")
SLOT_POLL_S = 2.0  # how often a waiting begin asks for the run slot again


class RemovalThresholdExceeded(RuntimeError):
    """The plan would remove more certificates than allowed; nothing was published."""


@dataclass
class Services:
    """What the stages talk to, built lazily once per process (one msal app, one engine)."""

    settings: SyncSettings

    @property
    def dsn(self) -> str:
        return self.settings.database_dsn

    @cached_property
    def engine(self) -> Engine:
        # Every connection of this engine signs the audit rows it appends (certsync.audit.writer).
        return db.create_engine(self.dsn).execution_options(
            **{audit_writer.SIGNER_OPTION: self.settings.audit_signer}
        )

    @cached_property
    def exchange(self) -> ExchangeClient:
        return ExchangeClient.connect(self.settings.exchange)

    def directory(self) -> DirectoryReader:
        return DirectoryReader(settings=self.settings.directory)

    @contextmanager
    def run_lock(self, run_id: int, stage: str) -> Iterator[runlock.RunLock]:
        """The run lock for one stage of one run, which must hold the run slot (taken by its begin)."""
        with runlock.hold(
            self.engine, run_id=run_id, stage=stage, wait_s=self.settings.run_lock_wait_s
        ) as lock:
            with self.engine.begin() as conn:
                runslot.check(conn, run_id=run_id)
            yield lock


SETTING_ERRORS = (TrustConfigError, DatabaseError, DirectoryError, AuthError, ExchangeError, OSError)


def _checked(setting: str, check: Callable[[], T]) -> T:
    """Run one check; a system that is down or busy is Unavailable (the task retries), anything
    else it raises is a settings error naming `setting` (the task fails at once)."""
    try:
        return check()
    except Exception as exc:
        reason = transient_reason(exc)
        if reason:
            raise Unavailable(f"{setting}: {reason}: {short_message(exc)}") from None
        if isinstance(exc, SETTING_ERRORS):
            raise ConfigError(f"{setting}: {exc}") from None
        raise


def preflight(services: Services) -> str:
    """Check every setting against the real systems before anything is written; returns the
    trust fingerprint. A wrong setting raises a ConfigError that names it; a system that cannot be
    reached raises Unavailable."""
    names = services.settings.names
    trust = _checked(f"variable {names.config_variable!r}", services.settings.trust.load)
    if services.settings.audit_signer is None:
        raise ConfigError(
            f"connection {AUDIT_SIGNING_CONN_ID!r} is not configured: every audit row is signed with its"
            " Ed25519 key (`certsync audit keygen` makes one)"
        )
    _checked(f"connection {names.postgres_conn_id!r}", lambda: db.check(services.dsn))
    _checked(f"connection {names.postgres_conn_id!r}", lambda: db.check_schema(services.engine))
    _checked(f"connection {names.ldap_conn_id!r}", lambda: services.directory().check())
    _checked(f"connection {names.exchange_conn_id!r}", lambda: services.exchange.check())
    return trust.fingerprint


# Leases this process holds on the runs it began (released by finish, or by the process's end):
# while held, no other run's begin takes the run for abandoned.
_held_leases: dict[tuple[str, int], Any] = {}


def _is_live(conn: Any, run: runs.OpenRun, live: Callable[[runs.OpenRun], bool] | None) -> bool:
    return runs.leased(conn, run.run_id) or (live is not None and live(run))


def _close_abandoned(
    conn: Any, *, dag_id: str, airflow_run_id: str, live: Callable[[runs.OpenRun], bool] | None
) -> list[int]:
    """Close as `abandoned` every other run still marked running that no process works on any more."""
    closed = []
    for run in runs.open_runs(conn):
        if (run.dag_id, run.airflow_run_id) == (dag_id, airflow_run_id) or _is_live(conn, run, live):
            continue
        if runs.close_abandoned(conn, run_id=run.run_id):
            log.warning("run %s (%s/%s) was abandoned; closed it", run.run_id, run.dag_id, run.airflow_run_id)
            closed.append(run.run_id)
    return closed


def begin(
    services: Services,
    *,
    dag_id: str,
    airflow_run_id: str,
    logical_date: datetime,
    mode: str,
    dry_run: bool,
    record: runs.RunRecord | None = None,
    live: Callable[[runs.OpenRun], bool] | None = None,
    wait_s: float = 0,
) -> int:
    """Check the settings, close runs whose process died (`live` says which runs without a lease
    are still alive elsewhere, e.g. between two Airflow tasks), register this run and claim the run
    slot for it until its finish. While another live run holds the slot, wait up to `wait_s`
    seconds, then raise RunBusy naming the holder (nothing of this run is kept then)."""
    fingerprint = preflight(services)
    # This month's and next month's audit partitions exist before any row of this run arrives.
    audit_partitions.ensure(services.engine)
    record = record or runs.RunRecord(allow_mass_removal=False)
    deadline, logged = time.monotonic() + wait_s, False
    while True:
        try:
            run_id = _register(
                services,
                dag_id=dag_id,
                airflow_run_id=airflow_run_id,
                logical_date=logical_date,
                mode=mode,
                dry_run=dry_run,
                fingerprint=fingerprint,
                record=record,
                live=live,
            )
            break
        except runslot.RunBusy as busy:
            if time.monotonic() >= deadline and wait_s > 0:
                raise runlock.RunLocked(
                    f"{busy.waiting} refused after waiting {wait_s:.0f}s: {busy.holder} holds the certsync"
                    " run lock; one run at a time works on a database"
                ) from None
            if time.monotonic() >= deadline:
                raise
            if not logged:
                log.warning("%s", busy)
                logged = True
            time.sleep(SLOT_POLL_S)
    _hold_lease(services, run_id)
    log.info(
        "run %s registered for %s/%s (%s, time from %s, dry_run=%s, allow_mass_removal=%s, by %s/%s)",
        run_id,
        dag_id,
        airflow_run_id,
        mode,
        record.date_source,
        dry_run,
        record.allow_mass_removal,
        record.run_type,
        record.triggered_by,
    )
    if record.allow_mass_removal:
        log.warning("run %s may remove more certificates than removal_threshold (allow_mass_removal)", run_id)
    return run_id


def _register(
    services: Services,
    *,
    dag_id: str,
    airflow_run_id: str,
    fingerprint: str,
    record: runs.RunRecord,
    live: Callable[[runs.OpenRun], bool] | None,
    **run: Any,
) -> int:
    """Register the run and claim the run slot in one transaction (RunBusy rolls both back)."""
    with services.engine.begin() as conn:
        holder = runslot.lock(conn)  # first: a begin that waits here for a finish starts after it
        abandoned = _close_abandoned(conn, dag_id=dag_id, airflow_run_id=airflow_run_id, live=live)
        run_id = runs.begin_run(
            conn,
            dag_id=dag_id,
            airflow_run_id=airflow_run_id,
            trust_fingerprint=fingerprint,
            record=record,
            **run,
        )
        if abandoned:
            runs.note_closed_by(conn, run_ids=abandoned, closed_by=run_id)
        runslot.claim(conn, run_id=run_id, waiting=f"{dag_id} / {airflow_run_id}", holder=holder, live=live)
    return run_id


def _hold_lease(services: Services, run_id: int) -> None:
    key = (services.dsn, run_id)  # run ids repeat across databases
    if key not in _held_leases:
        conn = services.engine.connect()
        runs.take_lease(conn, run_id)
        _held_leases[key] = conn


def _drop_lease(services: Services, run_id: int) -> None:
    conn = _held_leases.pop((services.dsn, run_id), None)
    if conn is not None:
        try:
            runs.release_lease(conn, run_id)
        finally:
            conn.close()


def extract(services: Services, *, run_id: int) -> dict[str, Any]:
    """Read the directory (delta from the watermark, or full) into staging, merge it into the
    source view and move the watermark, in one transaction (see certsync.store.source)."""
    started = time.monotonic()
    reader = services.directory()
    with services.run_lock(run_id, "extract"), services.engine.begin() as conn, cycle_collection_paused():
        counts = source.extract(
            conn, reader=reader, run_id=run_id, full_every=services.settings.full_read_every
        )
    log.info(
        "extracted (%s: %s) %d users with %d values (%d unreadable entries skipped, %d gone) in %.1fs",
        counts["mode"],
        counts["why"],
        counts["users"],
        counts["values"],
        counts["skipped"],
        counts["gone"],
        time.monotonic() - started,
    )
    return counts


def read_recipients(services: Services, *, run_id: int, task_try: int = 1) -> dict[str, Any]:
    """Snapshot, for this run, the recipients Exchange Online holds (type, sync state, certificates),
    after settling the requests whose answer a dead process never recorded. A delta run reads only
    the recipients changed since the previous read and merges them into its snapshot
    (certsync.store.recipients); a full read replaces the snapshot whole."""
    exchange = services.settings.exchange
    with services.run_lock(run_id, "read_recipients") as lock, cycle_collection_paused():
        settled = publisher.settle_open_intents(services, lock, task_try=task_try)
        with services.engine.connect() as conn:
            start = recipient_store.choose(
                conn, run_id=run_id, tenant=f"{exchange.base_url}/{exchange.tenant_id}",
                full_every=services.settings.full_read_every,
                overlap=timedelta(minutes=exchange.changed_overlap_minutes), now=datetime.now(UTC),
            )  # fmt: skip
        read = exchange_changes.read(services.exchange, start.plan)
        with services.engine.begin() as conn:
            count = recipient_store.save(conn, run_id=run_id, start=start, read=read)
            planning.purge_old_snapshots(conn)
    log.info(
        "read %d recipients from Exchange Online (%s: %s); the run's snapshot holds %d",
        len(read.recipients), read.mode, read.why, count,
    )  # fmt: skip
    return {
        "recipients": count,
        "read": len(read.recipients),
        "mode": read.mode,
        "settled": settled["applied"] + settled["not_applied"],
    }


def validate(services: Services, *, run_id: int, shard: int = 0, shards: int = 1) -> dict[str, int]:
    """Validate the values of one shard that have no verdict for this trust configuration valid at
    the run's time."""
    with services.run_lock(run_id, f"validate:{shard}"):
        return _validate(services, run_id=run_id, shard=shard, shards=shards)


def _validate(services: Services, *, run_id: int, shard: int, shards: int) -> dict[str, int]:
    with services.engine.connect() as conn:
        info = runs.run_info(conn, run_id)
    saved = refused = 0
    pool = ValidationPool(
        trust=services.settings.trust,
        at=info.logical_date,
        processes=services.settings.validation_processes,
        fingerprint=info.trust_fingerprint,
    )

    # Read, check and save a chunk at a time: memory stays bounded, and a killed try keeps the
    # verdicts it saved (the next one validates only what is still pending). While the workers
    # check one chunk, this process reads the next and saves the one before.
    def save(checking: Checking) -> None:
        nonlocal saved, refused
        rows = checking.result()
        with services.engine.begin() as conn:
            saved += validation.save_rows(
                conn, rows=rows, fingerprint=info.trust_fingerprint, run_id=run_id, at=info.logical_date
            )
        refused += sum(1 for row in rows if not row[2])  # the row's `ok`

    with pool, services.engine.connect() as reading:
        previous: Checking | None = None
        for chunk in validation.pending_chunks(
            reading, fingerprint=info.trust_fingerprint, at=info.logical_date, shard=shard, shards=shards
        ):
            current = pool.submit(chunk, encode=validation.verdict_rows)
            if previous is not None:
                save(previous)
            previous = current
        if previous is not None:
            save(previous)
    log.info("shard %d/%d: validated %d values, %d refused", shard, shards, saved, refused)
    return {"validated": saved, "refused": refused}


def plan(services: Services, *, run_id: int, allow_mass_removal: bool = False) -> list[int]:
    """Compute and save the run's actions; returns the publish batch numbers."""
    settings = services.settings
    policy = AccountPolicy(disabled_accounts=settings.disabled_accounts, left_scope=settings.left_scope)
    with (
        services.run_lock(run_id, "plan"),
        services.engine.begin() as conn,
        cycle_collection_paused(),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="certsync-plan") as beside,
    ):
        planning.use_work_mem(conn, settings.plan_work_mem_mb)
        info = runs.run_info(conn, run_id)
        superseded = _superseded(conn, info)
        published = planning.published_owners(conn)
        base = None if superseded else _delta_base(conn, info, policy)
        scope = None
        if base is not None:
            _refresh_statistics(services.engine)
            scope = _delta_scope(conn, info, base, published)
        planned = scope.users if scope else None
        planning.start_plan(conn, run_id=run_id)
        gone = planning.gone_reasons(conn)
        # The run's snapshot of Exchange is read on a connection of its own while PostgreSQL reads
        # the first part of the users (sent by _started).
        recipients = _beside(
            beside,
            services.engine,
            planning.recipients,
            run_id=run_id,
            only=scope.recipients if scope else None,
        )
        result = Plan()
        users = _started(
            planning.users_to_plan(
                conn,
                run_id=run_id,
                fingerprint=info.trust_fingerprint,
                at=info.logical_date,
                only=planned,
                plan=result,
            )
        )
        build_plan(
            users,
            into=result,
            recipients=recipients.result(),
            published=published,
            policy=policy,
            gone=gone,
            claimed_elsewhere=scope.claimed_elsewhere if scope else (),
        )
        if result.removals() > settings.removal_threshold and not allow_mass_removal and not superseded:
            raise RemovalThresholdExceeded(
                f"plan removes all certificates of {result.removals()} recipients, more than"
                f" removal_threshold={settings.removal_threshold}; re-run with allow_mass_removal to proceed"
            )
        batches = planning.save_plan(
            conn, run_id=run_id, plan=result, batch_size=settings.publish_batch_size, superseded=superseded
        )
        planning.record_scope(
            conn,
            run_id=run_id,
            base=base,
            policy=_policy_text(policy),
            planned=planned,
            contested=result.contested,
        )
    log.info(
        "planned %d actions in %d batches (%s)",
        len(result.actions),
        batches,
        f"delta from run {base.run_id}: {len(planned or ())} users planned again, the others carried over next"
        if base
        else "every user",
    )
    # Never an empty list: Airflow marks a task mapped over nothing `removed`, and a later clear or
    # reprocess of the run does not expand it again, so the batches of a re-plan would never be sent.
    return list(range(max(batches, 1)))


def _refresh_statistics(engine: Engine) -> None:
    """Statistics of the tables earlier stages rewrote (sql/0021), for a delta plan: it looks a few
    rows up in each table. A full plan reads its users by ranges of their key and each verdict by
    its key, which needs no statistics (test_source_merge checks it): it leaves the ANALYZE, about
    a second of a core at 100,000 users, to autovacuum after it, not beside it on the same cores."""
    with engine.begin() as side:  # its own transaction: the statistics are committed at once
        analyzed = planning.refresh_statistics(side)
    if analyzed:
        log.info("analyzed %s, rewritten since their statistics were taken", ", ".join(analyzed))


def _beside(pool: ThreadPoolExecutor, engine: Engine, work: Callable[..., T], **kwargs: Any) -> Future[T]:
    """`work` in `pool`'s thread, on a connection and in a transaction of its own. What it reads is
    what is committed, as a statement of the plan's own (read committed) transaction would see."""

    def run() -> T:
        with engine.begin() as side:
            return work(side, **kwargs)

    return pool.submit(run)


def _started(items: Iterator[T]) -> Iterator[T]:
    """`items` with its first item already taken: a generator that streams a query sends it then."""
    for first in items:
        return itertools.chain((first,), items)
    return items


def carry_over(services: Services, *, run_id: int) -> dict[str, int]:
    """Make a delta plan's record whole: copy the base plan's results of the users it did not plan
    again (planning.carry_over). Publishing does not need them, so it runs beside publish."""
    with services.run_lock(run_id, "carry_over"), services.engine.begin() as conn:
        carried = planning.carry_over(conn, run_id=run_id)
    log.info("carried %d value results and %d actions over", carried.results, carried.actions)
    return {"results": carried.results, "actions": carried.actions}


def _policy_text(policy: AccountPolicy) -> str:
    # With certsync's version: after an upgrade (plan rules may have changed) every user is planned.
    return (
        f"disabled_accounts={policy.disabled_accounts};left_scope={policy.left_scope}"
        f";certsync={importlib.metadata.version('certsync')}"
    )


def _delta_base(conn: Any, info: runs.RunInfo, policy: AccountPolicy) -> planning.DeltaBase | None:
    """The earlier plan a delta plan of this run builds on (planning.delta_base); None: plan every user."""
    return planning.delta_base(
        conn,
        run_id=info.run_id,
        fingerprint=info.trust_fingerprint,
        at=info.logical_date,
        policy=_policy_text(policy),
    )


def _delta_scope(
    conn: Any, info: runs.RunInfo, base: planning.DeltaBase, published: dict[str, Any]
) -> DeltaScope:
    """After a directory read (delta or full: the merge marks the users that changed either way),
    plan only the users whose entry, verdicts, recipient or claim changed since `base`'s plan, or
    whose action there did not reach Exchange (planning.changes_since, plan.delta_users)."""
    changes = planning.changes_since(
        conn, base=base, run_id=info.run_id, fingerprint=info.trust_fingerprint, at=info.logical_date
    )
    return delta_users(
        planning.user_addresses(conn),
        recipients=planning.recipient_addresses(conn, run_id=info.run_id),
        published=published,
        changed_users=changes.users,
        changed_recipients=changes.recipients,
        old_addresses=changes.old_addresses,
    )


def _superseded(conn: Any, info: runs.RunInfo) -> bool:
    """Whether a run with a later logical date already planned or published (the run is marked
    superseded then): an older run never publishes its older view over a newer one."""
    newer = None if info.dry_run else runs.supersede_if_older(conn, info)
    if newer is not None:
        log.warning("run %s is superseded by the newer run %s: it publishes nothing", info.run_id, newer)
    return newer is not None or runs.is_superseded(conn, info.run_id)


def publish(services: Services, *, run_id: int, batch: int, task_try: int = 1) -> dict[str, int]:
    """Send one batch of actions to Exchange Online with a write-ahead audit (see certsync.publisher).
    `task_try` is the task try that sends (Airflow's try number; 1 on the command line)."""
    with services.run_lock(run_id, f"publish:{batch}") as lock:
        publisher.settle_open_intents(services, lock, task_try=task_try)
        with services.engine.begin() as conn:
            info = runs.run_info(conn, run_id)
            if _superseded(conn, info):
                skipped = publishing.skip_batch(conn, run_id=run_id, batch=batch, reason="superseded")
                return {"skipped": skipped} if skipped else {}
            actions = publishing.pending_actions(conn, run_id=run_id, batch=batch)
        counts = publisher.publish_batch(services, lock, info, actions, task_try=task_try)
    log.info("batch %d: %s", batch, counts)
    return counts


def _problems(summary: dict[str, Any]) -> list[str]:
    """Why the run must show failed: actions failed or left pending, or no plan was saved."""
    actions = summary["actions"]
    failed = sum(n for key, n in actions.items() if key.endswith(":failed"))
    pending = sum(n for key, n in actions.items() if key.endswith(":pending"))
    problems = []
    if not summary["run"]["planned"]:
        problems.append("the run stopped before its plan was saved (see the failed task)")
    if failed:
        reasons = ", ".join(f"{k}: {n}" for k, n in summary["failed_by_reason"].items())
        problems.append(f"{failed} actions failed ({reasons})")
    if pending:
        problems.append(f"{pending} actions were never sent (still pending)")
    return problems


def finish(services: Services, *, run_id: int) -> dict[str, Any]:
    """Summarise the run from its rows, close it, and hand out the audit chain head so that a copy
    of it lives outside the database (the task log and XCom). Raises RunFailed, after closing the
    run as failed, when any action failed or stayed pending: a run like that must not look green."""
    # Without the slot check of the other stages: finish closes only this run's own record (a
    # cleared finish of a closed run summarises it again), and frees the slot only if it holds it.
    stage_lock = runlock.hold(
        services.engine, run_id=run_id, stage="finish", wait_s=services.settings.run_lock_wait_s
    )
    with stage_lock, services.engine.begin() as conn:
        runslot.release(conn, run_id=run_id)  # first, as begin locks the slot before any run's row
        # Nothing to copy unless carry_over did not run after the plan (a clear of plan alone
        # re-plans and starts the record over): the summary and the next delta plan need it whole.
        planning.carry_over(conn, run_id=run_id)
        summary = runs.summarize(conn, run_id)
        summary["run"] = runs.run_record(conn, run_id)
        summary["failed_by_reason"] = runs.failed_by_reason(conn, run_id)
        backlog = publisher.backlog(conn, run_id=run_id)
        if backlog:  # a time-boxed run: what is left for the next run, and how long it should take
            summary["backlog"] = backlog
        head = audit.chain_head(conn)
        summary["audit_head"] = str(head) if head else None
        summary["audit_checkpoint"] = _checkpoint(services, conn, run_id=run_id)
        problems = _problems(summary)
        state = "failed" if problems else "succeeded"
        if runs.is_superseded(conn, run_id):  # a newer run's view stands; this run sent nothing
            state, problems = "superseded", []
            summary["superseded_by"] = runs.superseded_by(conn, run_id)
        runs.finish_run(conn, run_id=run_id, state=state, summary=summary)
    _drop_lease(services, run_id)
    log.info("run %s finished; audit chain head %s", run_id, summary["audit_head"])
    with services.engine.begin() as conn:  # after the run is closed: its own rows are never pruned
        retention.prune(conn, keep_days=services.settings.retention_days, now=datetime.now(UTC))
    if problems:
        raise RunFailed(f"run {run_id} failed: {'; '.join(problems)}")
    return summary


def _checkpoint(services: Services, conn: Any, *, run_id: int) -> dict[str, Any] | None:
    """Sign the chain's head as it stands at the end of this run and keep it outside the database:
    appended to the checkpoint file (when configured) and returned for the summary and Asset event."""
    signer = services.settings.audit_signer
    row = conn.execute(
        sa.text(
            "SELECT seq, row_hash, clock_timestamp() AS at FROM certsync.audit_log ORDER BY seq DESC LIMIT 1"
        )
    ).first()
    if signer is None or row is None:
        return None
    checkpoint = checkpoints.sign(
        seq=row.seq, head=bytes(row.row_hash), at=row.at, key=signer.key, run_id=run_id
    )
    if services.settings.audit_checkpoint_dir is not None:
        path = checkpoints.append(services.settings.audit_checkpoint_dir, checkpoint)
        log.info("audit checkpoint %s:%s appended to %s", checkpoint.seq, checkpoint.head.hex(), path)
    return checkpoint.to_json()


def verify_audit(services: Services, *, full: bool = False) -> dict[str, Any]:
    """Verify the audit log after a run (every hash and signature, in Python) against the signed
    checkpoints kept outside the database: the rows since the last signed verification mark, or
    all of them when `full` (or the last full check is older than audit_full_verify_days); fails
    (RunFailed) naming the first bad row."""
    from certsync.audit.selfcheck import AuditBroken, after_run

    signer = services.settings.audit_signer
    if signer is None:
        raise ConfigError(f"connection {AUDIT_SIGNING_CONN_ID!r} is not configured")
    try:
        report = after_run(
            services.engine,
            signer=signer,
            directory=services.settings.audit_checkpoint_dir,
            full=full,
            full_every_days=services.settings.audit_full_verify_days,
        )
    except AuditBroken as exc:
        raise RunFailed(str(exc)) from None
    return {
        "mode": "incremental" if report.resumed else "full",
        "rows": report.rows,
        "head": report.last_seq,
        "checkpoint": report.checkpoint.seq if report.checkpoint else None,
    }


def _os_user() -> str | None:
    """Who ran the command line, for the run's record (None where the OS cannot say)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


def published_count(summary: dict[str, Any]) -> int:
    """How many recipients this run changed in Exchange Online."""
    return sum(n for key, n in summary["actions"].items() if key.endswith(":published"))


def run_all(
    services: Services,
    *,
    dag_id: str,
    airflow_run_id: str,
    logical_date: datetime,
    dry_run: bool = False,
    allow_mass_removal: bool = False,
    mode: str = "delta",
) -> dict[str, Any]:
    """Every stage once, in this process: what the DAG does, without a scheduler. `mode` "delta"
    reads what changed since the watermark (a full read when there is none usable)."""
    run_id = begin(
        services,
        dag_id=dag_id,
        airflow_run_id=airflow_run_id,
        logical_date=logical_date,
        mode=mode,
        dry_run=dry_run,
        record=runs.RunRecord(run_type="cli", triggered_by=_os_user(), allow_mass_removal=allow_mass_removal),
        wait_s=services.settings.run_lock_wait_s,
    )
    # The whole run holds the run lock (and its `run` stage key: the same run key started twice
    # waits), so no other run's stage slips in between this run's stages.
    try:
        with services.run_lock(run_id, "run"):
            extract(services, run_id=run_id)
            read_recipients(services, run_id=run_id)
            validate(services, run_id=run_id)
            batches = plan(services, run_id=run_id, allow_mass_removal=allow_mass_removal)
            carry_over(services, run_id=run_id)
            for batch in batches:
                publish(services, run_id=run_id, batch=batch)
            return finish(services, run_id=run_id)
    except BaseException:
        # A stage stopped the run: nothing works on it any more, so the next run closes it as
        # abandoned and takes the run slot over (this process may live on, e.g. as a library).
        _drop_lease(services, run_id)
        raise
