"""What Airflow learns about certsync through the `apache_airflow_provider` entry point."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "certsync",
        "name": "certsync",
        "description": "S/MIME certificates from Active Directory to Exchange Online.",
        "versions": ["0.2.0"],
    }
