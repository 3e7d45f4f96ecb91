"""Test-wide settings. Airflow reads its configuration when first imported, so its home, metadata
database and DAG folder are set here, before any test module imports it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="certsync-airflow-"))

os.environ.setdefault("AIRFLOW_HOME", str(_AIRFLOW_HOME))
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")


# Suites that start servers of their own run whole on one worker under `pytest -n 2` (pytest-xdist):
# tests/integration shares session fixtures and Samba's fixed LDAP port 389; the others share a
# session's Airflow stack or keep their tests in a deliberate order. (xdist's own `loadgroup` cannot
# do this under pytest 9, whose node ids it can no longer suffix with the group.)
_WHOLE_SUITES = ("integration", "scheduler", "compose", "packaging")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class SuiteScheduling(LoadScopeScheduling):
        """One work unit per server suite, one per test elsewhere; the biggest units go first."""

        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("/")
            return parts[1] if len(parts) > 2 and parts[1] in _WHOLE_SUITES else nodeid

    return SuiteScheduling(config, log)
