"""Session fixtures for the real services: a Samba AD DC and an embedded PostgreSQL.

The provisioned Samba domain and the PKI's keys are cached under <repo>/.certsync/test-cache (or
$CERTSYNC_TEST_CACHE), so only the very first run pays for provisioning. Samba serves LDAP on the fixed
port 389: one DC per machine (or network namespace) at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from certsync.lab.pki import Pki
from certsync.lab.population import SeedUser, generate_population, load_population
from certsync.lab.postgres import EmbeddedPostgres
from certsync.lab.samba import SambaDC

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
