"""Settings: where they come from, and checks that fail fast before anything is written.

Settings live where Airflow keeps them (connections and variables), so the same names work in a
deployment, in `AIRFLOW_CONN_*` / `AIRFLOW_VAR_*` environment variables, and in the `certsync`
command line. This module reads them through a small `SettingsSource` so it needs no Airflow import;
the Airflow adapter supplies a source backed by Airflow's own secrets backends.

Connections (default ids; the DAG's params and the CLI's options choose others)
    certsync_ldap      type certsync_ldap (or ldap/ldaps): <bind DN>:<password>@host:port
                       extra: base_dn (one or more, ';'-separated), search_filter, group_dn,
                       use_ssl, start_tls, ca_file, allow_plain_bind, page_size, time_limit_s,
                       change_tracking (usn|dirsync)
    certsync_exchange  type certsync_exchange (or https): <client id>:<client secret>@outlook.office365.com
                       extra: tenant_id, authority_host, ca_file, certificate_file, private_key_file,
                       page_size, max_concurrency, breaker_threshold, byte_encoding (base64|integers),
                       changed_overlap_minutes (delta reads of recipients; default 30)
    certsync_postgres  type certsync_postgres (or postgres): certsync_app:<password>@host/db
                       (required; the run-time login)
    certsync_postgres_owner  postgresql://<owner>@host/db  (only for `certsync db upgrade`)
Variable
    certsync_config    JSON: trust_anchors, intermediates, crls, profile, removal_threshold,
                       publish_batch_size, validation_processes, run_lock_wait_s, publish_time_box_s,
                       full_read_every_hours, disabled_accounts, left_scope, plan_work_mem_mb
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlparse

from certsync.certificates.trust import PROFILES, TrustSpec

if TYPE_CHECKING:  # the directory module loads ldap3; `certsync validate` reads no settings
    from certsync.audit.signing import AuditSigner
    from certsync.directory import DirectorySettings

LDAP_CONN_ID = "certsync_ldap"
EXCHANGE_CONN_ID = "certsync_exchange"
POSTGRES_CONN_ID = "certsync_postgres"
POSTGRES_OWNER_CONN_ID = "certsync_postgres_owner"
CONFIG_VARIABLE = "certsync_config"
AUDIT_SIGNING_CONN_ID = "certsync_audit_signing"  # the Ed25519 key that signs audit rows
MAX_WORK_MEM_MB = 2_097_151  # PostgreSQL's own limit for work_mem (2^31 - 1 kB)
# Every key certsync_config may hold; anything else is refused.
CONFIG_KEYS = (
    "trust_anchors",
    "intermediates",
    "crls",
    "profile",
    "removal_threshold",
    "publish_batch_size",
    "validation_processes",
    "run_lock_wait_s",
    "publish_time_box_s",
    "audit_checkpoint_dir",
    "audit_full_verify_days",
    "retention_days",
    "full_read_every_hours",
    "disabled_accounts",
    "left_scope",
    "plan_work_mem_mb",
)
# What happens to the certificates of disabled accounts and of users that left the scope.
ACCOUNT_POLICIES = ("withdraw", "keep")

# certsync's own connection types (what its Airflow hooks register); the generic types stay accepted.
LDAP_CONN_TYPE = "certsync_ldap"
EXCHANGE_CONN_TYPE = "certsync_exchange"
POSTGRES_CONN_TYPE = "certsync_postgres"
LDAP_CONN_TYPES = (LDAP_CONN_TYPE, "ldap", "ldaps", "")
EXCHANGE_CONN_TYPES = (EXCHANGE_CONN_TYPE, "https", "")
POSTGRES_CONN_TYPES = (POSTGRES_CONN_TYPE, "postgres", "postgresql", "")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the setting, never a secret value."""


@dataclass(frozen=True)
class Connection:
    """The parts of an Airflow connection certsync uses."""

    conn_id: str
    conn_type: str
    host: str = ""
    port: int | None = None
    login: str = ""
    password: str = field(default="", repr=False)
    schema: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


class SettingsSource(Protocol):
    def connection(self, conn_id: str) -> Connection | None: ...

    def variable(self, key: str) -> str | None: ...


class EnvSource:
    """Reads AIRFLOW_CONN_<ID> (URI or JSON form) and AIRFLOW_VAR_<KEY> like Airflow does."""

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def connection(self, conn_id: str) -> Connection | None:
        raw = self._env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
        if not raw:
            return None
        try:
            return (
                _parse_json_conn(conn_id, raw)
                if raw.lstrip().startswith("{")
                else _parse_uri_conn(conn_id, raw)
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"connection {conn_id!r} cannot be parsed: {exc}") from None

    def variable(self, key: str) -> str | None:
        return self._env.get(f"AIRFLOW_VAR_{key.upper()}")


def _parse_json_conn(conn_id: str, raw: str) -> Connection:
    data = json.loads(raw)
    extra = data.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return Connection(
        conn_id=conn_id,
        conn_type=data.get("conn_type", ""),
        host=data.get("host") or "",
        port=int(data["port"]) if data.get("port") else None,
        login=data.get("login") or "",
        password=data.get("password") or "",
        schema=data.get("schema") or "",
        extra=extra,
    )


def _parse_uri_conn(conn_id: str, raw: str) -> Connection:
    url = urlparse(raw)
    extra: dict[str, Any] = dict(parse_qsl(url.query))
    if "__extra__" in extra:
        extra = json.loads(extra["__extra__"])
    return Connection(
        conn_id=conn_id,
        conn_type=url.scheme.replace("-", "_"),
        host=unquote(url.hostname or ""),
        port=url.port,
        login=unquote(url.username or ""),
        password=unquote(url.password or ""),
        schema=unquote(url.path.lstrip("/")),
        extra=extra,
    )


def _netloc(conn: Connection, *, auth: bool) -> str:
    """[login:password@]host[:port], percent-encoded as URIs need."""
    credentials = (
        f"{quote(conn.login, safe='')}:{quote(conn.password, safe='')}@" if auth and conn.login else ""
    )
    return f"{credentials}{quote(conn.host, safe='')}{f':{conn.port}' if conn.port else ''}"


def connection_uri(conn: Connection) -> str:
    """The Airflow URI form of a connection (used to hand settings to child processes)."""
    query = "?__extra__=" + quote(json.dumps(dict(conn.extra)), safe="") if conn.extra else ""
    return f"{conn.conn_type.replace('_', '-')}://{_netloc(conn, auth=True)}/{quote(conn.schema)}{query}"


@dataclass(frozen=True)
class ExchangeSettings:
    base_url: str
    tenant_id: str
    client_id: str
    authority_host: str = "https://login.microsoftonline.com"
    client_secret: str | None = field(default=None, repr=False)
    certificate_file: str | None = None
    private_key_file: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    page_size: int = 1000
    timeout_s: float = 30.0
    max_attempts: int = 5
    # Requests in flight at most (adaptive concurrency starts here and halves on the per-tenant message).
    max_concurrency: int = 4
    # Requests in a row failing at the service before a batch stops (Exchange is down).
    breaker_threshold: int = 5
    # How a byte array's Data travels: "base64" or "integers" (unknown for the service; see certsync probe).
    byte_encoding: str = "base64"
    # A delta read asks for recipients changed since the newest WhenChanged read before, minus this
    # much: a write can stay invisible to reads for minutes, and its stamp is its commit time.
    changed_overlap_minutes: int = 30


@dataclass(frozen=True)
class SettingNames:
    """Where the settings were read from, so that every later message names what was used."""

    ldap_conn_id: str = LDAP_CONN_ID
    exchange_conn_id: str = EXCHANGE_CONN_ID
    postgres_conn_id: str = POSTGRES_CONN_ID
    config_variable: str = CONFIG_VARIABLE

    def check(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            # Airflow's own rule for ids; anything else cannot be an env var or a UI entry.
            if not isinstance(value, str) or not re.fullmatch(r"[\w.-]+", value):
                raise ConfigError(f"{name} must be a connection or variable id, not {value!r}")


# Each publish batch is a mapped task, and Airflow spends about 1.8 s scheduling and starting one
# whatever its size: at 100,000 users on one 2-slot Celery worker, 243 batches of 200 published in
# 420 s and 49 of 1,000 in 189 s (bench/README.md, "One Celery worker or two").
DEFAULT_PUBLISH_BATCH_SIZE = 1000


@dataclass(frozen=True)
class SyncSettings:
    directory: DirectorySettings
    exchange: ExchangeSettings
    trust: TrustSpec
    names: SettingNames = field(default_factory=SettingNames)
    database_dsn: str = field(default="", repr=False)
    removal_threshold: int = 500
    publish_batch_size: int = DEFAULT_PUBLISH_BATCH_SIZE
    validation_processes: int = 2
    # How long a stage waits for another run to finish before it is refused (0: refuse at once).
    run_lock_wait_s: int = 600
    # Seconds a run may publish, from its first request, before it defers the rest to the next run (0: none).
    publish_time_box_s: int = 0
    # The key that signs audit rows (connection certsync_audit_signing); a run refuses to start without.
    audit_signer: AuditSigner | None = field(default=None, repr=False)
    # Where each run appends its signed audit checkpoint (checkpoints.jsonl); None: only the run's summary.
    audit_checkpoint_dir: Path | None = None
    # verify_audit checks only the rows since its last signed verification mark, and the whole log
    # when the last full check is older than this many days (0: only when asked).
    audit_full_verify_days: int = 7
    # Days the per-run working tables (staging, value results, plans, snapshots) are kept; 0: forever.
    retention_days: int = 90
    # A delta run reads everything when the last full read is older than this (None: never).
    full_read_every: timedelta | None = timedelta(hours=24)
    disabled_accounts: str = "withdraw"
    left_scope: str = "withdraw"
    # PostgreSQL's work_mem for the plan's transaction; 0: the server's own setting. The plan reads
    # its users in parts small enough for the server's default (planning.USERS_PER_PART).
    plan_work_mem_mb: int = 64


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _require(conn: Connection | None, conn_id: str) -> Connection:
    if conn is None:
        raise ConfigError(
            f"connection {conn_id!r} is not configured (set it in Airflow or as AIRFLOW_CONN_{conn_id.upper()})"
        )
    return conn


def directory_settings(conn: Connection) -> DirectorySettings:
    from certsync.directory import DirectorySettings
    from certsync.directory.settings import split_dns

    extra = conn.extra
    if conn.conn_type not in LDAP_CONN_TYPES:
        raise ConfigError(
            f"connection {conn.conn_id!r}: type must be {LDAP_CONN_TYPE}, ldap or ldaps, not {conn.conn_type!r}"
        )
    scheme = "ldaps" if conn.conn_type == "ldaps" or _flag(extra.get("use_ssl", "")) else "ldap"
    if not conn.host:
        raise ConfigError(f"connection {conn.conn_id!r}: host is required")
    if not conn.login:
        raise ConfigError(f"connection {conn.conn_id!r}: login (bind DN) is required")
    try:
        return DirectorySettings(
            url=f"{scheme}://{_netloc(conn, auth=False)}",
            bind_dn=conn.login,
            password=conn.password,
            base_dn=";".join(split_dns(extra.get("base_dn") or "")),
            search_filter=str(extra.get("search_filter") or "") or None,
            group_dn=str(extra.get("group_dn") or "") or None,
            page_size=_int_setting(f"connection {conn.conn_id!r}", extra, "page_size", 500, minimum=1),
            time_limit_s=_int_setting(f"connection {conn.conn_id!r}", extra, "time_limit_s", 120, minimum=1),
            ca_file=extra.get("ca_file"),
            start_tls=_flag(extra.get("start_tls", "")),
            allow_plain_bind=_flag(extra.get("allow_plain_bind", "")),
            change_tracking=str(extra.get("change_tracking") or "usn"),
        )
    except ValueError as exc:
        raise ConfigError(f"connection {conn.conn_id!r}: {exc}") from None


def exchange_settings(conn: Connection) -> ExchangeSettings:
    extra = conn.extra
    if conn.conn_type not in EXCHANGE_CONN_TYPES:
        raise ConfigError(
            f"connection {conn.conn_id!r}: type must be {EXCHANGE_CONN_TYPE} or https, not {conn.conn_type!r}"
        )
    if not extra.get("tenant_id"):
        raise ConfigError(f"connection {conn.conn_id!r}: extra.tenant_id is required")
    if not conn.login:
        raise ConfigError(f"connection {conn.conn_id!r}: login (application client id) is required")
    has_cert = bool(extra.get("certificate_file") and extra.get("private_key_file"))
    if not conn.password and not has_cert:
        raise ConfigError(
            f"connection {conn.conn_id!r}: give a client secret (password) or "
            "extra.certificate_file and extra.private_key_file"
        )
    host = conn if conn.host else dataclasses.replace(conn, host="outlook.office365.com")
    return ExchangeSettings(
        base_url=f"https://{_netloc(host, auth=False)}",
        tenant_id=str(extra["tenant_id"]),
        client_id=conn.login,
        authority_host=str(extra.get("authority_host") or "https://login.microsoftonline.com"),
        client_secret=conn.password or None,
        certificate_file=extra.get("certificate_file"),
        private_key_file=extra.get("private_key_file"),
        ca_file=extra.get("ca_file"),
        page_size=_int_setting(f"connection {conn.conn_id!r}", extra, "page_size", 1000, minimum=1),
        max_concurrency=_int_setting(f"connection {conn.conn_id!r}", extra, "max_concurrency", 4, minimum=1),
        breaker_threshold=_int_setting(
            f"connection {conn.conn_id!r}", extra, "breaker_threshold", 5, minimum=1
        ),
        byte_encoding=_byte_encoding(conn, extra),
        changed_overlap_minutes=_int_setting(
            f"connection {conn.conn_id!r}", extra, "changed_overlap_minutes", 30, minimum=0
        ),
    )


def _byte_encoding(conn: Connection, extra: dict[str, Any]) -> str:
    value = str(extra.get("byte_encoding") or "base64")
    if value not in ("base64", "integers"):
        raise ConfigError(
            f"connection {conn.conn_id!r}: extra.byte_encoding must be base64 or integers, not {value!r}"
        )
    return value


def database_dsn(conn: Connection) -> str:
    if conn.conn_type not in POSTGRES_CONN_TYPES:
        raise ConfigError(
            f"connection {conn.conn_id!r}: type must be {POSTGRES_CONN_TYPE} or postgres, not {conn.conn_type!r}"
        )
    if not conn.host:
        raise ConfigError(f"connection {conn.conn_id!r}: host is required")
    query = "&".join(f"{k}={quote(str(v))}" for k, v in conn.extra.items())
    return f"postgresql://{_netloc(conn, auth=True)}/{conn.schema or 'postgres'}" + (
        f"?{query}" if query else ""
    )


def _int_setting(
    where: str, values: Mapping[str, Any], key: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    value = values.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # URI-form connection extras arrive as strings
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key} must be a whole number >= {minimum}, not {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: {key} must be a whole number <= {maximum}, not {value!r}")
    return value


def _paths_setting(config: Mapping[str, Any], key: str, *, where: str) -> tuple[Path, ...]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a list of file paths, not {value!r}")
    return tuple(map(Path, value))


def trust_settings(config: Mapping[str, Any], *, where: str = f"variable {CONFIG_VARIABLE!r}") -> TrustSpec:
    anchors = config.get("trust_anchors")
    if not anchors or not isinstance(anchors, str):
        raise ConfigError(f"{where}: trust_anchors (PEM file of trusted roots) is required")
    profile = config.get("profile", "enterprise")
    if profile not in PROFILES:
        raise ConfigError(f"{where}: profile must be one of {PROFILES}, not {profile!r}")
    return TrustSpec(
        anchors=Path(anchors),
        intermediates=_paths_setting(config, "intermediates", where=where),
        crls=_paths_setting(config, "crls", where=where),
        profile=profile,
    )


def _config_variable(source: SettingsSource, key: str) -> dict[str, Any]:
    raw = source.variable(key)
    where = f"variable {key!r}"
    if raw is None:
        raise ConfigError(f"{where} is not set (JSON with at least trust_anchors)")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must be a JSON object")
    _refuse_unknown_keys(config, where=where)
    return config


def _refuse_unknown_keys(config: Mapping[str, Any], *, where: str) -> None:
    """A misspelt key would otherwise be ignored and its default used silently (a mistyped
    removal_threshold would leave mass removals guarded by the default): refuse it, naming the
    nearest valid key."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), CONFIG_KEYS, n=1, cutoff=0.6)
        hints.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
    raise ConfigError(
        f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)};"
        f" valid keys: {', '.join(CONFIG_KEYS)}"
    )


def audit_signer(conn: Connection | None) -> AuditSigner | None:
    """The audit signing key from its connection: the password holds the Ed25519 private key (base64
    of its 32-byte seed, or PKCS#8 PEM), extra.previous_key the key it replaces (optional)."""
    from certsync.audit.signing import AuditKeyError, AuditSigner, SigningKey

    if conn is None:
        return None
    where = f"connection {conn.conn_id!r}"
    try:
        key = SigningKey.from_text(conn.password or str(conn.extra.get("private_key", "")), where=where)
        previous = conn.extra.get("previous_key")
        return AuditSigner(
            key=key,
            previous=SigningKey.from_text(str(previous), where=f"{where} extra.previous_key")
            if previous
            else None,
        )
    except AuditKeyError as exc:
        raise ConfigError(str(exc)) from None


def _optional_path(config: Mapping[str, Any], key: str, *, where: str) -> Path | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a directory path, not {value!r}")
    return Path(value)


def load_settings(
    source: SettingsSource,
    *,
    ldap_conn_id: str = LDAP_CONN_ID,
    exchange_conn_id: str = EXCHANGE_CONN_ID,
    postgres_conn_id: str = POSTGRES_CONN_ID,
    config_variable: str = CONFIG_VARIABLE,
) -> SyncSettings:
    """Read and check every setting from the given connection ids and variable; raises
    ConfigError naming the first bad one by the id actually used."""
    names = SettingNames(
        ldap_conn_id=ldap_conn_id,
        exchange_conn_id=exchange_conn_id,
        postgres_conn_id=postgres_conn_id,
        config_variable=config_variable,
    )
    names.check()
    config = _config_variable(source, config_variable)
    where = f"variable {config_variable!r}"
    return SyncSettings(
        directory=directory_settings(_require(source.connection(ldap_conn_id), ldap_conn_id)),
        exchange=exchange_settings(_require(source.connection(exchange_conn_id), exchange_conn_id)),
        trust=trust_settings(config, where=where),
        names=names,
        database_dsn=database_dsn(_require(source.connection(postgres_conn_id), postgres_conn_id)),
        removal_threshold=_int_setting(where, config, "removal_threshold", 500, minimum=0),
        publish_batch_size=_int_setting(
            where, config, "publish_batch_size", DEFAULT_PUBLISH_BATCH_SIZE, minimum=1
        ),
        validation_processes=_int_setting(where, config, "validation_processes", 2, minimum=1),
        run_lock_wait_s=_int_setting(where, config, "run_lock_wait_s", 600, minimum=0),
        publish_time_box_s=_int_setting(where, config, "publish_time_box_s", 0, minimum=0),
        audit_signer=audit_signer(source.connection(AUDIT_SIGNING_CONN_ID)),  # the key is checked at begin
        audit_checkpoint_dir=_optional_path(config, "audit_checkpoint_dir", where=where),
        audit_full_verify_days=_int_setting(where, config, "audit_full_verify_days", 7, minimum=0),
        retention_days=_int_setting(where, config, "retention_days", 90, minimum=0),
        full_read_every=_hours(where, config, "full_read_every_hours", 24),
        disabled_accounts=_choice(where, config, "disabled_accounts", ACCOUNT_POLICIES),
        left_scope=_choice(where, config, "left_scope", ACCOUNT_POLICIES),
        plan_work_mem_mb=_int_setting(
            where, config, "plan_work_mem_mb", 64, minimum=0, maximum=MAX_WORK_MEM_MB
        ),
    )


def _hours(where: str, config: Mapping[str, Any], key: str, default: float) -> timedelta | None:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: {key} must be a number of hours >= 0 (0: never), not {value!r}")
    return timedelta(hours=value) if value else None


def _choice(where: str, config: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = config.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)
