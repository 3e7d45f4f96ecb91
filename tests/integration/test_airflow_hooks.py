"""certsync's Airflow connection types against the real services: Airflow lists them with their
form, each Test says True against the real Samba DC, emulator and PostgreSQL and False with a
clear, secret-free reason otherwise, and the DAG reads its connections from the ids it is given."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

from certsync.config import Connection, EnvSource, connection_uri
from tests.integration.conftest import certsync_dag

pytestmark = pytest.mark.integration
DATABASE = "certsync_hooks"
# The default connection ids, which are also the names of certsync's connection types.
CONN_IDS = ("certsync_ldap", "certsync_exchange", "certsync_postgres")
WRONG_SECRET = "not-the-secret-4711"


@pytest.fixture(scope="module")
def airflow_db(own_sync_env) -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


@pytest.fixture()
def environ(own_sync_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The process environment carries exactly the connections a test sets, from nothing."""
    for key in [k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))]:
        monkeypatch.delenv(key)
    yield own_sync_env


def _conn(env: dict[str, str], name: str, /, **changes) -> Connection:
    """The session's connection `name` as certsync's own connection type (the lab writes the
    generic ldap/https/postgres ones), with `changes`."""
    conn = EnvSource(environ=env).connection(name)
    assert conn is not None
    return dataclasses.replace(conn, conn_type=name, **changes)


def _test_in_airflow(monkeypatch: pytest.MonkeyPatch, conn: Connection) -> tuple[bool, str]:
    """What the connection form's Test button does: an Airflow connection, published under its id,
    tested by the hook Airflow finds for its type."""
    from airflow.models.connection import Connection as AirflowConnection

    uri = connection_uri(conn)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.conn_id.upper()}", uri)
    return AirflowConnection(conn_id=conn.conn_id, uri=uri).test_connection()


# --- the connection types as Airflow lists them ---


def test_airflow_lists_the_three_types_with_their_hooks() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    from certsync.airflow import hooks

    found = ProvidersManagerTaskRuntime().hooks
    for conn_type, hook in [
        ("certsync_ldap", hooks.CertsyncLdapHook),
        ("certsync_exchange", hooks.CertsyncExchangeHook),
        ("certsync_postgres", hooks.CertsyncPostgresHook),
    ]:
        info = found[conn_type]
        assert info is not None, conn_type
        assert info.hook_class_name == f"{hook.__module__}.{hook.__name__}"
        assert (info.hook_name, info.connection_id_attribute_name) == (hook.hook_name, hook.conn_name_attr)
        assert info.connection_testable


def test_the_connection_form_gets_each_types_fields_and_labels() -> None:
    """What the UI's connection form is built from (the API's hook metadata)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    meta = {m.connection_type: m for m in HookMetaService.hook_meta_data()}
    ldap, exchange, store = meta["certsync_ldap"], meta["certsync_exchange"], meta["certsync_postgres"]
    assert ldap.hook_name == "certsync: Active Directory (LDAP)"
    assert ldap.standard_fields.login.title == "Bind DN" and ldap.standard_fields.url_schema.hidden
    assert set(ldap.extra_fields) == {
        "base_dn",
        "search_filter",
        "group_dn",
        "use_ssl",
        "start_tls",
        "ca_file",
        "allow_plain_bind",
        "page_size",
        "time_limit_s",
        "change_tracking",
    }
    assert ldap.extra_fields["page_size"]["value"] == 500
    assert exchange.standard_fields.login.title == "Application (client) ID"
    assert {"tenant_id", "authority_host", "certificate_file", "private_key_file"} <= set(
        exchange.extra_fields
    )
    assert store.standard_fields.url_schema.title == "Database"
    assert store.standard_fields.login.placeholder == "certsync_app"
    assert "sslmode" in store.extra_fields


# --- Test against the real services ---


@pytest.mark.parametrize("conn_id", CONN_IDS)
def test_each_type_tests_true_against_its_real_service(environ, monkeypatch, conn_id: str) -> None:
    ok, message = _test_in_airflow(monkeypatch, _conn(environ, conn_id))
    assert ok, message
    assert {
        "certsync_ldap": "bound to",
        "certsync_exchange": "token issued",
        "certsync_postgres": "connected",
    }[conn_id] in message


def test_a_connection_saved_by_the_form_tests_true(environ, monkeypatch) -> None:
    """The form saves every extra field, unset ones as null and the rest with their defaults."""
    saved = _conn(environ, "certsync_ldap")
    form = {
        "search_filter": None, "group_dn": None, "use_ssl": False, "start_tls": False, "ca_file": None,
        "allow_plain_bind": True, "page_size": 500, "time_limit_s": 120, "change_tracking": "usn",
    }  # fmt: skip
    ok, message = _test_in_airflow(
        monkeypatch, dataclasses.replace(saved, extra={**form, "base_dn": saved.extra["base_dn"]})
    )
    assert ok, message


def test_the_hooks_read_a_connection_by_their_own_id_argument(environ, monkeypatch) -> None:
    from certsync.airflow.hooks import CertsyncPostgresHook

    conn = _conn(environ, "certsync_postgres", conn_id="store_elsewhere")
    monkeypatch.setenv("AIRFLOW_CONN_STORE_ELSEWHERE", connection_uri(conn))
    assert CertsyncPostgresHook(postgres_conn_id="store_elsewhere").test_connection()[0]
    ok, message = CertsyncPostgresHook(postgres_conn_id="store_nowhere").test_connection()
    assert (ok, message) == (False, "connection 'store_nowhere' is not configured")


def _secret_credential(env: dict[str, str], secret: str) -> Connection:
    """The Exchange connection with a client secret instead of the certificate."""
    conn = _conn(env, "certsync_exchange")
    extra = {k: v for k, v in conn.extra.items() if k not in ("certificate_file", "private_key_file")}
    return dataclasses.replace(conn, password=secret, extra=extra)


def test_exchange_with_the_right_client_secret_tests_true(environ, monkeypatch, app_credential_files) -> None:
    ok, message = _test_in_airflow(monkeypatch, _secret_credential(environ, app_credential_files[2]))
    assert ok, message


WRONG = {
    "ldap wrong password": ("certsync_ldap", {"password": WRONG_SECRET}, "invalidCredentials"),
    "ldap wrong port": ("certsync_ldap", {"port": 1, "password": WRONG_SECRET}, "ldap://127.0.0.1:1"),
    "exchange wrong secret": ("certsync_exchange", {"password": WRONG_SECRET}, "Invalid client secret"),
    "exchange wrong port": ("certsync_exchange", {"port": 1}, "no answer from https://127.0.0.1:1"),
    "store wrong port": ("certsync_postgres", {"port": 1, "password": WRONG_SECRET}, "cannot connect"),
    "store unknown login": ("certsync_postgres", {"login": "nobody"}, 'role "nobody" does not exist'),
    "store as the owner": ("certsync_postgres", {"login": "postgres"}, "superuser or the schema's owner"),
}


@pytest.mark.parametrize("case", WRONG.keys())
def test_a_wrong_setting_tests_false_with_a_clear_secret_free_reason(
    environ, monkeypatch, app_credential_files, case: str
) -> None:
    conn_id, changes, reason = WRONG[case]
    secret = app_credential_files[2]
    base = _secret_credential(environ, secret) if conn_id == "certsync_exchange" else _conn(environ, conn_id)
    ok, message = _test_in_airflow(monkeypatch, dataclasses.replace(base, **changes))
    assert not ok
    assert message.startswith(f"connection {conn_id!r}: ") and reason in message, message
    ldap_password = _conn(environ, "certsync_ldap").password
    for value in (WRONG_SECRET, secret, ldap_password):
        assert value not in message


# --- the DAG's connection ids ---


@pytest.fixture()
def dag(airflow_db):
    from certsync.airflow import adapter

    # Services are cached per worker process and connection ids; each run here starts afresh.
    adapter._services_for.cache_clear()
    return certsync_dag()


def test_a_worker_without_certsync_postgres_fails_naming_it(environ, monkeypatch, dag, lab_at, capfd) -> None:
    for key, value in environ.items():
        if key != "AIRFLOW_CONN_CERTSYNC_POSTGRES":
            monkeypatch.setenv(key, value)
    run = dag.test(logical_date=lab_at - timedelta(days=40, hours=3))
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    output = "".join(capfd.readouterr())
    assert run.state == "failed" and states["begin"] == "failed"
    assert "connection 'certsync_postgres' is not configured" in output


def test_a_run_reads_the_connections_its_params_name(
    environ, monkeypatch, dag, lab_at, embedded_pg, own_tenant
) -> None:
    """Only other ids are set: the run works through its params alone (a dry run: it sends Exchange
    nothing)."""
    for conn_id in CONN_IDS:
        conn = _conn(environ, conn_id, conn_id=f"{conn_id}_b")
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}_B", connection_uri(conn))
    monkeypatch.setenv("AIRFLOW_VAR_CERTSYNC_CONFIG", environ["AIRFLOW_VAR_CERTSYNC_CONFIG"])
    signing = "AIRFLOW_CONN_CERTSYNC_AUDIT_SIGNING"  # the audit key has no param: its id is fixed
    monkeypatch.setenv(signing, environ[signing])
    conf = {f"{name}_conn_id": f"certsync_{name}_b" for name in ("ldap", "exchange", "postgres")}
    set_calls = _set_calls(own_tenant)
    run = dag.test(logical_date=lab_at - timedelta(days=41, hours=5), run_conf={**conf, "dry_run": True})
    assert run.state == "success", {ti.task_id: ti.state for ti in run.get_task_instances()}
    with psycopg.connect(embedded_pg.dsn_for(DATABASE)) as db:
        sync_run_id, dry_run, state = db.execute(
            "SELECT run_id, dry_run, state FROM certsync.sync_run WHERE airflow_run_id = %s", (run.run_id,)
        ).fetchone()
        actions = dict(
            db.execute(
                "SELECT state, count(*) FROM certsync.planned_action WHERE run_id = %s GROUP BY state",
                (sync_run_id,),
            ).fetchall()
        )
    assert (dry_run, state) == (True, "succeeded")
    assert actions.get("dry_run") and "published" not in actions, actions
    assert _set_calls(own_tenant) == set_calls


def _set_calls(emulator) -> int:
    return sum(1 for r in emulator.control.requests() if str(r.get("cmdlet") or "").startswith("Set-"))
