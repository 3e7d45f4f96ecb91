"""Strict's root-only rules bind self-signed anchors only, and selection counts a certificate once
however many blobs package it."""

from __future__ import annotations

from pathlib import Path

import pytest

from certsync.certificates.reasons import Reason
from certsync.certificates.select import select_values
from certsync.certificates.trust import TrustConfig
from certsync.certificates.validate import Validator
from certsync_lab.pki import Pki, Planted, TrustFiles, planted_values


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(algorithm="rsa", seed=7)


@pytest.fixture(scope="module")
def planted(pki: Pki) -> dict[str, Planted]:
    return {p.name: p for p in planted_values(pki)}


@pytest.fixture(scope="module")
def trust_files(pki: Pki, planted, tmp_path_factory: pytest.TempPathFactory) -> TrustFiles:
    return pki.write_trust_files(tmp_path_factory.mktemp("trust"))


def _strict(anchors: Path, files: TrustFiles, *, intermediates: bool = False) -> Validator:
    subs = [files.intermediates] if intermediates else []
    return Validator(
        trust=TrustConfig.load(anchors=anchors, intermediates=subs, crls=files.crls, profile="strict")
    )


def _enterprise(files: TrustFiles) -> Validator:
    return Validator(
        trust=TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates], crls=files.crls)
    )


@pytest.mark.parametrize("with_root", [False, True], ids=["issuing CA alone", "issuing CA beside its root"])
def test_an_issuing_ca_as_anchor_is_judged_by_the_ca_rules(pki, planted, trust_files, tmp_path, with_root):
    anchors = tmp_path / "anchors.pem"
    roots = trust_files.anchors.read_bytes() if with_root else b""
    anchors.write_bytes(roots + trust_files.intermediates.read_bytes())
    validator = _strict(anchors, trust_files)
    good = validator.check(attribute="userCertificate", value=planted["valid-rsa"].value, at=pki.now)
    assert good.ok, (good.rule, good.detail)
    # The CA rules still apply to it: an issuing CA with serverAuth in its EKU is refused as a CA.
    tls = validator.check(attribute="userCertificate", value=planted["tls-intermediate"].value, at=pki.now)
    assert tls.rule == "strict.ca_eku_forbidden"


def test_a_self_signed_anchor_keeps_the_root_rules(pki, planted, trust_files):
    verdict = _strict(trust_files.anchors, trust_files, intermediates=True).check(
        attribute="userCertificate", value=planted["valid-rsa"].value, at=pki.now
    )
    assert verdict.ok


def test_one_certificate_in_two_packagings_is_published_once(pki, planted, trust_files):
    leaf = planted["valid-rsa"].value
    validator = _enterprise(trust_files)
    bare = pki.pkcs7_certs_only([leaf])
    chained = pki.pkcs7_certs_only([leaf, pki.ca_der("intermediate")])
    ber = pki.pkcs7_certs_only([leaf], ber=True)
    verdicts = [
        validator.check(attribute="userSMIMECertificate", value=v, at=pki.now) for v in (bare, chained, ber)
    ]
    assert all(v.ok for v in verdicts) and len({v.sha256 for v in verdicts}) == 3
    selection = select_values(verdicts)
    assert len(selection.kept) == 1
    assert [reason for _, reason in selection.dropped] == [Reason.DUPLICATE, Reason.DUPLICATE]


def test_the_packaging_that_holds_longest_is_kept(pki, planted, trust_files):
    validator = _enterprise(trust_files)
    leaf = planted["valid-rsa"].value
    first = validator.check(attribute="userSMIMECertificate", value=pki.pkcs7_certs_only([leaf]), at=pki.now)
    longer = first._replace(sha256=b"\x01" * 32, valid_until=None)
    assert select_values([first, longer]).kept == (longer,)
    other = validator.check(attribute="userCertificate", value=planted["valid-ec-p256"].value, at=pki.now)
    assert {v.sha256 for v in select_values([first, other]).kept} == {first.sha256, other.sha256}
