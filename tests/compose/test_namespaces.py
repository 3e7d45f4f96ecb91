"""The namespace runner itself, on small compose files: a service that dies fails the start at once,
and running a command in a service (as its health checks do) leaves the scripts it starts from alone.

Needs root (namespaces, mounts) and Debian's postgresql package, as the compose tests do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.compose.namespaces import ComposeError, NamespaceStack

pytestmark = pytest.mark.integration

HEALTHY_PROMPTLY = {"interval": "1s", "start_period": "30s", "start_interval": "1s", "retries": 3}


def _stack(tmp_path: Path, services: dict[str, object]) -> NamespaceStack:
    compose_file = tmp_path / "compose.yml"
    compose_file.write_text(yaml.safe_dump({"services": services}))
    return NamespaceStack(compose_file=compose_file, workdir=tmp_path / "run", env={})


def test_a_service_that_dies_fails_the_start_at_once(tmp_path: Path) -> None:
    # `waits` can never start: what it waits for exits. Before, the runner looked at exits only once
    # every service had started, so this stack spent its whole timeout "not up".
    stack = _stack(
        tmp_path,
        {
            "dies": {
                "image": "redis:7",
                "command": ["sh", "-c", "echo giving up; exit 3"],
                "healthcheck": {"test": ["CMD", "true"], **HEALTHY_PROMPTLY},
            },
            "waits": {"image": "redis:7", "depends_on": {"dies": {"condition": "service_healthy"}}},
        },
    )
    with stack, pytest.raises(ComposeError, match="dies exited with 3:\ngiving up"):
        stack.up(timeout=300)
    assert stack.status()["waits"] == "waiting"


def test_commands_in_a_service_leave_its_scripts_alone(tmp_path: Path) -> None:
    # A health check of PostgreSQL once rewrote its entrypoint while the service's shell was
    # opening it; the shell read an empty file and the service "exited 0" with nothing in its log.
    stack = _stack(
        tmp_path,
        {
            "db": {
                "image": "postgres:17",
                "environment": {"POSTGRES_PASSWORD": "lab"},
                "healthcheck": {"test": ["CMD", "pg_isready", "-U", "postgres"], **HEALTHY_PROMPTLY},
            }
        },
    )
    with stack:
        stack.up(timeout=120)
        scripts = sorted((tmp_path / "run" / "services" / "db").glob("*.sh"))
        assert [path.name for path in scripts] == ["postgres-entrypoint.sh", "setup.sh"]
        written = {path: path.stat().st_mtime_ns for path in scripts}
        for _ in range(3):
            assert stack.exec("db", ["pg_isready", "-U", "postgres"]).returncode == 0
        assert {path: path.stat().st_mtime_ns for path in scripts} == written
        assert stack.status() == {"db": "healthy"}
