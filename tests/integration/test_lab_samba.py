"""The lab Samba AD DC: provisioning, the domain cache, binding, reuse and the port-389 guard."""

from __future__ import annotations

import stat
from pathlib import Path

import ldap3
import pytest

from certsync_lab.samba import LdapPortBusyError, SambaDC, SambaLabError

pytestmark = pytest.mark.integration


def test_session_dc_binds_as_administrator(samba_dc: SambaDC) -> None:
    conn = samba_dc.connect()
    assert conn.search(samba_dc.base_dn, "(sAMAccountName=Administrator)", attributes=["cn"])
    assert conn.entries[0].entry_dn == samba_dc.bind_dn
    assert samba_dc.base_dn == "DC=corp,DC=example,DC=test"
    assert samba_dc.ldap_url == "ldap://127.0.0.1:389"


def test_wrong_password_is_refused(samba_dc: SambaDC) -> None:
    server = ldap3.Server(samba_dc.ldap_url, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, user=samba_dc.bind_dn, password="not-the-password-1A!")
    assert not conn.bind()
    assert conn.result["description"] == "invalidCredentials"


def test_password_is_private_and_never_in_repr(samba_dc: SambaDC) -> None:
    mode = stat.S_IMODE((samba_dc.home / "admin.password").stat().st_mode)
    assert mode == 0o600
    assert len(samba_dc.password) >= 24
    assert samba_dc.password not in repr(samba_dc)


def test_second_home_restores_from_cache_with_rewritten_paths(samba_dc: SambaDC, tmp_path: Path) -> None:
    copy = SambaDC(home=tmp_path / "dc2", cache_dir=samba_dc.cache_dir)
    copy.ensure_provisioned()
    assert copy.restored_from_cache is True
    assert copy.timings["restore"] < 5
    conf = copy.smb_conf.read_text()
    assert f"private dir = {copy.home}/private" in conf
    assert str(samba_dc.home) not in conf
    # Same cached domain, so the same administrator credentials.
    assert copy.password == samba_dc.password


def test_another_home_cannot_take_port_389(samba_dc: SambaDC, tmp_path: Path) -> None:
    other = SambaDC(home=tmp_path / "dc3", cache_dir=samba_dc.cache_dir)
    with pytest.raises(LdapPortBusyError, match="389"):
        other.start()
    assert not other.running
    assert samba_dc.running


def test_same_home_reuses_the_running_dc_and_leaves_it_up(samba_dc: SambaDC) -> None:
    with SambaDC(home=samba_dc.home, cache_dir=samba_dc.cache_dir) as again:
        assert again.running
        assert again.timings["start"] < 2
    # Leaving the reusing context must not stop the session's DC.
    assert samba_dc.running
    samba_dc.connect().unbind()


def test_cold_provision_fills_an_empty_cache(tmp_path: Path) -> None:
    dc = SambaDC(home=tmp_path / "cold", cache_dir=tmp_path / "cache")
    dc.ensure_provisioned()
    assert dc.restored_from_cache is False
    tarballs = list((tmp_path / "cache").glob("samba-dc-*.tar.gz"))
    assert len(tarballs) == 1
    # The tarball holds the administrator password.
    assert stat.S_IMODE(tarballs[0].stat().st_mode) == 0o600
    assert "server services = ldap" in dc.smb_conf.read_text()


def test_refuses_a_non_empty_unprovisioned_home(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(SambaLabError, match="not empty"):
        SambaDC(home=tmp_path / "junk", cache_dir=tmp_path / "cache").ensure_provisioned()
