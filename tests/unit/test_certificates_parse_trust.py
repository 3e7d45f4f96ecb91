"""Parsing of both attributes (DER, PKCS#7 variants) and loading of the trust configuration."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from certsync.certificates.parse import parse_value
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import TrustConfig, TrustConfigError, TrustSpec
from certsync_lab.pki import Pki, pkcs7_without_certificates, to_indefinite_length

SMIME = "userSMIMECertificate"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(algorithm="ec", seed=3)


def test_der_value_is_content_addressed(pki):
    der = pki.issue(email="a@example.org")
    parsed = parse_value(attribute="userCertificate", value=der)
    assert parsed.ok and parsed.leaf == der and parsed.extra == ()
    assert parsed.sha256 == hashlib.sha256(der).digest()


def test_certs_only_blob_picks_the_end_entity_whatever_the_order(pki):
    leaf = pki.issue(email="a@example.org")
    inter = pki.ca_der("intermediate")
    for ber in (False, True):
        blob = pki.pkcs7_certs_only([inter, leaf], ber=ber)
        parsed = parse_value(attribute=SMIME, value=blob)
        assert parsed.leaf == leaf and parsed.extra == (inter,)
        assert parsed.sha256 == hashlib.sha256(blob).digest()


def test_ber_blob_really_uses_indefinite_lengths(pki):
    blob = pki.pkcs7_certs_only([pki.issue(email="a@example.org")], ber=True)
    assert blob[:2] == b"\x30\x80" and blob.endswith(b"\x00\x00")
    assert to_indefinite_length(pki.ca_der("root"), depth=0) == pki.ca_der("root")


def test_outlook_blob_prefers_the_encryption_certificate(pki):
    signer = pki.issue(email="s@example.org", key_usage={"digital_signature": True})
    encryption = pki.issue(email="s@example.org", key_usage={"key_agreement": True})
    blob = pki.pkcs7_signed(signer=signer, encryption_cert=encryption, ber=True)
    parsed = parse_value(attribute=SMIME, value=blob)
    assert parsed.leaf == encryption and parsed.extra == (signer,)


def test_signed_blob_without_preference_picks_a_leaf_that_can_encrypt(pki):
    signer = pki.issue(email="s@example.org", key_usage={"digital_signature": True})
    inter = pki.ca_der("intermediate")
    parsed = parse_value(attribute=SMIME, value=pki.pkcs7_signed(signer=signer, extra=[inter]))
    assert parsed.leaf == signer and parsed.extra == (inter,)


def test_blob_problems_have_reasons(pki):
    empty = parse_value(attribute=SMIME, value=pkcs7_without_certificates())
    assert empty.error == Reason.NO_CERTIFICATE
    as_der = parse_value(attribute=SMIME, value=pki.issue(email="a@example.org"))
    assert as_der.error == Reason.MALFORMED and as_der.certificate is None
    huge = parse_value(attribute=SMIME, value=b"\x30" * 100_000)
    assert huge.error == Reason.TOO_LARGE
    other = parse_value(attribute="mail", value=b"x")
    assert other.error == Reason.MALFORMED and "unsupported attribute" in other.detail
    assert "\n" not in parse_value(attribute=SMIME, value=b"\x30\x03\x02\x01\x01").detail


def test_trust_fingerprint_tracks_every_input(pki, tmp_path: Path):
    files = pki.write_trust_files(tmp_path / "a")
    base = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                            crls=files.crls)  # fmt: skip
    same = TrustSpec(anchors=files.anchors, intermediates=(files.intermediates,),
                     crls=tuple(files.crls)).load()  # fmt: skip
    assert same.fingerprint == base.fingerprint
    strict = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                              crls=files.crls, profile="strict")  # fmt: skip
    fewer_crls = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates])
    grace = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                             crls=files.crls, crl_max_age_after_next_update=timedelta(0))  # fmt: skip
    pki.issue(email="r@example.org", revoked=True)
    newer = pki.write_trust_files(tmp_path / "b")
    new_crl = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                               crls=newer.crls)  # fmt: skip
    prints = {c.fingerprint for c in (base, strict, fewer_crls, grace, new_crl)}
    assert len(prints) == 5


def test_trust_spec_pickles(pki, tmp_path: Path):
    files = pki.write_trust_files(tmp_path)
    spec = TrustConfig.load(anchors=files.anchors, crls=files.crls).spec
    assert pickle.loads(pickle.dumps(spec)) == spec  # noqa: S301 - our own bytes


def test_bad_trust_files_fail_fast_naming_the_file(pki, tmp_path: Path):
    files = pki.write_trust_files(tmp_path)
    missing = tmp_path / "nope.pem"
    with pytest.raises(TrustConfigError, match=r"nope\.pem"):
        TrustConfig.load(anchors=missing)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TrustConfigError, match=r"junk\.pem"):
        TrustConfig.load(anchors=files.anchors, intermediates=[junk])
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(TrustConfigError, match=r"empty\.pem"):
        TrustConfig.load(anchors=empty)
    with pytest.raises(TrustConfigError, match=r"notes\.crl"):
        (tmp_path / "notes.crl").write_text("hello")
        TrustConfig.load(anchors=files.anchors, crls=[tmp_path / "notes.crl"])
    with pytest.raises(TrustConfigError, match="profile"):
        TrustConfig.load(anchors=files.anchors, profile="lenient")


def test_crl_signed_by_another_key_is_a_config_error(pki, tmp_path: Path):
    files = pki.write_trust_files(tmp_path / "a")
    impostor = Pki(algorithm="ec", seed=3)  # same names, fresh keys
    forged = impostor.write_trust_files(tmp_path / "b")
    forged_crl = next(p for p in forged.crls if p.name == "intermediate.crl")
    with pytest.raises(TrustConfigError, match=r"intermediate\.crl"):
        TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                         crls=[forged_crl])  # fmt: skip


def test_several_anchor_files_and_an_empty_intermediates_file(pki, tmp_path: Path):
    files = pki.write_trust_files(tmp_path)
    other = Pki(algorithm="ec", seed=4).write_trust_files(tmp_path / "other")
    empty = tmp_path / "none.pem"
    empty.write_bytes(b"\n")
    one = TrustConfig.load(anchors=files.anchors)
    both = TrustConfig.load(anchors=[files.anchors, other.anchors], intermediates=[empty])
    assert both.intermediates == () and set(one.anchors) < set(both.anchors)
    assert both.spec.anchors == (files.anchors, other.anchors)
    assert TrustSpec(anchors=files.anchors).anchors == (files.anchors,)
    assert TrustConfig.load(anchors=[files.anchors], intermediates=[empty]).fingerprint != one.fingerprint
    with pytest.raises(TrustConfigError, match=r"none\.pem") as failed:
        TrustConfig.load(anchors=[files.anchors, empty])
    assert failed.value.path == empty


def test_reading_settings_does_not_import_cryptography():
    """Settings name a TrustSpec; only loading the files needs cryptography."""
    code = "import sys, certsync.certificates.trust as t; t.TrustSpec(anchors='a.pem'); print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
