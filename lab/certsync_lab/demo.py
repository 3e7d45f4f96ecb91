"""The demo: the `certsync` DAG run once by Airflow against the lab, then what happened, as an operator
and an auditor would read it, and the emulator's check that Exchange now holds the right certificates."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import certsync.dags
from certsync import report
from certsync.config import EnvSource, load_settings
from certsync.pipeline import Services
from certsync_lab.agreement import emulator_disagreements
from certsync_lab.stack import LabStack

DAGS_FOLDER = Path(next(iter(certsync.dags.__path__)))


def airflow_environment(stack: LabStack) -> dict[str, str]:
    """Airflow's home, metadata database (in the lab's PostgreSQL) and the packaged DAG folder."""
    airflow_home = stack.home / "airflow"
    airflow_home.mkdir(parents=True, exist_ok=True)
    metadata = stack.postgres.ensure_database("airflow").replace("postgresql://", "postgresql+psycopg://")
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }


def _audit_verified(stack: LabStack, conn) -> str:  # type: ignore[no-untyped-def]
    """What `certsync audit verify` says with the lab's public key and its checkpoint file."""
    from certsync.audit import checkpoints
    from certsync.audit.rows import db_rows
    from certsync.audit.verify import verify_rows

    key = stack.audit_key()
    found = verify_rows(
        db_rows(conn),
        public_keys={key.key_id: key.private.public_key()},
        checkpoints=checkpoints.read(stack.checkpoint_dir / checkpoints.FILE_NAME),
    )
    return (
        f"certsync audit verify --public-key {stack.home / 'audit' / 'public.key'}"
        f" --checkpoint {stack.checkpoint_dir / checkpoints.FILE_NAME}:\n  {found.summary()}"
    )


def run_demo(stack: LabStack, *, echo: Callable[[str], None]) -> bool:
    """Run the DAG once with `airflow dags test`; print the report. False when the run failed."""
    settings = stack.environment()
    env = {**os.environ, **settings, **airflow_environment(stack)}
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    result = subprocess.run([*airflow, "dags", "test", "certsync"], env=env, capture_output=True, text=True)
    (stack.home / "last-dag-run.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        return False
    services = Services(settings=load_settings(EnvSource(environ=settings)))
    with services.engine.connect() as conn:
        echo(report.render_run(conn, report.latest_run(conn)))
        echo("")
        echo(report.render_auditor_example(conn))
        echo("")
        echo(report.render_auditor_views(conn))
        echo(_audit_verified(stack, conn))
        problems = emulator_disagreements(
            conn, stack.emulator.control.state(), run_id=report.latest_run(conn).run_id
        )
    writes = [r for r in stack.emulator.control.requests() if str(r.get("cmdlet", "")).startswith("Set-")]
    echo("")
    echo(
        f"Exchange emulator: {len(stack.emulator.control.state()['recipients'])} recipients,"
        f" {len(writes)} Set-* calls in this demo, {len(problems)} writable recipients differ"
        " from their users' valid certificates"
    )
    for line in problems[:10]:
        echo(f"  {line}")
    return True
