"""Settings from AIRFLOW_CONN_* / AIRFLOW_VAR_*: both connection forms, and errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certsync.config import (
    ConfigError,
    Connection,
    EnvSource,
    SettingNames,
    connection_uri,
    load_settings,
)

LDAP_URI = "ldaps://CN%3Dsync%2COU%3DSvc%2CDC%3Dcorp:p%40ss%3Aw0rd@dc1.corp.example:636/?base_dn=OU%3DPeople%2CDC%3Dcorp"


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    anchors = tmp_path / "anchors.pem"
    anchors.write_text("placeholder")  # existence is checked when the trust configuration loads
    return {
        "AIRFLOW_CONN_CERTSYNC_LDAP": LDAP_URI,
        "AIRFLOW_CONN_CERTSYNC_EXCHANGE": json.dumps(
            {"conn_type": "https", "login": "app-id", "password": "s3cret!", "extra": {"tenant_id": "t1"}}
        ),
        "AIRFLOW_CONN_CERTSYNC_POSTGRES": "postgres://certsync_app:db%40pw@db.corp.example:5432/certsync",
        "AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps({"trust_anchors": str(anchors), "profile": "strict"}),
    }


def test_uri_and_json_connections_are_read_like_airflow(env: dict[str, str]) -> None:
    settings = load_settings(EnvSource(environ=env))
    assert settings.directory.url == "ldaps://dc1.corp.example:636"
    assert settings.directory.bind_dn == "CN=sync,OU=Svc,DC=corp"
    assert settings.directory.password == "p@ss:w0rd"
    assert settings.directory.base_dn == "OU=People,DC=corp"
    assert settings.exchange.base_url == "https://outlook.office365.com"
    assert settings.exchange.client_secret == "s3cret!"
    assert settings.trust.profile == "strict"
    assert settings.database_dsn == "postgresql://certsync_app:db%40pw@db.corp.example:5432/certsync"


def test_a_missing_database_connection_is_a_settings_error_naming_it(env: dict[str, str]) -> None:
    """Production never starts a database of its own: without certsync_postgres nothing runs."""
    del env["AIRFLOW_CONN_CERTSYNC_POSTGRES"]
    with pytest.raises(ConfigError, match="connection 'certsync_postgres' is not configured"):
        load_settings(EnvSource(environ=env))


def test_secrets_stay_out_of_reprs(env: dict[str, str]) -> None:
    text = repr(load_settings(EnvSource(environ=env)))
    assert "p@ss:w0rd" not in text and "s3cret!" not in text and "db@pw" not in text


def test_connection_uri_round_trips(env: dict[str, str]) -> None:
    conn = Connection(
        conn_id="x",
        conn_type="ldap",
        host="h",
        port=389,
        login="CN=a,DC=b",
        password="p/w@:?",
        extra={"base_dn": "DC=b"},
    )
    again = EnvSource(environ={"AIRFLOW_CONN_X": connection_uri(conn)}).connection("x")
    assert again == conn


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AIRFLOW_CONN_CERTSYNC_LDAP", None, "'certsync_ldap' is not configured"),
        ("AIRFLOW_CONN_CERTSYNC_LDAP", "ldap://u:p@h:389/", "'certsync_ldap': ldap base_dn is required"),
        (
            "AIRFLOW_CONN_CERTSYNC_LDAP",
            "http://u:p@h/?base_dn=x",
            "type must be certsync_ldap, ldap or ldaps",
        ),
        (
            "AIRFLOW_CONN_CERTSYNC_EXCHANGE",
            '{"conn_type": "ldap", "login": "a"}',
            "type must be certsync_exchange",
        ),
        (
            "AIRFLOW_CONN_CERTSYNC_POSTGRES",
            "mysql://u:p@h/db",
            "'certsync_postgres': type must be certsync_pos",
        ),
        ("AIRFLOW_CONN_CERTSYNC_EXCHANGE", '{"login": "a", "password": "s"}', "extra.tenant_id is required"),
        ("AIRFLOW_CONN_CERTSYNC_EXCHANGE", '{"login": "a", "extra": {"tenant_id": "t"}}', "client secret"),
        ("AIRFLOW_CONN_CERTSYNC_EXCHANGE", "{not json", "'certsync_exchange' cannot be parsed"),
        ("AIRFLOW_VAR_CERTSYNC_CONFIG", None, "'certsync_config' is not set"),
        ("AIRFLOW_VAR_CERTSYNC_CONFIG", "{", "'certsync_config' is not valid JSON"),
        ("AIRFLOW_VAR_CERTSYNC_CONFIG", '{"profile": "enterprise"}', "trust_anchors"),
        (
            "AIRFLOW_VAR_CERTSYNC_CONFIG",
            '{"trust_anchors": "a.pem", "profile": "lax"}',
            "profile must be one of",
        ),
        ("AIRFLOW_VAR_CERTSYNC_CONFIG", '["a.pem"]', "must be a JSON object"),
        (
            "AIRFLOW_VAR_CERTSYNC_CONFIG",
            '{"trust_anchors": "a", "removal_threshold": "lots"}',
            "removal_threshold must",
        ),
        (
            "AIRFLOW_VAR_CERTSYNC_CONFIG",
            '{"trust_anchors": "a", "publish_batch_size": 0}',
            "publish_batch_size must",
        ),
        (
            "AIRFLOW_VAR_CERTSYNC_CONFIG",
            '{"trust_anchors": "a", "plan_work_mem_mb": 4194304}',
            "plan_work_mem_mb must be a whole number <= 2097151, not 4194304",
        ),
        (
            "AIRFLOW_VAR_CERTSYNC_CONFIG",
            '{"trust_anchors": "a", "intermediates": "i.pem"}',
            "list of file paths",
        ),
        (
            "AIRFLOW_CONN_CERTSYNC_EXCHANGE",
            '{"login": "a", "password": "s", "extra": {"tenant_id": "t", "page_size": "big"}}',
            "'certsync_exchange': page_size must",
        ),
    ],
)
def test_bad_settings_fail_fast_naming_the_setting(env, name, value, message) -> None:
    changed = {k: v for k, v in env.items() if k != name}
    if value is not None:
        changed[name] = value
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(EnvSource(environ=changed))
    assert "p@ss:w0rd" not in str(caught.value) and "s3cret!" not in str(caught.value)


def test_certsyncs_own_connection_types_are_read_like_the_generic_ones(env: dict[str, str]) -> None:
    """What the Airflow UI writes for certsync's connection types (certsync-ldap://...)."""
    generic = load_settings(EnvSource(environ=env))
    own = {
        **env,
        "AIRFLOW_CONN_CERTSYNC_LDAP": LDAP_URI.replace("ldaps://", "certsync-ldap://") + "&use_ssl=true",
        "AIRFLOW_CONN_CERTSYNC_EXCHANGE": env["AIRFLOW_CONN_CERTSYNC_EXCHANGE"].replace(
            '"https"', '"certsync_exchange"'
        ),
        "AIRFLOW_CONN_CERTSYNC_POSTGRES": env["AIRFLOW_CONN_CERTSYNC_POSTGRES"].replace(
            "postgres://", "certsync-postgres://"
        ),
    }
    assert load_settings(EnvSource(environ=own)) == generic


def _renamed(env: dict[str, str], suffix: str) -> dict[str, str]:
    return {f"{key}{suffix}": value for key, value in env.items()}


NAMES_B = {
    "ldap_conn_id": "certsync_ldap_b",
    "exchange_conn_id": "certsync_exchange_b",
    "postgres_conn_id": "certsync_postgres_b",
    "config_variable": "certsync_config_b",
}


def test_connection_ids_are_parameters_and_recorded(env: dict[str, str]) -> None:
    settings = load_settings(EnvSource(environ=_renamed(env, "_B")), **NAMES_B)
    assert settings.directory.bind_dn == "CN=sync,OU=Svc,DC=corp"
    assert settings.names == SettingNames(**NAMES_B)
    assert load_settings(EnvSource(environ=env)).names == SettingNames()


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("AIRFLOW_CONN_CERTSYNC_POSTGRES_B", "connection 'certsync_postgres_b' is not configured"),
        ("AIRFLOW_CONN_CERTSYNC_LDAP_B", "connection 'certsync_ldap_b' is not configured"),
        ("AIRFLOW_VAR_CERTSYNC_CONFIG_B", "variable 'certsync_config_b' is not set"),
    ],
)
def test_errors_name_the_ids_actually_used(env: dict[str, str], missing: str, message: str) -> None:
    """The default names are set too: only the ids given may be read."""
    other = {k: v for k, v in _renamed(env, "_B").items() if k != missing}
    with pytest.raises(ConfigError, match=message):
        load_settings(EnvSource(environ={**env, **other}), **NAMES_B)


def test_a_bad_trust_setting_names_the_variable_used(env: dict[str, str]) -> None:
    other = _renamed(env, "_B")
    other["AIRFLOW_VAR_CERTSYNC_CONFIG_B"] = '{"trust_anchors": "a", "profile": "lax"}'
    with pytest.raises(ConfigError, match="variable 'certsync_config_b': profile must be one of"):
        load_settings(EnvSource(environ=other), **NAMES_B)


@pytest.mark.parametrize("conn_id", ["", "two words", "a/b", None])
def test_a_connection_id_must_be_an_airflow_id(env: dict[str, str], conn_id) -> None:
    with pytest.raises(ConfigError, match="ldap_conn_id must be a connection or variable id"):
        load_settings(EnvSource(environ=env), ldap_conn_id=conn_id)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"removal_treshold": 10}, "unknown key 'removal_treshold' (did you mean 'removal_threshold'?)"),
        ({"trust_anchor": "x"}, "'trust_anchor' (did you mean 'trust_anchors'?)"),
        (
            {"publish_batchsize": 5, "crl": []},
            "unknown keys 'crl' (did you mean 'crls'?), 'publish_batchsize'",
        ),
        ({"colour": "blue"}, "unknown key 'colour'; valid keys: trust_anchors,"),
    ],
)
def test_unknown_config_keys_are_refused_with_the_nearest_valid_name(env, config, message) -> None:
    """A misspelt key must not be ignored: its default would apply without anyone noticing."""
    base = json.loads(env["AIRFLOW_VAR_CERTSYNC_CONFIG"])
    env["AIRFLOW_VAR_CERTSYNC_CONFIG"] = json.dumps({**base, **config})
    with pytest.raises(ConfigError) as raised:
        load_settings(EnvSource(environ=env))
    assert message in str(raised.value)
    assert str(raised.value).startswith("variable 'certsync_config': ")


def test_every_documented_config_key_is_accepted(env, tmp_path: Path) -> None:
    config = {
        **json.loads(env["AIRFLOW_VAR_CERTSYNC_CONFIG"]),
        "intermediates": [str(tmp_path / "i.pem")],
        "crls": [str(tmp_path / "c.crl")],
        "removal_threshold": 7,
        "publish_batch_size": 3,
        "validation_processes": 1,
        "plan_work_mem_mb": 256,
    }
    env["AIRFLOW_VAR_CERTSYNC_CONFIG"] = json.dumps(config)
    settings = load_settings(EnvSource(environ=env))
    assert (
        settings.removal_threshold,
        settings.publish_batch_size,
        settings.validation_processes,
        settings.plan_work_mem_mb,
    ) == (7, 3, 1, 256)
