"""Where the pipeline meets Airflow: settings from Airflow connections and variables, and the
per-process services the DAG's tasks share."""

from __future__ import annotations

import difflib
import importlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from airflow.sdk import BaseHook, BaseNotifier, Variable
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowNotFoundException,
    AirflowRescheduleException,
    AirflowRuntimeError,
)
from jinja2.sandbox import SandboxedEnvironment

from certsync import pipeline
from certsync.airflow.hooks import certsync_connection
from certsync.certificates.trust import TrustConfigError
from certsync.config import (
    EXCHANGE_CONN_ID,
    LDAP_CONN_ID,
    POSTGRES_CONN_ID,
    ConfigError,
    Connection,
    load_settings,
)
from certsync.failures import RunFailed, Unavailable, short_message, transient_reason
from certsync.pipeline import RemovalThresholdExceeded, Services
from certsync.store import runs
from certsync.store.runslot import RunBusy

T = TypeVar("T")
log = logging.getLogger(__name__)
DEFAULT_MESSAGE = "certsync: DAG run {{ dag_run.run_id }} of {{ dag.dag_id }} failed ({{ reason }})"


class AirflowSource:
    """Connections and variables through Airflow's own lookup (secrets backends, env vars, DB)."""

    def connection(self, conn_id: str) -> Connection | None:
        try:
            conn = BaseHook.get_connection(conn_id)
        except (AirflowNotFoundException, AirflowRuntimeError):
            return None
        return certsync_connection(conn, conn_id=conn_id)

    def variable(self, key: str) -> str | None:
        return Variable.get(key, default=None)


@cache
def _services_for(ldap_conn_id: str, exchange_conn_id: str, postgres_conn_id: str) -> Services:
    settings = load_settings(
        AirflowSource(),
        ldap_conn_id=ldap_conn_id,
        exchange_conn_id=exchange_conn_id,
        postgres_conn_id=postgres_conn_id,
    )
    return Services(settings=settings)


def services(
    *,
    ldap_conn_id: str = LDAP_CONN_ID,
    exchange_conn_id: str = EXCHANGE_CONN_ID,
    postgres_conn_id: str = POSTGRES_CONN_ID,
) -> Services:
    """One set of clients per worker process and set of connection ids (one msal application,
    one connection pool each)."""
    return _services_for(ldap_conn_id, exchange_conn_id, postgres_conn_id)


def run_stage(stage: Callable[..., T], *, conn_ids: Mapping[str, str] | None = None, **kwargs: Any) -> T:
    """Run one pipeline stage with the services for `conn_ids` (the DAG's connection params;
    certsync_* when not given), holding the run's lease while it works.

    Bad settings, a tripped removal guard and a failed run fail the task at once: retrying cannot
    fix them, and a person must look. A system that is down or busy (Postgres, the DC, Exchange,
    the token endpoint) raises Unavailable with one clear line, and Airflow retries with backoff."""
    name = getattr(stage, "__name__", "stage")
    try:
        found = services(**(conn_ids or {}))
        with _lease(found, kwargs.get("run_id")):
            return stage(found, **kwargs)
    except (ConfigError, TrustConfigError, RemovalThresholdExceeded, RunFailed) as exc:
        raise AirflowFailException(str(exc)) from None
    except Unavailable as exc:
        log.warning("%s: %s; the task is retried with backoff", name, exc)
        raise Unavailable(str(exc)) from None
    except Exception as exc:
        reason = transient_reason(exc)
        if reason is None:
            raise
        log.warning("%s: %s (%s); the task is retried with backoff", name, reason, short_message(exc))
        raise Unavailable(f"{name}: {reason} ({short_message(exc)})") from None


@contextmanager
def _lease(found: Services, run_id: int | None) -> Iterator[None]:
    """While a stage works on a run, the run is live: nobody may close it as abandoned."""
    if run_id is None:
        yield
        return
    conn = found.engine.connect()
    try:
        runs.take_lease(conn, run_id)
        yield
    finally:
        with suppress(sa.exc.SQLAlchemyError):  # a dead session has dropped the lease already
            runs.release_lease(conn, run_id)
        with suppress(sa.exc.SQLAlchemyError):
            conn.close()


# --- begin and finish as the DAG runs them ---


def check_conf(conf: Mapping[str, Any] | None, params: Iterable[str]) -> None:
    """Refuse a run whose conf names a param the DAG does not have (Airflow passes unknown keys
    through silently: a misspelt dry_run would publish for real)."""
    known = sorted(params)
    unknown = sorted(set(conf or {}) - set(known))
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
        raise AirflowFailException(
            f"run conf has unknown param {', '.join(hints)}; the params are {', '.join(known)}"
        )


def run_time(context: Mapping[str, Any]) -> tuple[datetime, runs.RunRecord]:
    """The run's time and record: its logical date, or for a manual run without one (Airflow 3's
    default) the time it was queued for (run_after), and who or what started it."""
    dag_run = context["dag_run"]
    logical = getattr(dag_run, "logical_date", None)
    run_type = getattr(dag_run, "run_type", None)
    record = runs.RunRecord(
        date_source="logical_date" if logical else "run_after",
        run_type=str(getattr(run_type, "value", run_type)) if run_type else None,
        triggered_by=getattr(dag_run, "triggering_user_name", None),
        allow_mass_removal=bool(context["params"]["allow_mass_removal"]),
    )
    return logical or dag_run.run_after, record


def _airflow_liveness(ti: Any) -> Callable[[runs.OpenRun], bool]:
    """A run without a lease is still alive while Airflow runs its DAG run (between two tasks)."""

    def live(run: runs.OpenRun) -> bool:
        try:
            state = ti.get_dagrun_state(dag_id=run.dag_id, run_id=run.airflow_run_id)
        except (AirflowRuntimeError, httpx.HTTPStatusError) as exc:
            # No such DAG run (the command line's, or deleted) means nothing runs it; any other
            # answer leaves the run alone rather than close a live one.
            return not _not_found(exc)
        return str(getattr(state, "value", state)) in ("queued", "running")

    return live


def _not_found(exc: Exception) -> bool:
    """Whether the execution API said "no such DAG run" (in a worker the answer arrives wrapped in
    an AirflowRuntimeError, in dag.test() as the HTTP error itself)."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) == 404 or "not_found" in str(getattr(exc, "error", exc))


def begin_run(context: Mapping[str, Any], *, conn_ids: Mapping[str, str]) -> int:
    """The DAG's begin: check the conf, take the run's time and record, close abandoned runs,
    check every setting and register the run."""
    params = context["params"]
    check_conf(getattr(context["dag_run"], "conf", None), params.keys())
    when, record = run_time(context)
    if record.date_source == "run_after":
        log.info("no logical date (a manual run): the run's time is its run_after, %s", when.isoformat())
    try:
        return run_stage(
            pipeline.begin,
            conn_ids=conn_ids,
            dag_id=context["dag"].dag_id,
            airflow_run_id=context["run_id"],
            logical_date=when,
            mode=str(params.get("extract_mode") or "delta"),
            dry_run=bool(params["dry_run"]),
            record=record,
            live=_airflow_liveness(context["ti"]),
        )
    except RunBusy as busy:
        raise _wait_for_slot(context, busy, wait_s=services(**conn_ids).settings.run_lock_wait_s) from None


SLOT_RESCHEDULE = timedelta(seconds=15)


def _wait_for_slot(context: Mapping[str, Any], busy: RunBusy, *, wait_s: float) -> Exception:
    """Another run holds the run slot: begin gives its worker back and is rescheduled (Airflow
    runs it again later) until run_lock_wait_s has passed since its first reschedule; then the run
    is refused, naming the holder."""
    ti = context["ti"]
    first = ti.get_first_reschedule_date(context)
    now = datetime.now(UTC)
    waited = (now - first).total_seconds() if first else 0.0
    if waited >= wait_s:
        return AirflowFailException(
            f"{busy.waiting} refused after waiting {waited:.0f}s: {busy.holder} holds the certsync run"
            " lock; one run at a time works on a database"
        )
    log.warning(
        "waiting for %s to finish (%s; waited %.0fs of %ss)", busy.holder, busy.waiting, waited, wait_s
    )
    return AirflowRescheduleException(now + SLOT_RESCHEDULE)


def finish_run(
    context: Mapping[str, Any], *, conn_ids: Mapping[str, str], run_id: int, alias: Any, asset: Any
) -> dict[str, Any]:
    """The DAG's finish: close the run (failing the task when the run failed) and announce `asset`
    through `alias` only when this run changed something in Exchange Online."""
    summary = run_stage(pipeline.finish, conn_ids=conn_ids, run_id=run_id)
    published = pipeline.published_count(summary)
    if not published:
        log.info("run %s published nothing; no asset event", run_id)
        return summary
    actions = summary["actions"]
    context["outlet_events"][alias].add(
        asset,
        extra={
            "sync_run_id": run_id,
            "published": published,
            "removals": sum(
                n for k, n in actions.items() if k.startswith("remove:") and k.endswith(":published")
            ),
            "conflicts": sum(n for k, n in actions.items() if k.endswith(":conflict")),
            "audit_head": summary["audit_head"],
            "audit_checkpoint": summary.get("audit_checkpoint"),  # signed: seq, head, at, key_id
        },
    )
    log.info("run %s published %d changes; asset event emitted", run_id, published)
    return summary


# --- failure notifications ---

NOTIFIER_VARIABLE = "certsync_notifier"


def notify_failure(context: Mapping[str, Any]) -> None:
    """The DAG's on_failure_callback: hand the failure to the notifier the variable
    `certsync_notifier` names, as {"notifier": "<module>.<Class>", "kwargs": {...}} (any Airflow
    notifier: SlackNotifier, SmtpNotifier, ...). Unset, the failure is only logged."""
    dag_run = context.get("dag_run")
    try:
        notifier = configured_notifier(Variable.get(NOTIFIER_VARIABLE, default=None))
    except ConfigError as exc:
        log.error(
            "certsync run %s failed, and it cannot be notified: %s", getattr(dag_run, "run_id", "?"), exc
        )
        return
    if notifier is None:
        log.error("certsync run %s failed (no notifier configured)", getattr(dag_run, "run_id", "?"))
        return
    send(notifier, dict(context))


def send(notifier: BaseNotifier, context: dict[str, Any]) -> None:
    """Render the notifier's templates and send. A DAG callback may get the scheduler's copy of
    the DAG, which has no template environment: then a sandboxed one renders."""
    dag = context.get("dag")
    env = None if hasattr(dag, "get_template_env") else SandboxedEnvironment()
    notifier.render_template_fields(context, jinja_env=env)
    notifier.notify(context)


def configured_notifier(raw: str | None) -> BaseNotifier | None:
    """The notifier the variable's JSON describes; a clear error when it cannot be built."""
    if not raw:
        return None
    where = f"variable {NOTIFIER_VARIABLE!r}"
    try:
        spec = json.loads(raw)
        path, kwargs = spec["notifier"], spec.get("kwargs") or {}
        module, _, name = str(path).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:
        raise ConfigError(
            f'{where} must be JSON {{"notifier": "<module>.<Class>", "kwargs": {{...}}}}'
            f" naming an importable notifier: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, BaseNotifier)):
        raise ConfigError(f"{where}: {path} is not an Airflow notifier (BaseNotifier)")
    return cls(**kwargs)


class LogNotifier(BaseNotifier):
    """A notifier that writes one line per failed run to the log and, given `path`, appends it to
    that file: for trying the wiring before Slack or mail is set up (and for tests)."""

    template_fields = ("message",)

    def __init__(self, *, message: str = DEFAULT_MESSAGE, path: str | None = None) -> None:
        super().__init__()
        self.message = message
        self.path = path

    def notify(self, context: Any) -> None:
        log.error("%s", self.message)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(self.message.replace("\n", " ") + "\n")
