"""The one module that imports Airflow: settings from Airflow connections and variables, and the
per-process services the DAG's tasks share."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from airflow.sdk import BaseHook, Variable
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowRuntimeError

from certsync.certificates.trust import TrustConfigError
from certsync.config import ConfigError, Connection, load_settings
from certsync.pipeline import RemovalThresholdExceeded, Services

T = TypeVar("T")


class AirflowSource:
    """Connections and variables through Airflow's own lookup (secrets backends, env vars, DB)."""

    def connection(self, conn_id: str) -> Connection | None:
        try:
            conn = BaseHook.get_connection(conn_id)
        except (AirflowNotFoundException, AirflowRuntimeError):
            return None
        return Connection(
            conn_id=conn_id,
            conn_type=conn.conn_type or "",
            host=conn.host or "",
            port=conn.port,
            login=conn.login or "",
            password=conn.password or "",
            schema=conn.schema or "",
            extra=conn.extra_dejson,
        )

    def variable(self, key: str) -> str | None:
        return Variable.get(key, default=None)


@cache
def services() -> Services:
    """One set of clients per worker process (one msal application, one connection pool)."""
    return Services(settings=load_settings(AirflowSource()))


def run_stage(stage: Callable[..., T], **kwargs: Any) -> T:
    """Run one pipeline stage with this process's services. Bad settings and a tripped removal
    guard fail the task at once: retrying cannot fix them, and a person must look."""
    try:
        return stage(services(), **kwargs)
    except (ConfigError, TrustConfigError, RemovalThresholdExceeded) as exc:
        raise AirflowFailException(str(exc)) from None
