"""RFC 5280 / S/MIME BR rules found missing by comparing the validator with public path-validation
suites; each case is built here from scratch so the rule, not a fixture, is under test."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certsync.certificates.constraints import MAX_CONSTRAINT_CHECKS
from certsync.certificates.trust import TrustConfig
from certsync.certificates.validate import Validator, Verdict

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
CA_USAGE = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False)  # fmt: skip


def _name(cn: str, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


@dataclass
class Ca:
    name: x509.Name
    key: Any = field(repr=False)
    cert: x509.Certificate


def _builder(
    subject: x509.Name, issuer: Ca | None, key: Any, not_after: datetime | None = None
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30))
        .not_valid_after(not_after or NOW + timedelta(days=365))
    )


def make_ca(cn: str, issuer: Ca | None = None, *, ski: bool = True, aki: bool = True,
            crl_sign: bool = True, root_aki: x509.AuthorityKeyIdentifier | None = None,
            constraints: x509.NameConstraints | None = None) -> Ca:  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(cn), issuer, key).add_extension(x509.BasicConstraints(True, None), True)
    builder = builder.add_extension(x509.KeyUsage(**{**CA_USAGE, "crl_sign": crl_sign}), True)
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    if issuer is not None:
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
        builder = builder.add_extension(eku, False)
        if aki:
            ident = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
            builder = builder.add_extension(ident, False)
    elif root_aki is not None:
        builder = builder.add_extension(root_aki, False)
    if constraints is not None:
        builder = builder.add_extension(constraints, True)
    signer = issuer.key if issuer else key
    return Ca(_name(cn), key, builder.sign(signer, hashes.SHA256()))


def make_leaf(issuer: Ca, *, email: str | None = "alice@example.org", subject_email: str | None = None,
              subject: x509.Name | None = None, san_critical: bool = False, key: Any = None,
              not_after: datetime | None = None) -> bytes:  # fmt: skip
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = subject if subject is not None else _name("alice", subject_email)
    builder = _builder(subject, issuer, key, not_after)
    usage = {**CA_USAGE, "key_cert_sign": False, "crl_sign": False, "digital_signature": True}
    usage["key_encipherment" if isinstance(key, rsa.RSAPrivateKey) else "key_agreement"] = True
    builder = builder.add_extension(x509.KeyUsage(**usage), True)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
    ident = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    builder = builder.add_extension(eku, False).add_extension(ident, False)
    if email:
        san = x509.SubjectAlternativeName([x509.RFC822Name(email)])
        builder = builder.add_extension(san, san_critical)
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(Encoding.DER)


def _crl(ca: Ca) -> x509.CertificateRevocationList:
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.name)
    builder = builder.last_update(NOW - timedelta(days=1)).next_update(NOW + timedelta(days=7))
    return builder.add_extension(x509.CRLNumber(1), False).sign(ca.key, hashes.SHA256())


def check(tmp: Path, root: Ca, cas: list[Ca], leaf: bytes, profile: str, at: datetime = NOW) -> Verdict:
    (tmp / "root.pem").write_bytes(root.cert.public_bytes(Encoding.PEM))
    (tmp / "inter.pem").write_bytes(b"".join(c.cert.public_bytes(Encoding.PEM) for c in cas))
    crls = []
    for index, ca in enumerate([root, *cas]):
        crls.append(tmp / f"crl{index}.der")
        crls[-1].write_bytes(_crl(ca).public_bytes(Encoding.DER))
    inter = [tmp / "inter.pem"] if cas else []
    trust = TrustConfig.load(anchors=tmp / "root.pem", intermediates=inter, crls=crls, profile=profile)
    return Validator(trust=trust).check(attribute="userCertificate", value=leaf, at=at)


@pytest.fixture(scope="module")
def chain() -> tuple[Ca, Ca]:
    root = make_ca("Root")
    return root, make_ca("Issuing", root)


@pytest.mark.parametrize("profile", ["enterprise", "strict"])
def test_a_well_formed_chain_is_valid(tmp_path, chain, profile):
    root, issuing = chain
    verdict = check(tmp_path, root, [issuing], make_leaf(issuing), profile)
    assert verdict.ok, verdict.detail


@pytest.mark.parametrize("profile", ["enterprise", "strict"])
def test_a_crl_from_a_ca_without_crl_sign_is_not_revocation_evidence(tmp_path, chain, profile):
    # RFC 5280 6.3.3 (f); before the fix such a CRL counted as "not revoked".
    root, _ = chain
    issuing = make_ca("No CRL signing", root, crl_sign=False)
    verdict = check(tmp_path, root, [issuing], make_leaf(issuing), profile)
    assert (verdict.reason, verdict.rule) == ("revocation_unknown", f"{profile}.crl_usable")


def _email_constrained(root: Ca) -> Ca:
    permitted = [x509.RFC822Name("example.org")]
    return make_ca("Constrained", root, constraints=x509.NameConstraints(permitted, None))


def test_subject_only_addresses_obey_rfc822_name_constraints(tmp_path, chain):
    root, _ = chain
    constrained = _email_constrained(root)
    outside = make_leaf(constrained, email=None, subject_email="ceo@other.example")
    inside = make_leaf(constrained, email=None, subject_email="bob@example.org")
    refused = check(tmp_path, root, [constrained], outside, "enterprise")
    assert (refused.reason, refused.rule) == (
        "chain_invalid",
        "enterprise.subject_email_name_constraints",
    )
    assert check(tmp_path, root, [constrained], inside, "enterprise").ok


def test_excluded_rfc822_subtrees_cover_subdomains_of_a_leading_dot(tmp_path, chain):
    root, _ = chain
    excluded = x509.NameConstraints(None, [x509.RFC822Name(".corp.example")])
    ca = make_ca("Excluding", root, constraints=excluded)
    leaf = make_leaf(ca, email=None, subject_email="eve@mail.corp.example")
    assert check(tmp_path, root, [ca], leaf, "enterprise").rule == "enterprise.subject_email_name_constraints"
    apex = make_leaf(ca, email=None, subject_email="eve@corp.example")
    assert check(tmp_path, root, [ca], apex, "enterprise").ok


def test_name_constraint_work_is_bounded(tmp_path, chain):
    root, _ = chain
    many = [x509.RFC822Name(f"d{i}.example") for i in range(MAX_CONSTRAINT_CHECKS // 2 + 1)]
    ca = make_ca("Many constraints", root, constraints=x509.NameConstraints(many, None))
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "x")]
        + [x509.NameAttribute(NameOID.EMAIL_ADDRESS, f"u{i}@d0.example") for i in range(3)]
    )
    verdict = check(tmp_path, root, [ca], make_leaf(ca, email=None, subject=subject), "enterprise")
    assert verdict.reason == "chain_invalid" and "Too many" in verdict.detail


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        ("intermediate-without-aki", "strict.ca_key_identifiers"),
        ("intermediate-without-ski", "strict.ca_key_identifiers"),
        ("root-without-ski", "strict.ca_key_identifiers"),
        ("root-aki-with-issuer", "strict.root_aki"),
    ],
)
def test_strict_requires_br_key_identifiers_on_cas(tmp_path, kind, rule):
    root_aki = None
    if kind == "root-aki-with-issuer":
        root_aki = x509.AuthorityKeyIdentifier(b"\x01" * 20, [x509.DirectoryName(_name("Root"))], 1)
    root = make_ca("Root", ski=kind != "root-without-ski", root_aki=root_aki)
    issuing = make_ca("Issuing", root, aki=kind != "intermediate-without-aki",
                      ski=kind != "intermediate-without-ski")  # fmt: skip
    leaf = make_leaf(issuing)
    strict = check(tmp_path, root, [issuing], leaf, "strict")
    assert (strict.reason, strict.rule) == ("chain_invalid", rule)
    assert check(tmp_path, root, [issuing], leaf, "enterprise").ok  # RFC 5280 path validation passes


def test_strict_refuses_rsa_moduli_not_a_multiple_of_8(tmp_path, chain):
    root, issuing = chain
    odd = make_leaf(issuing, key=rsa.generate_private_key(public_exponent=65537, key_size=2052))
    verdict = check(tmp_path, root, [issuing], odd, "strict")
    assert (verdict.reason, verdict.rule) == ("weak_key", "strict.rsa_modulus")
    assert check(tmp_path, root, [issuing], odd, "enterprise").ok


@pytest.mark.parametrize("profile", ["enterprise", "strict"])
def test_an_empty_subject_needs_a_critical_san(tmp_path, chain, profile):
    root, issuing = chain
    loose = make_leaf(issuing, subject=x509.Name([]))
    verdict = check(tmp_path, root, [issuing], loose, profile)
    assert (verdict.reason, verdict.rule) == ("chain_invalid", f"{profile}.san_critical")
    tight = make_leaf(issuing, subject=x509.Name([]), san_critical=True)
    assert check(tmp_path, root, [issuing], tight, profile).ok


def test_validity_is_compared_in_whole_seconds(tmp_path, chain):
    root, issuing = chain
    end = NOW + timedelta(days=1)
    leaf = make_leaf(issuing, not_after=end)
    assert check(tmp_path, root, [issuing], leaf, "enterprise", at=end + timedelta(milliseconds=5)).ok
    late = check(tmp_path, root, [issuing], leaf, "enterprise", at=end + timedelta(seconds=1))
    assert late.reason == "expired"
