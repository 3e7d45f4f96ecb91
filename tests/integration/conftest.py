"""Session fixtures for the real services: a Samba AD DC and an embedded PostgreSQL.

The provisioned Samba domain and the PKI's keys are cached under <repo>/.certsync/test-cache (or
$CERTSYNC_TEST_CACHE), so only the very first run pays for provisioning. Samba serves LDAP on the fixed
port 389: one DC per machine (or network namespace) at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certsync_lab.pki import Pki
from certsync_lab.population import SeedUser, generate_population, load_population
from certsync_lab.postgres import EmbeddedPostgres
from certsync_lab.samba import SambaDC

REPO = Path(__file__).resolve().parents[2]
LAB_AT = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def lab_cache_dir() -> Path:
    """Survives test sessions: the Samba tarball and the PKI key pool live here."""
    path = Path(os.environ.get("CERTSYNC_TEST_CACHE", REPO / ".certsync" / "test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def samba_dc(tmp_path_factory: pytest.TempPathFactory, lab_cache_dir: Path) -> Iterator[SambaDC]:
    """A running DC, restored from the cached domain into a fresh home for this session."""
    home = tmp_path_factory.mktemp("samba") / "dc"
    dc = SambaDC(home=home, cache_dir=lab_cache_dir / "samba")
    with dc:
        yield dc


@pytest.fixture(scope="session")
def embedded_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A running PostgreSQL with a fresh cluster for this session (initdb takes under a second)."""
    with EmbeddedPostgres(data_dir=tmp_path_factory.mktemp("pg") / "data") as pg:
        yield pg


@pytest.fixture(scope="session")
def lab_at() -> datetime:
    """The validation time the lab population was planted for."""
    return LAB_AT


@pytest.fixture(scope="session")
def lab_pki(lab_cache_dir: Path) -> Pki:
    return Pki(seed=0, key_cache=lab_cache_dir / "pki-keys")


@pytest.fixture(scope="session")
def lab_population(lab_pki: Pki) -> list[SeedUser]:
    """50 users with every planted scenario, as of LAB_AT."""
    return generate_population(count=50, pki=lab_pki, seed=0, at=LAB_AT)


@pytest.fixture(scope="session")
def populated_dc(samba_dc: SambaDC, lab_population: list[SeedUser]) -> SambaDC:
    """The session DC with `lab_population` loaded into samba_dc.users_ou (use other OUs to write)."""
    load_population(
        url=samba_dc.ldap_url,
        bind_dn=samba_dc.bind_dn,
        password=samba_dc.password,
        ou_dn=samba_dc.users_ou,
        users=lab_population,
    )
    return samba_dc


# --- the whole stack for pipeline tests: seeded DC, emulator seeded from it, trust files, settings ---


@pytest.fixture(scope="session")
def trust_files(lab_pki: Pki, lab_population: list[SeedUser], tmp_path_factory: pytest.TempPathFactory):
    """Trust anchors, intermediates and CRLs (written after the population: CRLs list its revocations)."""
    from datetime import timedelta

    return lab_pki.write_trust_files(
        tmp_path_factory.mktemp("trust"),
        crl_this_update=LAB_AT - timedelta(days=1),
        crl_next_update=LAB_AT + timedelta(days=30),
    )


@pytest.fixture(scope="session")
def app_credential_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The lab application's certificate, key and client secret."""
    from certsync_lab.stack import app_credentials

    return app_credentials(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="session")
def emulator_stack(populated_dc: SambaDC, app_credential_files, tmp_path_factory: pytest.TempPathFactory):
    """The Exchange Online emulator, one recipient per seeded user, and the lab's app credentials."""
    from emulator_support import seeded_emulator

    with seeded_emulator(tmp_path_factory.mktemp("emulator"), populated_dc, app_credential_files) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def own_tenant(populated_dc: SambaDC, app_credential_files, tmp_path_factory: pytest.TempPathFactory):
    """An emulator of the requesting module's own, as seeded: for a module whose runs publish (other
    modules on the worker expect the session's tenant as seeded), or one that needs it so."""
    from emulator_support import seeded_emulator

    with seeded_emulator(tmp_path_factory.mktemp("emulator"), populated_dc, app_credential_files) as tenant:
        yield tenant


@pytest.fixture(scope="session")
def sync_env(
    populated_dc: SambaDC, embedded_pg: EmbeddedPostgres, emulator_stack, trust_files, app_credential_files
):
    """AIRFLOW_CONN_* / AIRFLOW_VAR_* for the pipeline against the session's real services."""

    from emulator_support import app_connections

    from certsync_lab.stack import sync_environment

    connections = app_connections(
        dc=populated_dc,
        emulator=emulator_stack,
        credentials=app_credential_files,
        pg=embedded_pg,
        database="certsync",
    )
    config = {
        "trust_anchors": str(trust_files.anchors),
        "intermediates": [str(trust_files.intermediates)],
        "crls": [str(p) for p in trust_files.crls],
        "publish_batch_size": 10,
    }
    return sync_environment(connections, config)


@pytest.fixture(scope="module")
def own_sync_env(
    request: pytest.FixtureRequest, sync_env, populated_dc: SambaDC, embedded_pg: EmbeddedPostgres,
    own_tenant, app_credential_files,
) -> dict[str, str]:  # fmt: skip
    """sync_env over a tenant and a database of the requesting module's own (the database named by
    its DATABASE): for a module whose runs publish, so that no other module's runs depend on the
    order the modules ran in."""
    from emulator_support import app_connections

    from certsync_lab.stack import sync_environment

    connections = app_connections(
        dc=populated_dc,
        emulator=own_tenant,
        credentials=app_credential_files,
        pg=embedded_pg,
        database=request.module.DATABASE,
    )
    return sync_environment(connections, json.loads(sync_env["AIRFLOW_VAR_CERTSYNC_CONFIG"]))


# --- the certsync DAG in this process, as dag.test() runs it ---


@contextmanager
def airflow_settings(changes: dict[str, str]) -> Iterator[dict[str, str]]:
    """Put AIRFLOW_CONN_* / AIRFLOW_VAR_* settings into this process's environment (where dag.test()
    reads them) over a migrated metadata database; restore the environment afterwards."""
    from certsync.airflow import adapter

    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    adapter._services_for.cache_clear()  # settings are read once per process: not an earlier module's
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    try:
        yield changes
    finally:
        adapter._services_for.cache_clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def certsync_dag():  # type: ignore[no-untyped-def]
    """The certsync DAG parsed from the repository's DAG folder, as the dag processor parses it."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).dags["certsync"]
