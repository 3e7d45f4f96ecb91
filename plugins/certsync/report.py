"""Human-readable reports over the run tables: the run summary, an auditor's query, the chain check."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from tabulate import tabulate

from certsync.audit import chain_head

# What an auditor asks: what did each recipient get, from which run, and did Exchange accept it?
# One row per request: its intent (written before it was sent) and what became of it.
AUDITOR_QUERY = """
SELECT r.intent_seq, r.intended_at::timestamp(0) AS at_utc, r.primary_smtp, r.cmdlet, r.action,
       r.user_certs, r.smime_blobs, r.outcome, r.closed_by, r.airflow_run_id
FROM certsync.publish_requests r
ORDER BY r.intent_seq DESC
LIMIT 5
"""

REFUSALS_QUERY = """
SELECT reason, count(*) AS values, coalesce(min(mail), min(sam_account_name)) AS example_user
FROM certsync.value_verdicts
WHERE run_id = :r AND NOT selected
GROUP BY reason ORDER BY 2 DESC
"""


# The auditors' views (sql/0012), each with the question it answers; the demo prints them.
VIEW_QUESTIONS = (
    (
        "What did a recipient hold, and when? (its certificate timeline as validity ranges)",
        "SELECT attribute, serial, not_after::date, held::text AS held, added_by_run_id, removed_by_run_id\n"
        "FROM certsync.recipient_certificate_timeline\n"
        "WHERE recipient_id = (SELECT recipient_id FROM certsync.recipient_certificate_timeline\n"
        "                      ORDER BY added_by_seq LIMIT 1)\nORDER BY lower(held)",
    ),
    (
        "Who held a certificate? (its history across recipients)",
        "SELECT serial, primary_smtp, attribute, held::text AS held FROM certsync.certificate_history\n"
        "ORDER BY lower(held), primary_smtp LIMIT 3",
    ),
    (
        "Why was a certificate refused? (refusals with reasons, latest run)",
        "SELECT mail, attribute, reason, rule, serial FROM certsync.refusals\n"
        "WHERE run_id = (SELECT max(run_id) FROM certsync.sync_run) ORDER BY reason, mail LIMIT 5",
    ),
    (
        "How did each run end, with which overrides?",
        "SELECT run_id, run_type, triggered_by, dry_run, allow_mass_removal, state, published, failed,\n"
        "       audit_checkpoint_seq\nFROM certsync.run_outcomes ORDER BY run_id DESC LIMIT 3",
    ),
    (
        "Which certificates in the GAL expire within 30 days?",
        "SELECT * FROM certsync.expiring_soon LIMIT 5",
    ),
)


def render_auditor_views(conn: Connection) -> str:
    parts = []
    for question, query in VIEW_QUESTIONS:
        rows = conn.execute(sa.text(query)).mappings().all()
        parts += [f"-- {question}", query + ";", render_table(rows) if rows else "(no rows)", ""]
    return "\n".join(parts)


def latest_run(conn: Connection) -> sa.Row:
    return conn.execute(
        sa.text(
            "SELECT run_id, dag_id, airflow_run_id, logical_date, dry_run, state, summary"
            " FROM certsync.sync_run ORDER BY run_id DESC LIMIT 1"
        )
    ).one()


def render_table(rows: Iterable[Any], headers: list[str] | str = "keys") -> str:
    return tabulate(list(rows), headers=headers, tablefmt="simple")


def render_run(conn: Connection, run: sa.Row) -> str:
    s: dict[str, Any] = run.summary or {}
    actions = s.get("actions", {})
    published = sum(n for k, n in actions.items() if k.endswith(":published"))
    planned = sum(n for k, n in actions.items() if k.endswith(":dry_run"))
    conflicts = sum(n for k, n in actions.items() if k.startswith("conflict:"))
    lines = [
        f"certsync run {run.run_id} ({run.dag_id} / {run.airflow_run_id}) - {run.state}"
        + (" [dry run]" if run.dry_run else ""),
        f"  users seen:                 {s.get('users', 0)}",
        f"  certificate values:         {s.get('values', {}).get('selected', 0)} valid and selected,"
        f" {s.get('values', {}).get('refused', 0)} refused",
        f"  recipients updated:         {published}",
        *([f"  would update (dry run):     {planned}"] if run.dry_run else []),
        f"  conflicts (directory sync): {conflicts}",
        f"  publish attempts:           {s.get('publish_attempts', {}) or 'none (nothing changed)'}",
        "",
        "Refused certificates by reason:",
        render_table(conn.execute(sa.text(REFUSALS_QUERY), {"r": run.run_id}).mappings()),
        "",
        "Actions not published, by reason:",
        render_table(sorted(s.get("not_published_by_reason", {}).items()), ["reason", "recipients"]),
    ]
    return "\n".join(lines)


def render_auditor_example(conn: Connection) -> str:
    rows = conn.execute(sa.text(AUDITOR_QUERY)).mappings().all()
    total = conn.execute(sa.text("SELECT count(*) FROM certsync.audit_log")).scalar_one()
    return "\n".join(
        [
            "Auditor query (the five latest publish attempts):",
            AUDITOR_QUERY.strip(),
            "",
            render_table(rows) if rows else "(no publish attempts yet)",
            "",
            f"Audit log: {total} signed rows, head {chain_head(conn)}; each run appends a signed checkpoint"
            " (`certsync audit verify --public-key <file> --checkpoint <file>` checks every row against it)",
        ]
    )
