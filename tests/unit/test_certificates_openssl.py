"""Cross-check against `openssl verify`: whatever openssl rejects, certsync refuses too, and what
openssl accepts but certsync refuses carries a reason of certsync's stricter policy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from certsync.certificates.parse import load_certificate, parse_value
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import TrustConfig
from certsync.certificates.validate import Validator
from certsync_lab.pki import Pki, Planted, planted_values

STRICTER_POLICY = {
    Reason.NO_EMAIL_PROTECTION_EKU,
    Reason.PROFILE_EKU_FORBIDDEN,
    Reason.KEY_USAGE_UNFIT,
    Reason.WEAK_KEY,
    Reason.WEAK_SIGNATURE,
    Reason.NEGATIVE_SERIAL,
    Reason.NO_EMAIL_ADDRESS,
    Reason.NOT_END_ENTITY,
}
OPENSSL = shutil.which("openssl")


def _pem(ders: list[bytes]) -> bytes:
    return b"".join(load_certificate(d).public_bytes(Encoding.PEM) for d in ders)


def openssl_accepts(item: Planted, files, crl_pem: Path, at: int, work: Path) -> bool:
    parsed = parse_value(attribute=item.attribute, value=item.value)
    if parsed.leaf is None:
        return False  # openssl cannot even load it
    leaf, untrusted = work / f"{item.name}.pem", work / f"{item.name}-untrusted.pem"
    try:
        leaf.write_bytes(_pem([parsed.leaf]))
    except ValueError:
        return False
    untrusted.write_bytes(files.intermediates.read_bytes() + _pem(list(parsed.extra)))
    command = [OPENSSL, "verify", "-purpose", item.purpose, "-attime", str(at),
               "-CAfile", str(files.anchors), "-untrusted", str(untrusted),
               "-crl_check", "-CRLfile", str(crl_pem), str(leaf)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    return result.returncode == 0


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory):
    assert OPENSSL, "openssl CLI is required"
    work = tmp_path_factory.mktemp("openssl")
    pki = Pki(algorithm="rsa", seed=21)
    planted = planted_values(pki)
    files = pki.write_trust_files(work / "trust")
    crl_pem = work / "crls.pem"
    crls = [x509.load_der_x509_crl(p.read_bytes()) for p in files.crls]
    crl_pem.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in crls))
    at = int(pki.now.timestamp())
    verdicts = {}
    for profile in ("enterprise", "strict"):
        trust = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                                 crls=files.crls, profile=profile)  # fmt: skip
        validator = Validator(trust=trust)
        for item in planted:
            verdict = validator.check(attribute=item.attribute, value=item.value, at=pki.now)
            verdicts[(profile, item.name)] = verdict
    accepted = {p.name: openssl_accepts(p, files, crl_pem, at, work) for p in planted}
    return planted, accepted, verdicts


@pytest.mark.parametrize("profile", ["enterprise", "strict"])
def test_what_openssl_rejects_certsync_refuses(comparison, profile):
    planted, accepted, verdicts = comparison
    wrongly_ok = [p.name for p in planted if not accepted[p.name] and verdicts[(profile, p.name)].ok]
    assert wrongly_ok == []


@pytest.mark.parametrize("profile", ["enterprise", "strict"])
def test_refusals_of_openssl_accepted_certs_are_policy_reasons(comparison, profile):
    planted, accepted, verdicts = comparison
    stricter = {
        p.name: verdicts[(profile, p.name)].reason
        for p in planted
        if accepted[p.name] and not verdicts[(profile, p.name)].ok
    }
    assert {name: r for name, r in stricter.items() if Reason(r) not in STRICTER_POLICY} == {}
    # The comparison must have teeth: openssl accepts some we refuse, and rejects others.
    assert "no-eku" in stricter and "rsa1024" in stricter
    assert not accepted["revoked"] and not accepted["unknown-issuer"] and accepted["valid-rsa"]
