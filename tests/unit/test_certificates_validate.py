"""Every reason code comes from a real planted certificate; valid ones pass, in both profiles."""

from __future__ import annotations

import pickle
from datetime import timedelta
from pathlib import Path

import pytest

from certsync.certificates.reasons import Reason
from certsync.certificates.select import select_values
from certsync.certificates.trust import TrustConfig
from certsync.certificates.validate import Validator, Verdict, email_mismatch, with_email_check
from certsync_lab.pki import Pki, Planted, TrustFiles, planted_values

PROFILES = ("enterprise", "strict")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(algorithm="rsa", seed=7)


@pytest.fixture(scope="module")
def planted(pki: Pki) -> list[Planted]:
    return planted_values(pki)


@pytest.fixture(scope="module")
def trust_files(pki: Pki, planted: list[Planted], tmp_path_factory: pytest.TempPathFactory):
    # Written after planting so the CRLs list the revoked serials.
    return pki.write_trust_files(tmp_path_factory.mktemp("trust"))


def load(files: TrustFiles, profile: str = "enterprise", **kw) -> TrustConfig:
    return TrustConfig.load(
        anchors=files.anchors,
        intermediates=[files.intermediates],
        crls=files.crls,
        profile=profile,
        **kw,
    )


@pytest.fixture(scope="module", params=PROFILES)
def verdicts(request, pki, planted, trust_files) -> tuple[str, dict[str, Verdict]]:
    validator = Validator(trust=load(trust_files, request.param))
    results = {p.name: validator.check(attribute=p.attribute, value=p.value, at=pki.now) for p in planted}
    return request.param, results


def test_each_planted_value_gets_its_expected_reason(verdicts, planted):
    profile, results = verdicts
    got = {p.name: results[p.name].reason for p in planted}
    want = {p.name: p.expected(profile) for p in planted}
    assert got == want
    for p in planted:
        verdict = results[p.name]
        assert verdict.ok is (p.expected(profile) is None)
        if not verdict.ok:
            assert verdict.rule and verdict.detail
            assert verdict.detail.startswith(Reason(verdict.reason).sentence)


def test_refusal_rules_name_the_profile(verdicts):
    profile, results = verdicts
    for name in ("expired", "rsa1024", "revoked", "unknown-issuer"):
        assert results[name].rule.startswith(f"{profile}.")
    if profile == "strict":
        assert results["eku-root"].rule == "strict.root_eku_absent"
        assert results["tls-intermediate"].rule == "strict.ca_eku_forbidden"
        assert results["leaf-server-auth"].rule == "strict.leaf_eku_forbidden"


def test_every_certificate_level_reason_is_planted(planted):
    produced = {p.enterprise for p in planted} | {p.strict for p in planted}
    elsewhere = {
        Reason.CRL_STALE,
        Reason.REVOCATION_UNKNOWN,
        Reason.EMAIL_MISMATCH,
        Reason.DUPLICATE,
        Reason.OVER_LIMIT,
    }
    assert {r.value for r in Reason} - elsewhere <= produced


def test_valid_verdict_describes_the_certificate(verdicts, pki):
    _, results = verdicts
    good = results["valid-rsa"]
    assert good.ok and good.reason is None and good.rule is None
    assert good.emails == ("valid-rsa@example.org",)
    assert "CN=valid-rsa" in good.subject
    assert "intermediate CA" in good.issuer
    assert int(good.serial, 16) > 0
    assert good.not_before < pki.now < good.not_after
    assert good.not_before.tzinfo is not None
    # The CRL's next update plus grace comes before the certificate's own expiry.
    assert good.valid_until < good.not_after
    assert pickle.loads(pickle.dumps(good)) == good  # noqa: S301 - our own bytes


def test_smtputf8_and_pkcs7_leaves(verdicts):
    _, results = verdicts
    assert results["valid-smtputf8"].emails == ("jörg@example.org",)
    assert results["p7-outlook-ber"].emails == ("signer@example.org",)
    assert results["p7-hidden-intermediate"].emails == ("hidden-in-p7@example.org",)


def test_not_yet_valid_verdict_holds_until_not_before(verdicts):
    _, results = verdicts
    verdict = results["not-yet-valid"]
    assert verdict.valid_until == verdict.not_before


def test_negative_serial_is_reported_in_hex(verdicts):
    _, results = verdicts
    assert results["negative-serial"].serial.startswith("-")


def test_stale_crl_is_refused_beyond_grace_only(pki, planted, tmp_path: Path):
    good = next(p for p in planted if p.name == "valid-rsa").value
    stale = pki.write_trust_files(
        tmp_path,
        crl_this_update=pki.now - timedelta(days=10),
        crl_next_update=pki.now - timedelta(hours=2),
    )
    strict_grace = Validator(trust=load(stale, crl_max_age_after_next_update=timedelta(hours=1)))
    verdict = strict_grace.check(attribute="userCertificate", value=good, at=pki.now)
    assert verdict.reason == Reason.CRL_STALE
    lenient = Validator(trust=load(stale, crl_max_age_after_next_update=timedelta(hours=3)))
    verdict = lenient.check(attribute="userCertificate", value=good, at=pki.now)
    assert verdict.ok
    assert verdict.valid_until == pki.now + timedelta(hours=1)


def test_strict_profile_requires_crl_coverage(pki, planted, trust_files):
    good = next(p for p in planted if p.name == "valid-rsa").value
    no_crls = TrustConfig.load(
        anchors=trust_files.anchors, intermediates=[trust_files.intermediates], profile="strict"
    )
    verdict = Validator(trust=no_crls).check(attribute="userCertificate", value=good, at=pki.now)
    assert verdict.reason == Reason.REVOCATION_UNKNOWN
    enterprise = TrustConfig.load(anchors=trust_files.anchors, intermediates=[trust_files.intermediates])
    verdict = Validator(trust=enterprise).check(attribute="userCertificate", value=good, at=pki.now)
    assert verdict.ok and verdict.valid_until == verdict.not_after


def test_time_alone_flips_a_verdict(pki, planted, trust_files):
    good = next(p for p in planted if p.name == "valid-rsa").value
    validator = Validator(trust=load(trust_files))
    now = validator.check(attribute="userCertificate", value=good, at=pki.now)
    later = validator.check(attribute="userCertificate", value=good, at=now.not_after + timedelta(seconds=1))
    again = validator.check(attribute="userCertificate", value=good, at=pki.now)
    assert now.ok and not later.ok and later.reason == Reason.EXPIRED
    assert again == now


def test_cached_intermediate_path_gives_the_same_verdicts(pki, planted, trust_files):
    """The second pass runs through promoted intermediates; results must not change."""
    validator = Validator(trust=load(trust_files))
    first = [validator.check(attribute=p.attribute, value=p.value, at=pki.now) for p in planted]
    second = [validator.check(attribute=p.attribute, value=p.value, at=pki.now) for p in planted]
    assert first == second
    fresh = [
        Validator(trust=load(trust_files)).check(attribute=p.attribute, value=p.value, at=pki.now)
        for p in planted
    ]
    assert fresh == first


def test_email_match_is_case_insensitive_and_ignores_other_proxies(verdicts):
    _, results = verdicts
    good = results["valid-rsa"]
    assert not email_mismatch(good, ["SMTP:Valid-RSA@Example.org"])
    assert not email_mismatch(good, ["x500:/o=org", "smtp:valid-rsa@example.org"])
    assert not email_mismatch(good, ["valid-rsa@EXAMPLE.org"])
    assert email_mismatch(good, ["SIP:valid-rsa@example.org", "smtp:other@example.org"])
    assert email_mismatch(good, [])
    refused = with_email_check(good, ["someone@example.org"])
    assert refused.reason == Reason.EMAIL_MISMATCH and not refused.ok
    assert with_email_check(good, ["smtp:valid-rsa@example.org"]) is good


def test_selection_drops_duplicates_and_caps_newest_first(pki, trust_files):
    validator = Validator(trust=load(trust_files))
    ders = [
        pki.issue(email="many@example.org", not_before=pki.now - timedelta(days=30 - i)) for i in range(20)
    ]
    verdicts = [validator.check(attribute="userCertificate", value=d, at=pki.now) for d in ders]
    expired = pki.issue(email="many@example.org", not_after=pki.now - timedelta(days=1),
                        not_before=pki.now - timedelta(days=90))  # fmt: skip
    refused = validator.check(attribute="userCertificate", value=expired, at=pki.now)
    selection = select_values([*verdicts, verdicts[0], refused], limit=15)
    assert [v.sha256 for v in selection.kept] == [v.sha256 for v in reversed(verdicts)][:15]
    reasons = [r for _, r in selection.dropped]
    assert reasons.count(Reason.DUPLICATE) == 1
    assert reasons.count(Reason.OVER_LIMIT) == 5
    assert refused not in selection.kept
    assert all(v is not refused for v, _ in selection.dropped)


def test_every_rule_mode_keeps_the_reason_first(verdicts, pki, planted, trust_files):
    """Listing every failing rule never changes a verdict: the first listed is the reason."""
    profile, results = verdicts
    every = Validator(trust=load(trust_files, profile), every_rule=True)
    for p in planted:
        verdict = every.check(attribute=p.attribute, value=p.value, at=pki.now)
        fast = results[p.name]
        assert (verdict.ok, verdict.reason, verdict.rule, verdict.detail) == (
            fast.ok, fast.reason, fast.rule, fast.detail,
        ), p.name  # fmt: skip
        assert fast.more_failures == ()
        if not verdict.ok:
            assert verdict.failures[0] == (fast.reason, fast.rule, fast.detail)
            assert len(set(verdict.failures)) == len(verdict.failures)
            for failure in verdict.failures:
                assert failure.detail.startswith(Reason(failure.reason).sentence)
    ca_as_leaf = every.check(attribute="userCertificate", value=_planted(planted, "ca-as-leaf"), at=pki.now)
    assert [f.rule for f in ca_as_leaf.failures] == [
        f"{profile}.{rule}" for rule in ("end_entity", "key_usage", "encryption_capable", "email_present")
    ]


def _planted(planted: list[Planted], name: str) -> bytes:
    return next(p for p in planted if p.name == name).value


@pytest.mark.parametrize("profile", PROFILES)
def test_every_failing_rule_is_listed_in_rule_order(pki, profile, tmp_path: Path):
    """Weak key, no emailProtection, expired and revoked: four rules, in the order they are applied;
    the chain is still judged although the leaf's own dates are past."""
    der = pki.issue(email="many-faults@example.org", key="rsa1024", eku=None, revoked=True,
                    not_before=pki.now - timedelta(days=90), not_after=pki.now - timedelta(days=1))  # fmt: skip
    files = pki.write_trust_files(tmp_path)
    trust = load(files, profile)
    fast = Validator(trust=trust).check(attribute="userCertificate", value=der, at=pki.now)
    every = Validator(trust=trust, every_rule=True).check(attribute="userCertificate", value=der, at=pki.now)
    want = [
        (Reason.WEAK_KEY, "rsa_key_size"),
        (Reason.NO_EMAIL_PROTECTION_EKU, "eku_email"),
        (Reason.EXPIRED, "validity"),
        (Reason.REVOKED, "not_revoked"),
    ]
    assert [(f.reason, f.rule) for f in every.failures] == [(r.value, f"{profile}.{n}") for r, n in want]
    assert fast.failures == every.failures[:1] and not every.ok
    assert (every.reason, every.rule) == (Reason.WEAK_KEY, f"{profile}.rsa_key_size")
    mismatch = with_email_check(every, ["other@example.org"], every_rule=True)
    assert mismatch.failures[-1].rule == "any.email_matches_user" and mismatch.reason == every.reason
    assert with_email_check(every, ["other@example.org"]) is every  # the pipeline's form: reason only
    malformed = Validator(trust=trust, every_rule=True).check(
        attribute="userCertificate", value=b"x", at=pki.now
    )
    assert with_email_check(malformed, ["a@example.org"], every_rule=True).failures == malformed.failures
