"""Profile rules checked on the leaf itself, before and beside path validation.

Two profiles: "enterprise" accepts what AD CS user templates issue (emailProtection next to clientAuth
and EFS, no key usage restrictions beyond fitness); "strict" follows the CA/Browser Forum S/MIME
Baseline Requirements. Every refusal names its rule as "<profile>.<rule>".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certsync.certificates.facts import Extensions
from certsync.certificates.reasons import Reason

EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
STRICT_FORBIDDEN_EKUS = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ANY_EKU: "anyExtendedKeyUsage",
}
STRONG_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MIN_RSA_BITS = 2048
WEAK_SIGNATURE_OIDS = {
    "1.2.840.113549.1.1.2": "MD2",
    "1.2.840.113549.1.1.4": "MD5",
    "1.2.840.113549.1.1.5": "SHA-1",
    "1.3.14.3.2.29": "SHA-1",
    "1.2.840.10045.4.1": "SHA-1",
    "1.2.840.10040.4.3": "SHA-1",
}
_KU_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)
# Bits each key family may carry under the S/MIME BR (7.1.2.3), and the ones of which it needs one.
_STRICT_KU = {
    "rsa": ({"digital_signature", "content_commitment", "key_encipherment", "data_encipherment"},
            {"digital_signature", "key_encipherment"}),
    "ec": ({"digital_signature", "content_commitment", "key_agreement", "encipher_only",
            "decipher_only"}, {"digital_signature", "key_agreement"}),
    "edwards": ({"digital_signature", "content_commitment"}, {"digital_signature"}),
}  # fmt: skip
# The enterprise profile also lets any family carry the encryption bits AD CS templates set.
_ENTERPRISE_EXTRA_KU = {"key_agreement", "data_encipherment", "key_encipherment", "encipher_only",
                        "decipher_only", "content_commitment"}  # fmt: skip
# strict? -> family -> (allowed bits, bits of which one is needed); built once, not per certificate.
_ALLOWED_KU = {
    True: {family: (frozenset(allowed), frozenset(needs)) for family, (allowed, needs) in _STRICT_KU.items()},
    False: {family: (frozenset(allowed | _ENTERPRISE_EXTRA_KU), frozenset(needs))
            for family, (allowed, needs) in _STRICT_KU.items()},
}  # fmt: skip


class Refusal(Exception):
    def __init__(self, reason: Reason, rule: str, detail: str, *, until: datetime | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.rule = rule
        self.detail = detail
        self.until = until


@dataclass(frozen=True)
class LeafPolicy:
    profile: str

    def rule(self, name: str) -> str:
        return f"{self.profile}.{name}"

    def check_static(
        self, cert: x509.Certificate, serial: int, extensions: Extensions, *, subject_rdns: int | None = None
    ) -> None:
        """Checks that do not depend on time or trust: serial, CA flag, algorithms, EKU, KU.
        `subject_rdns` is the subject's RDN count when the caller already has it."""
        self.check_serial(serial)
        self.check_end_entity(extensions)
        self.check_san_critical(cert, extensions, subject_rdns=subject_rdns)
        self.check_signature_algorithm(cert)
        family = self.check_key(cert)
        self.check_eku(extensions)
        self.check_key_usage(extensions, family)
        self.check_encryption_capable(extensions, family)

    def static_refusals(
        self, cert: x509.Certificate, serial: int, extensions: Extensions, *, subject_rdns: int | None = None
    ) -> list[Refusal]:
        """Every rule check_static checks that the certificate fails, in check_static's order.
        Key usage is judged for the key's family even when the key itself is refused."""
        found: list[Refusal] = []
        checks: list[Callable[[], object]] = [
            lambda: self.check_serial(serial),
            lambda: self.check_end_entity(extensions),
            lambda: self.check_san_critical(cert, extensions, subject_rdns=subject_rdns),
            lambda: self.check_signature_algorithm(cert),
            lambda: self.check_key(cert),
            lambda: self.check_eku(extensions),
        ]
        for check in checks:
            _collect(found, check)
        family = key_family(cert)
        if family is not None:
            _collect(found, lambda: self.check_key_usage(extensions, family))
            _collect(found, lambda: self.check_encryption_capable(extensions, family))
        return found

    def check_serial(self, serial: int) -> None:
        if serial <= 0:
            raise Refusal(
                Reason.NEGATIVE_SERIAL,
                self.rule("serial_positive"),
                "The serial number is negative or zero (RFC 5280 4.1.2.2).",
            )

    def check_end_entity(self, extensions: Extensions) -> None:
        constraints = extensions.get(x509.BasicConstraints)
        if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
            raise Refusal(
                Reason.NOT_END_ENTITY,
                self.rule("end_entity"),
                "The certificate is a CA certificate (basicConstraints cA=TRUE).",
            )

    def check_san_critical(
        self, cert: x509.Certificate, extensions: Extensions, *, subject_rdns: int | None = None
    ) -> None:
        # RFC 5280 4.2.1.6: with an empty subject the identity lives in the SAN alone, and a
        # relying party that skips non-critical extensions would see an anonymous certificate.
        san = extensions.get(x509.SubjectAlternativeName)
        if san is None:
            return
        if (subject_rdns if subject_rdns is not None else _subject_rdn_count(cert)) != 0:
            return
        if not cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical:
            detail = "The subject is empty and subjectAltName is not critical (RFC 5280 4.2.1.6)."
            raise Refusal(Reason.CHAIN_INVALID, self.rule("san_critical"), detail)

    def check_signature_algorithm(self, cert: x509.Certificate) -> None:
        weak = WEAK_SIGNATURE_OIDS.get(cert.signature_algorithm_oid.dotted_string)
        if weak:
            raise Refusal(
                Reason.WEAK_SIGNATURE,
                self.rule("signature_hash"),
                f"The issuer signed this certificate with {weak}, which is broken.",
            )

    def check_key(self, cert: x509.Certificate) -> str:
        try:
            key = cert.public_key()
        except Exception as exc:  # unsupported curve or algorithm
            detail = f"The public key cannot be used: {type(exc).__name__}."
            raise Refusal(Reason.WEAK_KEY, self.rule("key_algorithm"), detail) from None
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < MIN_RSA_BITS:
                detail = f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required."
                raise Refusal(Reason.WEAK_KEY, self.rule("rsa_key_size"), detail)
            if self.profile == "strict" and key.key_size % 8:
                detail = f"RSA modulus of {key.key_size} bits is not a multiple of 8 (S/MIME BR 6.1.5)."
                raise Refusal(Reason.WEAK_KEY, self.rule("rsa_modulus"), detail)
            return "rsa"
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in STRONG_CURVES:
                detail = f"Elliptic curve {key.curve.name} is not P-256, P-384 or P-521."
                raise Refusal(Reason.WEAK_KEY, self.rule("ec_curve"), detail)
            return "ec"
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return "edwards"
        detail = f"Key type {type(key).__name__} is not allowed for S/MIME."
        raise Refusal(Reason.WEAK_KEY, self.rule("key_algorithm"), detail)

    def check_eku(self, extensions: Extensions) -> None:
        eku = extensions.get(x509.ExtendedKeyUsage)
        if not isinstance(eku, x509.ExtendedKeyUsage):
            detail = "The certificate has no extended key usage; emailProtection is required."
            raise Refusal(Reason.NO_EMAIL_PROTECTION_EKU, self.rule("eku_email"), detail)
        if EMAIL_PROTECTION not in eku:
            detail = "The extended key usage does not include emailProtection."
            raise Refusal(Reason.NO_EMAIL_PROTECTION_EKU, self.rule("eku_email"), detail)
        if self.profile == "strict":
            forbidden = forbidden_ekus(eku)
            if forbidden:
                detail = f"The leaf's extended key usage includes {', '.join(forbidden)}."
                raise Refusal(Reason.PROFILE_EKU_FORBIDDEN, self.rule("leaf_eku_forbidden"), detail)

    def check_key_usage(self, extensions: Extensions, family: str) -> None:
        usage = extensions.get(x509.KeyUsage)
        if not isinstance(usage, x509.KeyUsage):
            if self.profile == "strict":
                detail = "The certificate has no key usage extension; the profile requires one."
                raise Refusal(Reason.KEY_USAGE_UNFIT, self.rule("key_usage"), detail)
            return  # RFC 5280: absent means unrestricted
        bits = _usage_bits(usage)
        allowed, needs_one = _ALLOWED_KU[self.profile == "strict"][family]
        extra = bits - allowed
        if extra or not bits & needs_one:
            shown = ", ".join(sorted(bits)) or "nothing"
            detail = f"Key usage ({shown}) does not fit S/MIME with a {family} key."
            raise Refusal(Reason.KEY_USAGE_UNFIT, self.rule("key_usage"), detail)

    def check_encryption_capable(self, extensions: Extensions, family: str) -> None:
        """A certificate in the GAL is there for senders to encrypt to, so its key must be able to
        receive a content-encryption key: RSA by key transport (keyEncipherment, as OpenSSL's
        smimeencrypt purpose requires), EC by key agreement (S/MIME BR; OpenSSL would insist on
        keyEncipherment, which an EC key cannot do). Edwards keys can only sign."""
        if family == "edwards":
            detail = "Ed25519/Ed448 keys can only sign: no sender could encrypt to this certificate."
            raise Refusal(Reason.KEY_USAGE_UNFIT, self.rule("encryption_capable"), detail)
        usage = extensions.get(x509.KeyUsage)
        if not isinstance(usage, x509.KeyUsage):
            return  # absent means unrestricted
        needed = "key_encipherment" if family == "rsa" else "key_agreement"
        if not getattr(usage, needed):
            detail = f"The key usage lacks {needed} for a {family} key: no sender could encrypt to this certificate."
            raise Refusal(Reason.KEY_USAGE_UNFIT, self.rule("encryption_capable"), detail)

    def check_emails(self, emails: tuple[str, ...], from_san: bool) -> None:
        if not emails:
            detail = "Neither subjectAltName nor the subject carries an e-mail address."
            raise Refusal(Reason.NO_EMAIL_ADDRESS, self.rule("email_present"), detail)
        if self.profile == "strict" and not from_san:
            detail = "The e-mail address is only in the subject DN; the profile requires a SAN."
            raise Refusal(Reason.NO_EMAIL_ADDRESS, self.rule("san_rfc822"), detail)


def _collect(found: list[Refusal], check: Callable[[], object]) -> None:
    try:
        check()
    except Refusal as refusal:
        found.append(refusal)


def key_family(cert: x509.Certificate) -> str | None:
    """ "rsa", "ec" or "edwards" for the key types S/MIME allows (whatever their size), else None."""
    try:
        key = cert.public_key()
    except Exception:  # unsupported curve or algorithm
        return None
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "edwards"
    return None


def forbidden_ekus(eku: x509.ExtendedKeyUsage) -> list[str]:
    return sorted(name for oid, name in STRICT_FORBIDDEN_EKUS.items() if oid in eku)


def _subject_rdn_count(cert: x509.Certificate) -> int:
    try:
        return len(cert.subject.rdns)
    except Exception:  # an undecodable subject is not an empty one
        return -1


def _usage_bits(usage: x509.KeyUsage) -> set[str]:
    bits = {name for name in _KU_BITS if getattr(usage, name)}
    if usage.key_agreement:
        if usage.encipher_only:
            bits.add("encipher_only")
        if usage.decipher_only:
            bits.add("decipher_only")
    return bits


def check_validity(
    not_before: datetime | None, not_after: datetime | None, at: datetime, profile: str
) -> None:
    if not_before is None or not_after is None:
        detail = "The validity period cannot be read."
        raise Refusal(Reason.MALFORMED, f"{profile}.validity", detail)
    if at < not_before:
        detail = f"Valid from {not_before.isoformat()} only."
        raise Refusal(Reason.NOT_YET_VALID, f"{profile}.validity", detail, until=not_before)
    if at > not_after:
        detail = f"Expired at {not_after.isoformat()}."
        raise Refusal(Reason.EXPIRED, f"{profile}.validity", detail)
