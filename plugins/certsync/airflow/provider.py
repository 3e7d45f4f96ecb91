"""What Airflow learns about certsync through the `apache_airflow_provider` entry point.

Airflow reads this for every command and for the connection form, so it stays plain data: no
Airflow or certsync import. The form of each connection type (extra fields, hidden and relabelled
standard fields, placeholders) is declared here, as Airflow 3.2+ expects, instead of in the hooks.
"""

from __future__ import annotations

from typing import Any

HOOKS_MODULE = "certsync.airflow.hooks"
INTEGRATION = "certsync"


def _field(label: str, kind: str, description: str, default: Any = None, **schema: Any) -> dict[str, Any]:
    """One extra field of the connection form (a JSON schema; null means "not set")."""
    spec: dict[str, Any] = {"type": [kind, "null"], **schema}
    if default is not None:
        spec["default"] = default
    return {"label": label, "description": description, "schema": spec}


LDAP_FIELDS = {
    "base_dn": _field("Base DN", "string", "Users are read below this DN (several: separate with ;)."),
    "search_filter": _field("Search filter", "string", "Extra LDAP filter, ANDed with the user filter."),
    "group_dn": _field("Group DN", "string", "Only members of this group (nested groups count)."),
    "use_ssl": _field("Use LDAPS", "boolean", "Connect with TLS from the start (port 636).", False),
    "start_tls": _field("StartTLS", "boolean", "Upgrade a plain LDAP connection with StartTLS.", False),
    "ca_file": _field("CA file", "string", "PEM file of the CAs that issued the DC's certificate."),
    "allow_plain_bind": _field(
        "Allow plain bind", "boolean", "Bind without TLS (the password travels in clear): labs only.", False
    ),
    "page_size": _field("Page size", "integer", "Entries per LDAP page.", 500, minimum=1, maximum=1000),
    "time_limit_s": _field("Time limit (s)", "integer", "Server time limit per search.", 120, minimum=1),
    "change_tracking": _field(
        "Change tracking",
        "string",
        "How a delta finds changes: uSNChanged or DirSync.",
        "usn",
        enum=["usn", "dirsync", None],
    ),
}

EXCHANGE_FIELDS = {
    "tenant_id": _field("Tenant ID", "string", "The tenant's GUID or its initial domain."),
    "authority_host": _field(
        "Authority host", "string", "Token endpoint host.", "https://login.microsoftonline.com"
    ),
    "certificate_file": _field("Certificate file", "string", "PEM certificate of the application."),
    "private_key_file": _field("Private key file", "string", "PEM private key of that certificate."),
    "ca_file": _field("CA file", "string", "PEM CAs to trust for the endpoints (default: the system's)."),
    "page_size": _field("Page size", "integer", "Recipients per page read.", 1000, minimum=1),
}

POSTGRES_FIELDS = {
    "sslmode": _field(
        "SSL mode",
        "string",
        "libpq sslmode (disable, prefer, require, verify-ca, verify-full).",
        enum=["disable", "allow", "prefer", "require", "verify-ca", "verify-full", None],
    ),
    "sslrootcert": _field("SSL root certificate", "string", "PEM CAs for verify-ca / verify-full."),
}

CONNECTION_TYPES: list[dict[str, Any]] = [
    {
        "connection-type": "certsync_ldap",
        "hook-class-name": f"{HOOKS_MODULE}.CertsyncLdapHook",
        "hook-name": "certsync: Active Directory (LDAP)",
        "conn-fields": LDAP_FIELDS,
        "ui-field-behaviour": {
            "hidden-fields": ["schema"],
            "relabeling": {"host": "Domain controller", "login": "Bind DN", "password": "Bind password"},
            "placeholders": {
                "host": "dc1.corp.example",
                "port": "389 (636 with LDAPS)",
                "login": "CN=certsync,OU=Service Accounts,DC=corp,DC=example",
                "base_dn": "OU=People,DC=corp,DC=example",
                "ca_file": "/etc/ssl/certs/corp-ca.pem",
            },
        },
    },
    {
        "connection-type": "certsync_exchange",
        "hook-class-name": f"{HOOKS_MODULE}.CertsyncExchangeHook",
        "hook-name": "certsync: Exchange Online",
        "conn-fields": EXCHANGE_FIELDS,
        "ui-field-behaviour": {
            "hidden-fields": ["schema"],
            "relabeling": {
                "host": "Exchange Online host",
                "login": "Application (client) ID",
                "password": "Client secret (or a certificate below)",
            },
            "placeholders": {
                "host": "outlook.office365.com",
                "port": "443",
                "login": "00000000-0000-0000-0000-000000000000",
                "tenant_id": "contoso.onmicrosoft.com",
            },
        },
    },
    {
        "connection-type": "certsync_postgres",
        "hook-class-name": f"{HOOKS_MODULE}.CertsyncPostgresHook",
        "hook-name": "certsync: audit store (PostgreSQL)",
        "conn-fields": POSTGRES_FIELDS,
        "ui-field-behaviour": {
            "hidden-fields": [],
            "relabeling": {"schema": "Database", "login": "Login (the certsync_app role)"},
            "placeholders": {
                "host": "db.corp.example",
                "port": "5432",
                "login": "certsync_app",
                "schema": "certsync",
            },
        },
    },
]


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "certsync",
        "name": "certsync",
        "description": "S/MIME certificates from Active Directory to Exchange Online.",
        "versions": ["0.2.0"],
        "integrations": [
            {"integration-name": INTEGRATION, "tags": ["service"]},
        ],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": [HOOKS_MODULE]}],
        "connection-types": CONNECTION_TYPES,
    }
