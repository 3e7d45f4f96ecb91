"""No input, however hostile, makes Validator.check raise; every outcome is a verdict."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certsync.certificates.reasons import Reason
from certsync.certificates.trust import TrustConfig
from certsync.certificates.validate import Validator, Verdict
from certsync_lab.pki import Pki

ATTRIBUTES = st.sampled_from(["userCertificate", "userSMIMECertificate"])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    pki = Pki(algorithm="ec", seed=11)
    der = pki.issue(email="fuzz@example.org")
    blob = pki.pkcs7_signed(signer=der, encryption_cert=pki.issue(email="fuzz@example.org"))
    files = pki.write_trust_files(tmp_path_factory.mktemp("fuzz"))
    trust = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                             crls=files.crls)  # fmt: skip
    return pki, Validator(trust=trust), der, blob


def _is_verdict(verdict: Verdict) -> None:
    assert isinstance(verdict, Verdict)
    if not verdict.ok:
        assert verdict.reason in {r.value for r in Reason}
        assert verdict.detail


@FAST
@given(attribute=ATTRIBUTES, value=st.binary(max_size=3000))
def test_random_bytes(setup, attribute: str, value: bytes):
    pki, validator, _, _ = setup
    verdict = validator.check(attribute=attribute, value=value, at=pki.now)
    _is_verdict(verdict)
    assert not verdict.ok


@FAST
@given(data=st.data(), attribute=ATTRIBUTES)
def test_mutated_values(setup, data, attribute: str):
    pki, validator, der, blob = setup
    original = bytearray(der if attribute == "userCertificate" else blob)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    verdict = validator.check(attribute=attribute, value=bytes(original), at=pki.now)
    _is_verdict(verdict)


@FAST
@given(data=st.data(), attribute=ATTRIBUTES)
def test_truncated_and_extended_values(setup, data, attribute: str):
    pki, validator, der, blob = setup
    original = der if attribute == "userCertificate" else blob
    cut = data.draw(st.integers(0, len(original) - 1))
    tail = data.draw(st.binary(max_size=64))
    for value in (original[:cut], original + tail):
        _is_verdict(validator.check(attribute=attribute, value=value, at=pki.now))


def test_huge_and_nested_values(setup):
    pki, validator, der, _ = setup
    deep = b"\x30\x80" * 20_000 + b"\x00\x00" * 20_000
    huge_length = b"\x30\x84\xff\xff\xff\xff" + der
    for value in (der * 100, deep[:60_000], huge_length, bytes(64 * 1024)):
        for attribute in ("userCertificate", "userSMIMECertificate"):
            verdict = validator.check(attribute=attribute, value=value, at=pki.now)
            _is_verdict(verdict)
            assert not verdict.ok


def test_hostile_names_do_not_break_descriptions(setup):
    pki, validator, _, _ = setup
    nasty = pki.issue(email="x\u202e@example.org", san_emails=("a,b=c+d;<e>@example.org",))
    verdict = validator.check(attribute="userCertificate", value=nasty, at=pki.now)
    assert verdict.ok
    assert verdict.emails == ("a,b=c+d;<e>@example.org",)


def test_non_ascii_t61_subject_is_still_described(setup):
    pki, validator, _, _ = setup
    der = pki.issue(email="t61@example.org")
    at = der.find(b"\x0c\x03t61")  # the CN as UTF8String
    assert at > 0
    legacy = der[:at] + b"\x14\x03J\xf6r" + der[at + 5 :]  # as a Latin-1 T61String
    verdict = validator.check(attribute="userCertificate", value=legacy, at=pki.now)
    assert not verdict.ok  # the patch broke the signature
    assert "Jör" in verdict.subject
