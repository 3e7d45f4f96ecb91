"""The one module that imports Airflow: settings from Airflow connections and variables, and the
per-process services the DAG's tasks share."""

from __future__ import annotations

from functools import cache

from airflow.sdk import BaseHook, Variable
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowRuntimeError

from certsync.config import Connection, load_settings
from certsync.pipeline import Services


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
