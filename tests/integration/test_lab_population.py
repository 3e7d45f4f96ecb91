"""The seeded population: deterministic, every planted scenario present and true, loadable into AD."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import ldap3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from ldap3.protocol.formatters.formatters import format_sid

from certsync_lab.pki import Pki
from certsync_lab.population import (
    DEFECT_TAGS,
    SCENARIO_SHARES,
    SeedUser,
    generate_population,
    load_population,
    load_population_offline,
)
from certsync_lab.samba import SambaDC

pytestmark = pytest.mark.integration

# Same instant as the lab_at fixture (lab_population is planted for it).
LAB_AT = datetime(2026, 6, 1, tzinfo=UTC)
READ_BACK = [
    "sAMAccountName",
    "mail",
    "proxyAddresses",
    "userCertificate",
    "userSMIMECertificate",
    "userAccountControl",
    "displayName",
]


def _certs(user: SeedUser, tag: str) -> list[x509.Certificate]:
    values = user.user_certificate + user.user_smime_certificate
    wanted = [v for v in values if user.expected[hashlib.sha256(v).hexdigest()] == tag]
    return [x509.load_der_x509_certificate(v) for v in wanted]


def _with(users: list[SeedUser], tag: str) -> list[SeedUser]:
    return [u for u in users if tag in u.defects]


def test_same_seed_gives_the_same_population(lab_cache_dir: Path) -> None:
    keys = lab_cache_dir / "pki-keys"
    first = generate_population(count=60, pki=Pki(seed=3, key_cache=keys), seed=7, at=LAB_AT)
    time.sleep(1.1)  # cross a second boundary, so any wall-clock stamp would show as a difference
    second = generate_population(count=60, pki=Pki(seed=3, key_cache=keys), seed=7, at=LAB_AT)
    assert first == second
    other = generate_population(count=60, pki=Pki(seed=3, key_cache=keys), seed=8, at=LAB_AT)
    assert [u.sam_account_name for u in other] != [u.sam_account_name for u in first]


def test_every_defect_tag_is_planted(lab_population: list[SeedUser]) -> None:
    planted = Counter(tag for user in lab_population for tag in user.defects)
    assert set(planted) == set(DEFECT_TAGS)
    assert len({u.sam_account_name for u in lab_population}) == len(lab_population)
    assert len({u.mail for u in lab_population if u.mail}) == sum(1 for u in lab_population if u.mail)


def test_scenario_shares_hold_at_demo_size(lab_cache_dir: Path) -> None:
    # A PKI of its own: issuing moves the session PKI's serials and CRLs that other tests share.
    users = generate_population(
        count=400, pki=Pki(seed=1, key_cache=lab_cache_dir / "pki-keys"), seed=1, at=LAB_AT
    )
    planted = Counter(tag for user in users for tag in user.defects)
    assert planted == {tag: max(1, round(share * 400)) for tag, share in SCENARIO_SHARES.items()}
    healthy = [u for u in users if not u.defects]
    counts = Counter(len(u.user_certificate) for u in healthy)
    assert set(counts) == {1, 2, 3}
    assert all(u.valid_count == 1 for u in healthy)
    keys = [c.public_key() for u in healthy for c in _certs(u, None)]
    assert any(isinstance(k, rsa.RSAPublicKey) for k in keys)
    assert any(isinstance(k, ec.EllipticCurvePublicKey) for k in keys)


def test_planted_certificates_really_have_their_defect(
    lab_population: list[SeedUser], lab_at: datetime
) -> None:
    assert lab_at == LAB_AT
    for user in _with(lab_population, "expired"):
        expired = _certs(user, "expired")
        assert expired and all(c.not_valid_after_utc < LAB_AT for c in expired)
    for user in _with(lab_population, "not_yet_valid"):
        early = _certs(user, "not_yet_valid")
        assert early and all(c.not_valid_before_utc > LAB_AT for c in early)
    for user in _with(lab_population, "weak_key"):
        (cert,) = _certs(user, "weak_key")
        assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 1024
    for user in _with(lab_population, "weak_signature"):
        (cert,) = _certs(user, "weak_signature")
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha1"
    for user in _with(lab_population, "email_mismatch"):
        (cert,) = _certs(user, "email_mismatch")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = {p.split(":", 1)[1].lower() for p in user.proxy_addresses}
        assert not set(san.get_values_for_type(x509.RFC822Name)) & addresses


def test_planted_values_of_other_kinds(lab_population: list[SeedUser]) -> None:
    for tag in ("malformed_truncated", "malformed_garbage"):
        for user in _with(lab_population, tag):
            bad = [v for v in user.user_certificate if user.expected[_sha(v)] == tag]
            assert len(bad) == 1
            with pytest.raises(ValueError):
                x509.load_der_x509_certificate(bad[0])
    (big,) = _with(lab_population, "too_many_values")
    assert len(big.user_certificate) == 18 and big.valid_count == 3
    for tag in ("pkcs7_certs_only", "pkcs7_signed"):
        for user in _with(lab_population, tag):
            (blob,) = user.user_smime_certificate
            assert pkcs7.load_der_pkcs7_certificates(blob)
    assert all(u.mail is None and not u.proxy_addresses for u in _with(lab_population, "no_mail"))
    assert all(u.disabled for u in _with(lab_population, "disabled"))
    assert not any(u.disabled for u in lab_population if "disabled" not in u.defects)


def test_load_reads_back_with_certificates(samba_dc: SambaDC, lab_population: list[SeedUser]) -> None:
    # Account names are unique domain-wide and the session DC may hold lab_population already.
    lab_population = [
        dataclasses.replace(u, sam_account_name=f"L{u.sam_account_name}"[:20]) for u in lab_population
    ]
    ou = f"OU=lab-load-test,{samba_dc.base_dn}"
    kwargs = {"url": samba_dc.ldap_url, "bind_dn": samba_dc.bind_dn, "password": samba_dc.password}
    assert load_population(**kwargs, ou_dn=ou, users=lab_population) == len(lab_population)
    # Existing accounts are recognised by sAMAccountName and left as they are, even if changed.
    renamed = [dataclasses.replace(u, display_name=f"{u.display_name} X") for u in lab_population]
    assert load_population(**kwargs, ou_dn=ou, users=renamed) == 0

    found = _paged_read(samba_dc, ou)
    assert set(found) == {u.sam_account_name for u in lab_population}
    for user in lab_population:
        attrs = found[user.sam_account_name]
        assert sorted(attrs.get("userCertificate", [])) == sorted(user.user_certificate)
        assert sorted(attrs.get("userSMIMECertificate", [])) == sorted(user.user_smime_certificate)
        assert _text(attrs, "mail") == user.mail
        assert sorted(v.decode() for v in attrs.get("proxyAddresses", [])) == sorted(user.proxy_addresses)
        assert _text(attrs, "userAccountControl") == ("514" if user.disabled else "512")
        assert _text(attrs, "displayName") == user.display_name


def test_offline_load_matches_the_ldap_load(populated_dc: SambaDC, lab_population: list[SeedUser]) -> None:
    # populated_dc holds lab_population loaded over LDAP; the same users, under other account names,
    # go offline into an OU of their own and must read back alike through certsync's reader.
    offline = [dataclasses.replace(u, sam_account_name=f"O{u.sam_account_name}"[:20]) for u in lab_population]
    ou = f"OU=lab-offline-test,{populated_dc.base_dn}"
    assert load_population_offline(samba=populated_dc, ou_dn=ou, users=offline) == len(offline)
    assert populated_dc.running  # stopped for the load, started again
    assert load_population_offline(samba=populated_dc, ou_dn=ou, users=offline) == 0

    over_ldap = {u.sam_account_name: u for u in _reader_users(populated_dc, populated_dc.users_ou)}
    loaded = {u.sam_account_name.removeprefix("O"): u for u in _reader_users(populated_dc, ou)}
    assert set(loaded) == {u.sam_account_name for u in lab_population}
    assigned = ("object_guid", "dn", "sam_account_name", "usn_changed")
    for name, user in loaded.items():
        expected = dataclasses.asdict(over_ldap[name])
        got = dataclasses.asdict(user)
        assert {k: v for k, v in got.items() if k not in assigned} == {
            k: v for k, v in expected.items() if k not in assigned
        }
    # Samba assigned what it assigns over LDAP: fresh GUIDs, later USNs, a SID from the domain's pool.
    assert not {u.object_guid for u in loaded.values()} & {u.object_guid for u in over_ldap.values()}
    assert min(u.usn_changed for u in loaded.values()) > max(u.usn_changed for u in over_ldap.values())
    sids = _sids(populated_dc, ou)
    domain = _sids(populated_dc, populated_dc.users_ou)[0].rsplit("-", 1)[0]
    assert len(set(sids)) == len(offline) and all(sid.rsplit("-", 1)[0] == domain for sid in sids)


def _reader_users(dc: SambaDC, ou: str) -> list:
    from certsync.directory import DirectoryReader, DirectorySettings

    settings = DirectorySettings(
        url=dc.ldap_url, bind_dn=dc.bind_dn, password=dc.password, base_dn=ou, allow_plain_bind=True
    )
    return list(DirectoryReader(settings=settings).iter_users())


def _sids(dc: SambaDC, ou: str) -> list[str]:
    conn = dc.connect()
    conn.search(ou, "(objectClass=user)", ldap3.SUBTREE, attributes=["objectSid"])
    sids = [format_sid(entry.objectSid.raw_values[0]) for entry in conn.entries]
    conn.unbind()
    return sids


def _paged_read(dc: SambaDC, ou: str) -> dict[str, dict[str, list[bytes]]]:
    conn = dc.connect()
    entries = conn.extend.standard.paged_search(
        ou,
        "(&(objectClass=user)(!(objectClass=computer)))",
        ldap3.SUBTREE,
        attributes=READ_BACK,
        paged_size=20,
        generator=True,
    )
    found = {}
    for entry in entries:
        raw = entry["raw_attributes"]
        found[raw["sAMAccountName"][0].decode()] = dict(raw)
    conn.unbind()
    return found


def _text(attrs: dict[str, list[bytes]], name: str) -> str | None:
    values = attrs.get(name) or []
    return values[0].decode() if values else None


def _sha(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()
