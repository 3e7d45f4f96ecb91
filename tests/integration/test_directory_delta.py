"""Full and delta reads against the Samba AD DC: after each change (edits, renames, moves, deletions,
disabling, group membership, a DC switch) the source view a delta leaves is exactly what a full read
of the same scope gives, and a run killed mid-extraction loses nothing.

Everything lives in OUs of its own (the session's People OU is left alone) and a database of its own
(the watermark is per database).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import ldap3
import pytest
import sqlalchemy as sa

from certsync.config import database_dsn
from certsync.directory import DirectoryError, DirectoryReader, DirectorySettings
from certsync.store import db, runs, source
from certsync_lab.stack import certsync_database

UAC_ENABLED, UAC_DISABLED = 512, 514
WHEN = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def ous(samba_dc) -> dict[str, str]:
    return _make_ous(samba_dc, "delta")


def _make_ous(samba_dc, prefix: str) -> dict[str, str]:
    base = samba_dc.base_dn
    names = {k: f"OU={prefix}-{k},{base}" for k in ("a", "b", "out", "groups", "bulk")}
    conn = samba_dc.connect()
    for dn in names.values():
        assert conn.add(dn, "organizationalUnit") or conn.result["result"] == 68, conn.result
    names["group"] = f"CN=smime-users,{names['groups']}"
    names["nested"] = f"CN=smime-nested,{names['groups']}"
    for dn in (names["group"], names["nested"]):
        cn = dn.split(",", 1)[0][3:]
        assert conn.add(dn, ["top", "group"], {"sAMAccountName": f"{prefix}-{cn}"[:60]}), conn.result
    _members(conn, names["group"], ldap3.MODIFY_ADD, names["nested"])
    conn.unbind()
    return names


@pytest.fixture(scope="module")
def engine(embedded_pg):
    dsn = database_dsn(certsync_database(embedded_pg, "certsync_directory"))
    engine = db.create_engine(dsn)
    yield engine
    engine.dispose()


@pytest.fixture()
def ldap(samba_dc) -> Iterator[ldap3.Connection]:
    conn = samba_dc.connect()
    yield conn
    conn.unbind()


def _members(conn: ldap3.Connection, group: str, op: str, *dns: str) -> None:
    assert conn.modify(group, {"member": [(op, list(dns))]}), conn.result


def _add(conn: ldap3.Connection, ou: str, name: str, *, cert: bytes | None = None) -> str:
    dn = f"CN={name},{ou}"
    attrs = {
        "sAMAccountName": f"{name[:12]}-{zlib.crc32(ou.lower().encode()) % 10**6}",  # unique per OU
        "mail": f"{name}@corp.example.test",
        "userAccountControl": str(UAC_ENABLED),
        "userCertificate": [cert or os.urandom(48)],
    }
    assert conn.add(dn, ["top", "person", "organizationalPerson", "user"], attrs), conn.result
    return dn


def _settings(samba_dc, ous, **changes) -> DirectorySettings:
    values = {
        "url": samba_dc.ldap_url,
        "bind_dn": samba_dc.bind_dn,
        "password": samba_dc.password,
        "base_dn": f"{ous['a']};{ous['b']}",
        "group_dn": ous["group"],
        "allow_plain_bind": True,
        "page_size": 2,  # several pages even for this small scope
    }
    return DirectorySettings(**{**values, **changes})


def _extract(engine, settings: DirectorySettings, key: str, *, mode: str = "delta", **kw) -> dict:
    with engine.begin() as conn:
        run_id = runs.begin_run(
            conn, dag_id="directory-test", airflow_run_id=key, logical_date=WHEN, mode=mode,
            dry_run=True, trust_fingerprint="-",
        )  # fmt: skip
    with engine.begin() as conn:
        return source.extract(
            conn, reader=DirectoryReader(settings=settings), run_id=run_id, full_every=kw.get("full_every")
        )


def _view(engine) -> dict[uuid.UUID, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT u.object_guid, u.dn, u.mail, u.user_account_control,"
                " array(SELECT encode(v.sha256, 'hex') FROM certsync.source_value v"
                "       WHERE v.object_guid = u.object_guid ORDER BY 1) AS values"
                " FROM certsync.source_user u"
            )
        )
        return {r.object_guid: (r.dn.lower(), r.mail, r.user_account_control, tuple(r.values)) for r in rows}


def _truth(settings: DirectorySettings) -> dict[uuid.UUID, tuple]:
    """What a full read of the scope gives now (read, not stored)."""
    import hashlib

    return {
        u.object_guid: (
            u.dn.lower(), u.mail, u.user_account_control,
            tuple(sorted(hashlib.sha256(v).hexdigest() for v in u.user_certificate + u.user_smime_certificate)),
        )
        for u in DirectoryReader(settings=settings).iter_users()
    }  # fmt: skip


def _gone(engine) -> dict[uuid.UUID, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT object_guid, reason FROM certsync.source_gone")).all())


def _guid(ldap: ldap3.Connection, dn: str) -> uuid.UUID:
    ldap.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["objectGUID"])
    return uuid.UUID(bytes_le=bytes(ldap.response[0]["raw_attributes"]["objectGUID"][0]))


@pytest.mark.parametrize("tracking", ["usn", "dirsync"])
def test_deltas_follow_every_kind_of_change(samba_dc, engine, ldap, tracking: str) -> None:
    ous = _make_ous(samba_dc, f"delta-{tracking}")
    settings = _settings(samba_dc, ous, change_tracking=tracking)
    dns = {n: _add(ldap, ous["a"], n) for n in ("anna", "bert", "carl", "dora", "emil")}
    _members(ldap, ous["group"], ldap3.MODIFY_ADD, dns["anna"], dns["bert"], dns["carl"])
    _members(ldap, ous["nested"], ldap3.MODIFY_ADD, dns["dora"])  # emil: in the OU, not the group
    guid = {n: _guid(ldap, dn) for n, dn in dns.items()}

    first = _extract(engine, settings, f"{tracking}-d1")
    assert first["mode"] == "full"
    assert _view(engine) == _truth(settings) and set(_view(engine)) == {
        guid[n] for n in ("anna", "bert", "carl", "dora")
    }
    quiet = _extract(engine, settings, f"{tracking}-d2")
    assert (quiet["mode"], quiet["users"], quiet["gone"]) == ("delta", 0, 0)

    # Edits, a rename and a move within the scope keep each identity.
    ldap.modify(dns["anna"], {"mail": [(ldap3.MODIFY_REPLACE, ["anna.new@corp.example.test"])]})
    ldap.modify(dns["anna"], {"userCertificate": [(ldap3.MODIFY_ADD, [os.urandom(40)])]})
    assert ldap.modify_dn(dns["bert"], "CN=bertram"), ldap.result
    assert ldap.modify_dn(dns["carl"], "CN=carl", new_superior=ous["b"]), ldap.result
    changed = _extract(engine, settings, f"{tracking}-d3")
    assert (changed["mode"], changed["users"], changed["gone"]) == ("delta", 3, 0)
    view = _view(engine)
    assert view == _truth(settings)
    assert view[guid["anna"]][1] == "anna.new@corp.example.test" and len(view[guid["anna"]][3]) == 2
    assert view[guid["bert"]][0].startswith("cn=bertram,") and view[guid["carl"]][0].endswith(
        ous["b"].lower()
    )

    # A deletion (tombstone), a move out of the scope, a disabled account.
    assert ldap.delete(dns["anna"]), ldap.result
    assert ldap.modify_dn(f"CN=bertram,{ous['a']}", "CN=bertram", new_superior=ous["out"]), ldap.result
    ldap.modify(f"CN=carl,{ous['b']}", {"userAccountControl": [(ldap3.MODIFY_REPLACE, [str(UAC_DISABLED)])]})
    third = _extract(engine, settings, f"{tracking}-d4")
    assert (third["mode"], third["deleted"], third["left_scope"], third["gone"]) == ("delta", 1, 1, 2)
    assert _view(engine) == _truth(settings)
    assert _view(engine)[guid["carl"]][2] == UAC_DISABLED
    mine = set(guid.values())  # the other tracking's run left its own users gone
    assert {g: r for g, r in _gone(engine).items() if g in mine} == {
        guid["anna"]: "deleted",
        guid["bert"]: "left_scope",
    }

    # Group membership: a member removed (the user's own USN does not move), a nested one added.
    _members(ldap, ous["nested"], ldap3.MODIFY_DELETE, dns["dora"])
    _members(ldap, ous["nested"], ldap3.MODIFY_ADD, dns["emil"])
    fourth = _extract(engine, settings, f"{tracking}-d5")
    assert (fourth["mode"], fourth["users"], fourth["left_scope"]) == ("delta", 1, 1)
    assert (
        _view(engine) == _truth(settings)
        and guid["emil"] in _view(engine)
        and guid["dora"] not in _view(engine)
    )
    assert _gone(engine)[guid["dora"]] == "left_scope"

    # Back in scope: no longer gone.
    _members(ldap, ous["group"], ldap3.MODIFY_ADD, dns["dora"])
    _extract(engine, settings, f"{tracking}-d6")
    assert guid["dora"] in _view(engine) and guid["dora"] not in _gone(engine)
    assert _view(engine) == _truth(settings)


def test_another_dc_or_a_restored_one_forces_a_full_read(samba_dc, ous, engine, ldap) -> None:
    """USNs are per DC. Answering from a second DC cannot be staged with one Samba, so the stored
    watermark is made to come from another DC (or from this DC before a restore, which changes its
    invocationId): that is exactly what the next run compares with what the rootDSE says now."""
    settings = _settings(samba_dc, ous)
    _extract(engine, settings, "dc1")
    # A change the watermark's DC never saw under that USN numbering: only a full read is safe.
    late = _add(ldap, ous["b"], "fritz")
    _members(ldap, ous["group"], ldap3.MODIFY_ADD, late)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE certsync.directory_watermark SET highest_usn = highest_usn + 100000,"
            " dc_service_name = replace(dc_service_name, 'CN=DC1,', 'CN=DC2,')"
        ))  # fmt: skip
    switched = _extract(engine, settings, "dc2")
    assert switched["mode"] == "full" and switched["why"].startswith("another DC answered")
    assert _guid(ldap, late) in _view(engine) and _view(engine) == _truth(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE certsync.directory_watermark SET invocation_id = gen_random_uuid()"))
    restored = _extract(engine, settings, "dc3")
    assert restored["mode"] == "full" and "invocationId" in restored["why"]
    assert _extract(engine, settings, "dc4")["mode"] == "delta"
    # The schedule: a delta becomes a full read once the last one is old enough.
    assert _extract(engine, settings, "dc5", full_every=timedelta(0))["why"].startswith("the last full read")
    # A changed scope is another scope.
    other = _extract(engine, _settings(samba_dc, ous, search_filter="(mail=*)"), "dc6")
    assert (other["mode"], other["why"]) == ("full", "the scope changed")


KILLED_EXTRACT = """
import sys
from certsync.directory import DirectoryError, DirectoryReader, DirectorySettings
from certsync.store import db, source
settings = DirectorySettings(url=sys.argv[2], bind_dn=sys.argv[3], password=sys.stdin.read(),
                             base_dn=sys.argv[4], allow_plain_bind=True, page_size=1)
with db.create_engine(sys.argv[1]).begin() as conn:
    source.extract(conn, reader=DirectoryReader(settings=settings), run_id=int(sys.argv[5]), full_every=None)
"""


def test_a_run_killed_mid_extraction_loses_nothing(samba_dc, ous, engine, ldap) -> None:
    settings = _settings(samba_dc, ous, base_dn=ous["bulk"], group_dn=None)
    bulk = [_add(ldap, ous["bulk"], f"bulk{i:03d}") for i in range(60)]
    _extract(engine, settings, "k1", mode="full")
    before_view = _view(engine)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT highest_usn, run_id FROM certsync.directory_watermark")).one()
    # Changes the killed run is reading when it dies; the next run must still see them.
    for dn in bulk[::6]:
        ldap.modify(dn, {"userCertificate": [(ldap3.MODIFY_ADD, [os.urandom(32)])]})
    assert ldap.delete(bulk[1])
    with engine.begin() as conn:
        killed_id = runs.begin_run(
            conn, dag_id="directory-test", airflow_run_id="k2", logical_date=WHEN, mode="full",
            dry_run=True, trust_fingerprint="-",
        )  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXTRACT, str(engine.url.render_as_string(hide_password=False)),
         samba_dc.ldap_url, samba_dc.bind_dn, ous["bulk"], str(killed_id)],
        stdin=subprocess.PIPE, text=True,
    )  # fmt: skip
    child.stdin.write(samba_dc.password)
    child.stdin.close()
    assert _wait_for_copy(engine, child), "the extract never reached its COPY"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT highest_usn, run_id FROM certsync.directory_watermark")).one()
        staged = conn.execute(
            sa.text("SELECT count(*) FROM certsync.staging_user WHERE run_id = :r"), {"r": killed_id}
        )
        assert tuple(after) == tuple(before) and staged.scalar_one() == 0
    # The retried run (the same run, a full read as registered) reads what the killed one missed,
    # and the watermark it commits leaves nothing for the next delta.
    retried = _extract(engine, settings, "k2")
    assert (retried["mode"], retried["deleted"]) == ("full", 1)
    assert _view_of(engine, ous["bulk"]) == _truth(settings)
    assert _gone(engine)[_guid_deleted(bulk[1], before_view)] == "deleted"
    assert _extract(engine, settings, "k3")["users"] == 0


def _view_of(engine, ou: str) -> dict[uuid.UUID, tuple]:
    return {g: v for g, v in _view(engine).items() if v[0].endswith(ou.lower())}


def _wait_for_copy(engine, child: subprocess.Popen, timeout: float = 20.0) -> bool:
    """Until the child's transaction has staged something (a COPY ran or runs): mid-extraction."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline and child.poll() is None:
            busy = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"
                " AND query LIKE 'COPY certsync.staging%'"
            )).scalar_one()  # fmt: skip
            conn.rollback()
            if busy:
                return True
            time.sleep(0.005)
    return False


def _guid_deleted(dn: str, view: dict[uuid.UUID, tuple]) -> uuid.UUID:
    return next(g for g, v in view.items() if v[0] == dn.lower())


@pytest.mark.parametrize("start_tls", [False, True], ids=["ldaps", "starttls"])
def test_tls_is_verified_against_the_configured_ca(samba_dc, ous, start_tls: bool) -> None:
    url = "ldap://127.0.0.1:389" if start_tls else samba_dc.ldaps_url
    good = _settings(
        samba_dc, ous, url=url, start_tls=start_tls, ca_file=str(samba_dc.ca_file), allow_plain_bind=False
    )
    DirectoryReader(settings=good).check()
    other_ca = _settings(
        samba_dc, ous, url=url, start_tls=start_tls, ca_file=certifi_like(), allow_plain_bind=False
    )
    with pytest.raises(DirectoryError, match="cannot bind"):
        DirectoryReader(settings=other_ca).check()


def certifi_like() -> str:
    """A CA bundle that did not issue the lab DC's certificate (the system's public roots)."""
    import ssl

    return ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"


def test_hostile_values_are_kept_as_data_and_the_read_goes_on(samba_dc, ous, engine, ldap) -> None:
    """Hundreds of values, a 32 KB blob, odd characters, no mail: staged as they are (validation
    gives each its reason later), and everyone else is read too."""
    ou = f"OU=delta-hostile,{samba_dc.base_dn}"
    assert ldap.add(ou, "organizationalUnit") or ldap.result["result"] == 68
    many = f"CN=many,{ou}"
    attrs = {
        "sAMAccountName": "hostile-many",
        "mail": "o'hara+tag@corp.example.test",
        "displayName": "Zoë \u202eevil\u202c (test)",
        "userCertificate": [os.urandom(64) for _ in range(400)],
        "userSMIMECertificate": [os.urandom(32 * 1024)],
    }
    assert ldap.add(many, ["top", "person", "organizationalPerson", "user"], attrs), ldap.result
    assert ldap.add(
        f"CN=nomail,{ou}",
        ["top", "person", "organizationalPerson", "user"],
        {"sAMAccountName": "hostile-nomail"},
    )
    settings = _settings(samba_dc, ous, base_dn=ou, group_dn=None, page_size=1000)
    counts = _extract(engine, settings, "hostile", mode="full")
    assert (counts["users"], counts["values"], counts["skipped"]) == (2, 401, 0)
    view = _view_of(engine, ou)
    assert sorted((str(v[1]), len(v[3])) for v in view.values()) == [
        ("None", 0),
        ("o'hara+tag@corp.example.test", 401),
    ]


def test_raw_decoding_reads_what_ldap3_reads_ranges_included(samba_dc, ous, ldap) -> None:
    """The reader decodes entries to raw values only; every user it reads, and a ranged read that
    ldap3 completes page by page, match ldap3's own decoding of the same search."""
    ou = f"OU=delta-decoding,{samba_dc.base_dn}"
    assert ldap.add(ou, "organizationalUnit") or ldap.result["result"] == 68
    dn = _add(ldap, ou, "ranged")
    proxies = [f"smtp:alias{i}@corp.example.test".encode() for i in range(7)]
    assert ldap.modify(dn, {"proxyAddresses": [(ldap3.MODIFY_REPLACE, proxies)]}), ldap.result
    settings = _settings(samba_dc, ous, base_dn=f"{ous['a']};{ou}", group_dn=None)
    reader = DirectoryReader(settings=settings)
    own = {u.object_guid: u for u in reader.iter_users()}
    assert own, "the scope holds users"
    plain = ldap3.Connection(ldap.server, user=settings.bind_dn, password=settings.password, auto_bind=True)
    try:
        theirs = {u.object_guid: u for u in reader.iter_users(plain)}
        assert own == theirs
        assert sorted(own[_guid(ldap, dn)].proxy_addresses) == sorted(p.decode() for p in proxies)
        one = ldap3.Connection(plain.server, user=settings.bind_dn, password=settings.password,
                               auto_bind=True, auto_range=False, return_empty_attributes=False)  # fmt: skip
        one.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["proxyAddresses;range=0-2"])
        assert list(one.response[0]["raw_attributes"]) == ["proxyAddresses;range=0-2"]  # that range only
        one.unbind()
        with reader.session() as lean:
            for conn in (lean, plain):  # and ldap3 asks for the rest
                conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["proxyAddresses;range=0-2"])
                raw = conn.response[0]["raw_attributes"]
                assert sorted(bytes(v) for v in raw["proxyAddresses"]) == sorted(proxies), raw.keys()
    finally:
        plain.unbind()
