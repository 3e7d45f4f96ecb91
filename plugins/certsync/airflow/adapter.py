"""Where the pipeline meets Airflow: settings from Airflow connections and variables, and the
per-process services the DAG's tasks share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, TypeVar

from airflow.sdk import BaseHook, Variable
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowRuntimeError

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
from certsync.pipeline import RemovalThresholdExceeded, Services

T = TypeVar("T")


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
    certsync_* when not given). Bad settings and a tripped removal guard fail the task at once:
    retrying cannot fix them, and a person must look."""
    try:
        return stage(services(**(conn_ids or {})), **kwargs)
    except (ConfigError, TrustConfigError, RemovalThresholdExceeded) as exc:
        raise AirflowFailException(str(exc)) from None
