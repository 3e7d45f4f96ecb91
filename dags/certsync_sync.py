"""
### certsync: S/MIME certificates from Active Directory to Exchange Online

Keeps the `UserCertificate` / `UserSMimeCertificate` of Exchange Online recipients equal to the
**valid** certificates of their Active Directory users, and records every publish attempt in a
hash-chained, append-only audit log in Postgres.

| stage | what it does |
|---|---|
| `begin` | checks every setting against the real systems, then registers the run |
| `extract` | pages users out of AD, COPYs them into staging, merges into the source view |
| `read_recipients` | snapshots Exchange Online's recipients (type, directory-sync state) |
| `validate` | validates each new or expiring certificate once, in parallel shards |
| `plan` | desired (valid, at most 15, newest first) vs what Exchange holds -> actions |
| `publish` | sends each batch of actions with Set-Mailbox / Set-MailUser / Set-MailContact |
| `carry_over` | beside `publish`: a delta plan's record gets the base plan's results of the users it left unchanged (`finish` does it if this did not run) |
| `finish` | (teardown) closes the run, fails when any action failed or stayed pending, and emits the `certsync://published` asset event when something was published |
| `verify_audit` | beside `finish`: recomputes the hash and signature of every audit row since its last signed verification mark (every row with `full_audit_verify`, or when the last full check is older than `audit_full_verify_days`) and checks them against the signed checkpoints |

**Params**

| param | default | meaning |
|---|---|---|
| `dry_run` | `false` | plan, but publish nothing |
| `allow_mass_removal` | `false` | ignore the removal threshold for this run (recorded with the run) |
| `full_audit_verify` | `false` | `verify_audit` checks the whole audit log, not only the rows since its last verification |
| `extract_mode` | `delta` | `delta` reads what changed since the last run's watermark (full when there is none usable, or the last full read is older than `full_read_every_hours`); `full` reads the whole scope |
| `ldap_conn_id` | `certsync_ldap` | the directory's connection (type *certsync: Active Directory*) |
| `exchange_conn_id` | `certsync_exchange` | the tenant's connection (type *certsync: Exchange Online*) |
| `postgres_conn_id` | `certsync_postgres` | the store's connection, logging in as `certsync_app` (required) |

A param of the wrong type is refused when the run is triggered; a conf key that is not a param
fails `begin` naming the nearest param. A manual run without a logical date takes the time it
was queued for (recorded as `date_source = run_after`).

Create the connections in *Admin > Connections* and press *Test*: each type checks what `begin`
checks. The variable `certsync_config` holds the trust settings (see the README); an unknown key
in it is refused. Bad settings and a tripped removal threshold fail the task without retries; a
system that is down or busy (Postgres, the DC, Exchange, the token endpoint) is retried with
backoff. A run whose actions failed ends **failed**, and the notifier named by the variable
`certsync_notifier` (any Airflow notifier, e.g. Slack or SMTP) is called. A run whose process died
is closed as `abandoned` by the next run. Re-running any task or the whole run is safe: every
stage is keyed by the run.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

PUBLISHED = Asset("certsync://published")
# finish emits through an alias, so that a run that changed nothing emits no event at all.
PUBLISHED_EVENTS = AssetAlias("certsync-published-events")
VALIDATION_SHARDS = 2
CONN_ID_PARAMS = ("ldap_conn_id", "exchange_conn_id", "postgres_conn_id")


def _conn_id(default: str, description: str) -> Param:
    return Param(default, type="string", pattern=r"^[\w.-]+$", description=description)


def _on_failure(context) -> None:
    """Hand a failed run to the configured notifier (imported only when a run fails)."""
    from certsync.airflow.adapter import notify_failure

    notify_failure(context)


def _conn_ids() -> dict[str, str]:
    """This run's connection ids, from its params."""
    params = get_current_context()["params"]
    return {name: params[name] for name in CONN_ID_PARAMS}


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["certsync", "smime"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(hours=6),
    on_failure_callback=_on_failure,
    default_args={
        "owner": "identity",
        # Retries are for systems that are down or busy; settings errors fail at once regardless.
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=15),
        "execution_timeout": timedelta(hours=1),
    },
    params={
        "dry_run": Param(False, type="boolean", description="Plan, but publish nothing."),
        "allow_mass_removal": Param(False, type="boolean", description="Ignore the removal threshold once."),
        "full_audit_verify": Param(
            False,
            type="boolean",
            description="verify_audit checks the whole audit log, not only what is new.",
        ),
        "extract_mode": Param(
            "delta",
            enum=["delta", "full"],
            description="delta: read what changed since the last run (a full read when the watermark"
            " is missing, from another DC, or older than full_read_every_hours); full: read everything.",
        ),
        "ldap_conn_id": _conn_id("certsync_ldap", "Connection of the Active Directory to read."),
        "exchange_conn_id": _conn_id("certsync_exchange", "Connection of the Exchange Online tenant."),
        "postgres_conn_id": _conn_id("certsync_postgres", "Connection of the store (certsync_app login)."),
    },
)
def certsync():
    @task(execution_timeout=timedelta(minutes=15))
    def begin() -> int:
        """Check settings against the real systems, close abandoned runs and register this run."""
        from certsync.airflow.adapter import begin_run

        return begin_run(get_current_context(), conn_ids=_conn_ids())

    @task
    def extract(sync_run_id: int) -> dict:
        """Read the directory into staging and merge it into the source view."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        return run_stage(pipeline.extract, conn_ids=_conn_ids(), run_id=sync_run_id)

    @task
    def read_recipients(sync_run_id: int) -> dict:
        """Snapshot Exchange Online's recipients: type, sync state, certificates held."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        try_number = get_current_context()["ti"].try_number  # settling lost answers records it
        return run_stage(
            pipeline.read_recipients, conn_ids=_conn_ids(), run_id=sync_run_id, task_try=try_number
        )

    @task
    def validate(sync_run_id: int, shard: int) -> dict:
        """Validate one shard of the certificates that need a (new) verdict."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        return run_stage(
            pipeline.validate, conn_ids=_conn_ids(), run_id=sync_run_id, shard=shard, shards=VALIDATION_SHARDS
        )

    @task
    def plan(sync_run_id: int) -> list[int]:
        """Compute the actions (desired vs what Exchange holds) and return the publish batches."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        allow = bool(get_current_context()["params"]["allow_mass_removal"])
        return run_stage(pipeline.plan, conn_ids=_conn_ids(), run_id=sync_run_id, allow_mass_removal=allow)

    @task(max_active_tis_per_dagrun=4, execution_timeout=timedelta(hours=2))
    def publish(sync_run_id: int, batch: int) -> dict:
        """Publish one batch of actions to Exchange Online, auditing every attempt."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        try_number = get_current_context()["ti"].try_number  # recorded on each write-ahead audit row
        return run_stage(
            pipeline.publish, conn_ids=_conn_ids(), run_id=sync_run_id, batch=batch, task_try=try_number
        )

    @task
    def carry_over(sync_run_id: int) -> dict:
        """Copy the base plan's results of the users a delta plan left unchanged into the run's record."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        return run_stage(pipeline.carry_over, conn_ids=_conn_ids(), run_id=sync_run_id)

    @task(outlets=[PUBLISHED_EVENTS], execution_timeout=timedelta(minutes=15))
    def finish(sync_run_id: int) -> dict:
        """Close the run with its summary; fail when any action failed or stayed pending."""
        from certsync.airflow.adapter import finish_run

        return finish_run(
            get_current_context(),
            conn_ids=_conn_ids(),
            run_id=sync_run_id,
            alias=PUBLISHED_EVENTS,
            asset=PUBLISHED,
        )

    @task(trigger_rule="all_done", execution_timeout=timedelta(hours=1))
    def verify_audit() -> dict:
        """Verify the audit rows since the last verification (all with full_audit_verify) against the signed checkpoints (fails naming the first bad row)."""
        from certsync import pipeline
        from certsync.airflow.adapter import run_stage

        full = bool(get_current_context()["params"]["full_audit_verify"])
        return run_stage(pipeline.verify_audit, conn_ids=_conn_ids(), full=full)

    sync_run = begin()
    extracted = extract(sync_run)
    recipients = read_recipients(sync_run)
    validated = validate.partial(sync_run_id=sync_run).expand(shard=list(range(VALIDATION_SHARDS)))
    [extracted, recipients] >> validated
    batches = plan(sync_run)
    validated >> batches
    published = publish.partial(sync_run_id=sync_run).expand(batch=batches)
    # Publishing does not need the unchanged users' results: the copy runs beside it.
    carried = carry_over(sync_run)
    batches >> carried
    # A teardown of begin: it runs whatever happened after begin (a failed stage, an empty plan)
    # and its failure fails the DAG run.
    closed = finish(sync_run).as_teardown(setups=sync_run, on_failure_fail_dagrun=True)
    [published, carried] >> closed
    # Beside finish, not after it: a task downstream of the teardown would keep finish's failure
    # out of the DAG run's state (Airflow judges a run by its leaves).
    published >> verify_audit()


certsync()
