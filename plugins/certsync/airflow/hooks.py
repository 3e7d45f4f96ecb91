"""Thin Airflow hooks for the three systems certsync talks to.

Each hook turns an Airflow connection into certsync's own settings (through certsync.config, the
same code the pipeline uses) and tests it with the pipeline's own checks, so the Test button in
the Airflow UI says exactly what `begin` would. Their form (extra fields, labels, placeholders)
is declared in certsync.airflow.provider. Messages name hosts, logins and ids, never a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy.engine import Engine

from certsync import config
from certsync.directory import DirectoryError, DirectoryReader, DirectorySettings
from certsync.exchange.auth import AuthError
from certsync.exchange.client import ExchangeClient, ExchangeError
from certsync.store import db

# What a check may raise for a wrong setting; anything else is a bug and propagates.
CHECK_ERRORS = (
    config.ConfigError,
    DirectoryError,
    AuthError,
    ExchangeError,
    db.DatabaseError,
    OSError,
)


def _extra(conn_type: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The extras as certsync reads them: fields the form left empty are not set, and the
    `extra__<type>__` prefix of older Airflow forms is dropped."""
    prefix = f"extra__{conn_type}__"
    return {key.removeprefix(prefix): value for key, value in extra.items() if value not in (None, "")}


def certsync_connection(conn: Any, *, conn_id: str) -> config.Connection:
    """An Airflow connection (task SDK or core model) as certsync's Connection."""
    conn_type = conn.conn_type or ""
    return config.Connection(
        conn_id=conn_id,
        conn_type=conn_type,
        host=conn.host or "",
        port=conn.port,
        login=conn.login or "",
        password=conn.password or "",
        schema=conn.schema or "",
        extra=_extra(conn_type, conn.extra_dejson),
    )


def _without_secret(message: str, secret: str) -> str:
    """Last line of defence: no message leaves a hook with the password in it, plain or encoded."""
    for form in {secret, quote(secret, safe="")} if secret else ():
        message = message.replace(form, "***")
    return message


class CertsyncHook(BaseHook):
    """What the three hooks share: read the connection, test it, report without secrets."""

    conn_name_attr = "conn_id"
    default_conn_name = ""
    conn_type = ""
    hook_name = ""

    def __init__(self, *, conn_id: str) -> None:
        super().__init__()
        self.conn_id = conn_id

    def certsync_connection(self) -> config.Connection:
        return certsync_connection(self.get_connection(self.conn_id), conn_id=self.conn_id)

    def _check(self, conn: config.Connection) -> str:
        """Check the connection against the real system; returns what was found."""
        raise NotImplementedError

    def test_connection(self) -> tuple[bool, str]:
        """(True, what was reached) or (False, why not), as the Airflow UI's Test button shows it."""
        try:
            conn = self.certsync_connection()
        except AirflowNotFoundException:
            return False, f"connection {self.conn_id!r} is not configured"
        try:
            return True, _without_secret(self._check(conn), conn.password)
        except CHECK_ERRORS as exc:
            return False, _without_secret(f"connection {self.conn_id!r}: {exc}", conn.password)


class CertsyncLdapHook(CertsyncHook):
    """The Active Directory users are read from: bind DN and password, base DN, TLS."""

    conn_name_attr = "ldap_conn_id"
    default_conn_name = config.LDAP_CONN_ID
    conn_type = config.LDAP_CONN_TYPE
    hook_name = "certsync: Active Directory (LDAP)"

    def __init__(self, *, ldap_conn_id: str = config.LDAP_CONN_ID) -> None:
        super().__init__(conn_id=ldap_conn_id)

    def settings(self) -> DirectorySettings:
        return config.directory_settings(self.certsync_connection())

    def get_conn(self) -> DirectoryReader:
        return DirectoryReader(settings=self.settings())

    def _check(self, conn: config.Connection) -> str:
        settings = config.directory_settings(conn)
        DirectoryReader(settings=settings).check()
        return f"bound to {settings.url} as {settings.bind_dn}; base DN {settings.base_dn!r} is readable"


class CertsyncExchangeHook(CertsyncHook):
    """The Exchange Online tenant certificates are published to: app-only token, InvokeCommand."""

    conn_name_attr = "exchange_conn_id"
    default_conn_name = config.EXCHANGE_CONN_ID
    conn_type = config.EXCHANGE_CONN_TYPE
    hook_name = "certsync: Exchange Online"

    def __init__(self, *, exchange_conn_id: str = config.EXCHANGE_CONN_ID) -> None:
        super().__init__(conn_id=exchange_conn_id)

    def settings(self) -> config.ExchangeSettings:
        return config.exchange_settings(self.certsync_connection())

    def get_conn(self) -> ExchangeClient:
        return ExchangeClient.connect(self.settings())

    def _check(self, conn: config.Connection) -> str:
        settings = config.exchange_settings(conn)
        ExchangeClient.connect(settings).check()
        return (
            f"token issued to client {settings.client_id} by {settings.authority_host}; "
            f"{settings.base_url} answered Get-Recipient for tenant {settings.tenant_id}"
        )


class CertsyncPostgresHook(CertsyncHook):
    """certsync's store (staging, state, audit log), reached as the certsync_app login."""

    conn_name_attr = "postgres_conn_id"
    default_conn_name = config.POSTGRES_CONN_ID
    conn_type = config.POSTGRES_CONN_TYPE
    hook_name = "certsync: audit store (PostgreSQL)"

    def __init__(self, *, postgres_conn_id: str = config.POSTGRES_CONN_ID) -> None:
        super().__init__(conn_id=postgres_conn_id)

    def dsn(self) -> str:
        return config.database_dsn(self.certsync_connection())

    def get_conn(self) -> Engine:
        return db.create_engine(self.dsn())

    def _check(self, conn: config.Connection) -> str:
        dsn = config.database_dsn(conn)
        db.check(dsn)
        engine = db.create_engine(dsn)
        try:
            db.check_schema(engine)
        finally:
            engine.dispose()
        where = f"{conn.host}{f':{conn.port}' if conn.port else ''}/{conn.schema or 'postgres'}"
        return f"connected to {where} as {conn.login or '(default login)'}; the certsync schema is current"
