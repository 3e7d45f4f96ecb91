"""A synthetic PKI for tests, demo populations and benchmarks.

Builds a trusted root -> intermediate hierarchy, an "unknown" hierarchy that is never written to the
trust files, CRLs, and S/MIME leaf certificates with any mix of good and bad properties. Leaf keys come
from a small pool that is generated once (and optionally cached on disk) because RSA key generation is
far slower than signing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from asn1crypto import algos, cms
from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from certsync_lab.emulator.tls import private_key_pem, write_private_file

log = logging.getLogger(__name__)

EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH.dotted_string
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING.dotted_string
TIME_STAMPING = ExtendedKeyUsageOID.TIME_STAMPING.dotted_string
ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE.dotted_string
EFS = "1.3.6.1.4.1.311.10.3.4"
# What AD CS "User" templates put in a leaf.
ENTERPRISE_EKU = (EFS, EMAIL_PROTECTION, CLIENT_AUTH)
DEFAULT_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
MS_ENCRYPTION_KEY_PREFERENCE = "1.3.6.1.4.1.311.16.4"

_KU_NAMES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
_HASHES: dict[str, Any] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha1": hashes.SHA1,
    "md5": hashes.MD5,
}

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


def _generate(kind: str) -> PrivateKey:
    curves = {
        "ec-p256": ec.SECP256R1,
        "ec-p384": ec.SECP384R1,
        "ec-p521": ec.SECP521R1,
        "ec-secp256k1": ec.SECP256K1,
        "ec-p192": ec.SECP192R1,
    }
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind in curves:
        return ec.generate_private_key(curves[kind]())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ed448":
        return ed448.Ed448PrivateKey.generate()
    if kind == "dsa2048":
        return dsa.generate_private_key(key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}")


class KeyPool:
    """Hands out private keys by (kind, slot), generating each once and caching it on disk if asked."""

    def __init__(self, *, cache_dir: Path | None = None, size: int = 4) -> None:
        self._cache_dir = cache_dir
        self._size = size
        self._keys: dict[tuple[str, str], PrivateKey] = {}

    def ca_key(self, *, kind: str, name: str) -> PrivateKey:
        return self._get(kind, f"ca-{name}")

    def leaf_key(self, *, kind: str, index: int) -> PrivateKey:
        return self._get(kind, f"leaf-{index % self._size}")

    def _get(self, kind: str, slot: str) -> PrivateKey:
        cached = self._keys.get((kind, slot))
        if cached is not None:
            return cached
        key = self._load(kind, slot)
        if key is None:
            key = _generate(kind)
            self._store(kind, slot, key)
        self._keys[(kind, slot)] = key
        return key

    def _path(self, kind: str, slot: str) -> Path | None:
        if self._cache_dir is None:
            return None
        return self._cache_dir / f"{kind}-{slot}.pem"

    def _load(self, kind: str, slot: str) -> PrivateKey | None:
        path = self._path(kind, slot)
        if path is None or not path.exists():
            return None
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return key  # type: ignore[return-value]

    def _store(self, kind: str, slot: str, key: PrivateKey) -> None:
        path = self._path(kind, slot)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, private_key_pem(key))  # created 0600: never readable by others


@dataclass
class CertificateAuthority:
    name: str
    certificate: x509.Certificate
    key: PrivateKey = field(repr=False)
    trusted: bool
    revoked_serials: list[int] = field(default_factory=list)

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class TrustFiles:
    anchors: Path
    intermediates: Path
    crls: list[Path]


def _sign_hash(key: PrivateKey, sig_hash: str) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return _HASHES[sig_hash]()


def _name(common_name: str, email: str | None = None, org: str = "Certsync Lab") -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


def _key_usage(flags: dict[str, bool]) -> x509.KeyUsage:
    unknown = set(flags) - set(_KU_NAMES)
    if unknown:
        raise ValueError(f"unknown key usage flags {sorted(unknown)}")
    values = {name: bool(flags.get(name, False)) for name in _KU_NAMES}
    if not values["key_agreement"]:
        values["encipher_only"] = values["decipher_only"] = False
    return x509.KeyUsage(**values)


def default_key_usage(kind: str) -> dict[str, bool]:
    """Key usage a well-behaved CA puts in an S/MIME leaf for this key type."""
    if kind.startswith("rsa"):
        return {"digital_signature": True, "key_encipherment": True}
    if kind.startswith("ec"):
        return {"digital_signature": True, "key_agreement": True}
    return {"digital_signature": True}


_UNSET: Any = object()
_RAW_SIG_NAMES = {
    ("rsa", "sha1"): "sha1_rsa",
    ("rsa", "md5"): "md5_rsa",
    ("rsa", "sha256"): "sha256_rsa",
    ("ec", "sha1"): "sha1_ecdsa",
    ("ec", "sha256"): "sha256_ecdsa",
}


class Pki:
    """A deterministic (given a key cache) synthetic PKI with trusted and unknown hierarchies.

    Issuers: "root" (trusted anchor), "intermediate" (trusted, EKU emailProtection+clientAuth),
    "intermediate-tls" (trusted, but its EKU includes serverAuth), "hidden" (under the trusted root
    but absent from the trust files), "unknown" (under a root nobody trusts), "eku-root-ca" (under a
    trusted root that itself carries an EKU).
    """

    def __init__(
        self,
        *,
        algorithm: str = "rsa",
        seed: int = 0,
        now: datetime = DEFAULT_EPOCH,
        key_cache: Path | None = None,
        leaf_pool_size: int = 4,
        serial_stream: int = 0,
    ) -> None:
        """`serial_stream` lets several processes issue from the same PKI without serial clashes."""
        if algorithm not in ("rsa", "ec"):
            raise ValueError("algorithm must be 'rsa' or 'ec'")
        self.algorithm = algorithm
        self.seed = seed
        self.now = now
        self.keys = KeyPool(cache_dir=key_cache, size=leaf_pool_size)
        self.default_leaf_key = "rsa2048" if algorithm == "rsa" else "ec-p256"
        self._counter = 0
        self._leaf_keys: dict[int, PrivateKey] = {}
        self._ski_cache: dict[int, x509.SubjectKeyIdentifier] = {}
        self.cas: dict[str, CertificateAuthority] = {}
        self._stream = 0  # CA certificates are identical in every stream
        self._build_hierarchies()
        self._stream = serial_stream

    # -- CA hierarchy -------------------------------------------------------------------------

    def _ca_kinds(self) -> tuple[str, str]:
        return ("rsa2048", "rsa2048") if self.algorithm == "rsa" else ("ec-p384", "ec-p256")

    def _build_hierarchies(self) -> None:
        root_kind, sub_kind = self._ca_kinds()
        sub_eku = (EMAIL_PROTECTION, CLIENT_AUTH)
        self._make_ca("root", kind=root_kind, parent=None, trusted=True, eku=None)
        self._make_ca("intermediate", kind=sub_kind, parent="root", trusted=True, eku=sub_eku)
        tls_eku = (SERVER_AUTH, EMAIL_PROTECTION)
        self._make_ca("intermediate-tls", kind=sub_kind, parent="root", trusted=True, eku=tls_eku)
        self._make_ca("hidden", kind=sub_kind, parent="root", trusted=False, eku=sub_eku)
        self._make_ca("unknown-root", kind=root_kind, parent=None, trusted=False, eku=None)
        self._make_ca("unknown", kind=sub_kind, parent="unknown-root", trusted=False, eku=sub_eku)
        root_eku = (EMAIL_PROTECTION,)
        self._make_ca("eku-root", kind=root_kind, parent=None, trusted=True, eku=root_eku)
        self._make_ca("eku-root-ca", kind=sub_kind, parent="eku-root", trusted=True, eku=sub_eku)

    def _make_ca(
        self, name: str, *, kind: str, parent: str | None, trusted: bool, eku: tuple[str, ...] | None
    ) -> None:
        key = self.keys.ca_key(kind=kind, name=f"{self.seed}-{name}")
        subject = _name(f"Certsync Lab {name} CA {self.seed}")
        issuer = self.cas[parent] if parent else None
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.certificate.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(self._next_serial())
            .not_valid_before(self.now - timedelta(days=3650))
            .not_valid_after(self.now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None if not parent else 0), True)
            .add_extension(_key_usage({"key_cert_sign": True, "crl_sign": True}), True)
            .add_extension(self._ski(key), False)
        )
        if issuer is not None:
            builder = builder.add_extension(self._aki(issuer), False)
        if eku:
            oids = [ObjectIdentifier(o) for o in eku]
            builder = builder.add_extension(x509.ExtendedKeyUsage(oids), False)
        signer = issuer.key if issuer else key
        cert = builder.sign(signer, _sign_hash(signer, "sha256"))  # type: ignore[arg-type]
        self.cas[name] = CertificateAuthority(name=name, certificate=cert, key=key, trusted=trusted)

    def _ski(self, key: PrivateKey) -> x509.SubjectKeyIdentifier:
        cached = self._ski_cache.get(id(key))
        if cached is None:
            cached = x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[arg-type]
            self._ski_cache[id(key)] = cached
        return cached

    def _aki(self, ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski(ca.key))

    def _next_serial(self) -> int:
        self._counter += 1
        stream = f"/{self._stream}" if self._stream else ""
        digest = hashlib.sha256(f"{self.seed}{stream}:{self._counter}".encode()).digest()
        # 127 bits, never zero, always positive: what CAs are told to use.
        return (int.from_bytes(digest[:16], "big") >> 1) | 1

    def ca_der(self, name: str) -> bytes:
        return self.cas[name].der

    # -- leaves -------------------------------------------------------------------------------

    def issue(
        self,
        *,
        email: str,
        key: str | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        eku: tuple[str, ...] | None = ENTERPRISE_EKU,
        key_usage: dict[str, bool] | None = _UNSET,
        san_emails: Sequence[str] | None = _UNSET,
        subject_email: str | None = None,
        smtputf8_mailbox: str | None = None,
        sig_hash: str = "sha256",
        negative_serial: bool = False,
        issuer: str = "intermediate",
        revoked: bool = False,
        extra_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> bytes:
        """Issue one leaf and return its DER. `None` for eku/key_usage/san_emails omits the extension."""
        kind = key or self.default_leaf_key
        ca = self.cas[issuer]
        serial = self._next_serial()
        leaf_key = self.keys.leaf_key(kind=kind, index=serial)
        if key_usage is _UNSET:
            key_usage = default_key_usage(kind)
        if san_emails is _UNSET:
            san_emails = (email,)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(email.split("@")[0], subject_email))
            .issuer_name(ca.certificate.subject)
            .public_key(leaf_key.public_key())  # type: ignore[arg-type]
            .serial_number(serial)
            .not_valid_before(not_before or self.now - timedelta(days=1))
            .not_valid_after(not_after or self.now + timedelta(days=365))
        )
        builder = self._leaf_extensions(builder, ca, leaf_key)
        builder = _leaf_extensions(builder, eku, key_usage, san_emails, smtputf8_mailbox)
        for ext, critical in extra_extensions:
            builder = builder.add_extension(ext, critical)
        der = self._sign(builder, ca, sig_hash=sig_hash, negative=negative_serial)
        self._leaf_keys[serial] = leaf_key
        if revoked:
            ca.revoked_serials.append(serial)
        return der

    def _leaf_extensions(
        self, builder: x509.CertificateBuilder, ca: CertificateAuthority, key: PrivateKey
    ) -> x509.CertificateBuilder:
        return (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(self._aki(ca), False)
            .add_extension(self._ski(key), False)
        )

    def leaf_key_for(self, der: bytes) -> PrivateKey:
        """The private key of a leaf issued here (for building signed PKCS#7 blobs)."""
        serial = abs(asn1_x509.Certificate.load(der).serial_number)
        return self._leaf_keys[serial]

    # -- CRLs and trust files -----------------------------------------------------------------

    def crl_der(
        self,
        ca_name: str,
        *,
        this_update: datetime | None = None,
        next_update: datetime | None = None,
    ) -> bytes:
        """A CRL of `ca_name` listing every serial issued with revoked=True."""
        ca = self.cas[ca_name]
        this_update = this_update or self.now - timedelta(hours=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.certificate.subject)
            .last_update(this_update)
            .next_update(next_update or this_update + timedelta(days=7))
            .add_extension(self._aki(ca), False)
            .add_extension(x509.CRLNumber(len(ca.revoked_serials) + 1), False)
        )
        for serial in ca.revoked_serials:
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update - timedelta(minutes=5))
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(ca.key, _sign_hash(ca.key, "sha256"))  # type: ignore[arg-type]
        return crl.public_bytes(serialization.Encoding.DER)

    def write_trust_files(
        self,
        directory: Path,
        *,
        crl_this_update: datetime | None = None,
        crl_next_update: datetime | None = None,
    ) -> TrustFiles:
        """Write the trusted roots, trusted intermediates and CRLs (PEM bundles, DER CRLs)."""
        directory.mkdir(parents=True, exist_ok=True)
        trusted = [ca for ca in self.cas.values() if ca.trusted]
        roots = [ca for ca in trusted if ca.certificate.issuer == ca.certificate.subject]
        subs = [ca for ca in trusted if ca not in roots]
        anchors = directory / "anchors.pem"
        anchors.write_bytes(b"".join(_pem(ca.certificate) for ca in roots))
        intermediates = directory / "intermediates.pem"
        intermediates.write_bytes(b"".join(_pem(ca.certificate) for ca in subs))
        crls = []
        for ca in [*trusted, self.cas["hidden"]]:
            path = directory / f"{ca.name}.crl"
            path.write_bytes(self.crl_der(ca.name, this_update=crl_this_update, next_update=crl_next_update))
            crls.append(path)
        return TrustFiles(anchors=anchors, intermediates=intermediates, crls=crls)

    # -- PKCS#7 -------------------------------------------------------------------------------

    def pkcs7_certs_only(self, ders: Sequence[bytes], *, ber: bool = False) -> bytes:
        """A degenerate SignedData carrying only certificates (what many tools publish)."""
        certs = [x509.load_der_x509_certificate(d) for d in ders]
        blob = pkcs7.serialize_certificates(certs, serialization.Encoding.DER)
        return to_indefinite_length(blob) if ber else blob

    def pkcs7_signed(
        self,
        *,
        signer: bytes,
        extra: Sequence[bytes] = (),
        encryption_cert: bytes | None = None,
        ber: bool = False,
    ) -> bytes:
        """A detached SignedData signed by `signer` (a leaf issued here), as Outlook publishes.

        With `encryption_cert`, the signed attributes name it via SMIMEEncryptionKeyPreference and
        Microsoft's 1.3.6.1.4.1.311.16.4, and it is included in the certificates.
        """
        key = self.leaf_key_for(signer)
        if encryption_cert is not None:
            blob = self._outlook_signed(signer, key, [encryption_cert, *extra], encryption_cert)
        else:
            blob = _cryptography_signed(signer, key, extra)
        return to_indefinite_length(blob) if ber else blob

    def _outlook_signed(
        self, signer: bytes, key: PrivateKey, extra: Sequence[bytes], preferred: bytes
    ) -> bytes:
        signer_cert = asn1_x509.Certificate.load(signer)
        attrs = cms.CMSAttributes(_signed_attributes(self.now, asn1_x509.Certificate.load(preferred)))
        signature = _raw_sign(key, attrs.dump(), "sha256")
        family = "rsassa_pkcs1v15" if isinstance(key, rsa.RSAPrivateKey) else "sha256_ecdsa"
        signer_info = cms.SignerInfo(
            {
                "version": "v1",
                "sid": cms.SignerIdentifier(
                    name="issuer_and_serial_number", value=_issuer_and_serial(signer_cert)
                ),
                "digest_algorithm": {"algorithm": "sha256"},
                "signed_attrs": attrs,
                "signature_algorithm": {"algorithm": family},
                "signature": signature,
            }
        )
        certs = [signer_cert] + [asn1_x509.Certificate.load(d) for d in extra]
        signed = cms.SignedData(
            {
                "version": "v1",
                "digest_algorithms": [{"algorithm": "sha256"}],
                "encap_content_info": {"content_type": "data"},
                "certificates": [cms.CertificateChoices(name="certificate", value=c) for c in certs],
                "signer_infos": [signer_info],
            }
        )
        return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()

    def _sign(self, builder: x509.CertificateBuilder, ca: CertificateAuthority, **kw: Any) -> bytes:
        sig_hash, negative = kw["sig_hash"], kw["negative"]
        if not negative and sig_hash in ("sha256", "sha384"):
            cert = builder.sign(ca.key, _sign_hash(ca.key, sig_hash))  # type: ignore[arg-type]
            return cert.public_bytes(serialization.Encoding.DER)
        # cryptography refuses negative serials and some digests: re-sign the TBS by hand.
        draft = builder.sign(ca.key, _sign_hash(ca.key, "sha256"))  # type: ignore[arg-type]
        return _resign(draft.public_bytes(serialization.Encoding.DER), ca.key, sig_hash, negative)


def _leaf_extensions(
    builder: x509.CertificateBuilder,
    eku: tuple[str, ...] | None,
    key_usage: dict[str, bool] | None,
    san_emails: Sequence[str] | None,
    smtputf8_mailbox: str | None,
) -> x509.CertificateBuilder:
    if key_usage is not None:
        builder = builder.add_extension(_key_usage(key_usage), True)
    if eku is not None:
        oids = [ObjectIdentifier(o) for o in eku]
        builder = builder.add_extension(x509.ExtendedKeyUsage(oids), False)
    names: list[x509.GeneralName] = [x509.RFC822Name(e) for e in san_emails or ()]
    if smtputf8_mailbox:
        value = asn1_core.UTF8String(smtputf8_mailbox).dump()
        names.append(x509.OtherName(ObjectIdentifier("1.3.6.1.5.5.7.8.9"), value))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder


def _raw_sign(key: PrivateKey, data: bytes, sig_hash: str) -> bytes:
    algorithm = _HASHES[sig_hash]()
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), algorithm)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(algorithm))
    raise ValueError("raw signing supports RSA and EC issuers only")


def _resign(der: bytes, key: PrivateKey, sig_hash: str, negative: bool) -> bytes:
    cert = asn1_x509.Certificate.load(der)
    tbs = cert["tbs_certificate"]
    family = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
    algorithm = algos.SignedDigestAlgorithm({"algorithm": _RAW_SIG_NAMES[(family, sig_hash)]})
    tbs["signature"] = algorithm
    if negative:
        tbs["serial_number"] = -abs(tbs["serial_number"].native)
    tbs_der = tbs.dump(force=True)
    signature = _raw_sign(key, tbs_der, sig_hash)
    rebuilt = asn1_x509.Certificate(
        {
            "tbs_certificate": asn1_x509.TbsCertificate.load(tbs_der),
            "signature_algorithm": algorithm,
            "signature_value": signature,
        }
    )
    return rebuilt.dump()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issuer_and_serial(cert: asn1_x509.Certificate) -> cms.IssuerAndSerialNumber:
    return cms.IssuerAndSerialNumber({"issuer": cert.issuer, "serial_number": cert.serial_number})


def _signed_attributes(now: datetime, preferred: asn1_x509.Certificate) -> list[dict[str, Any]]:
    ias = _issuer_and_serial(preferred)
    capabilities = [{"capability_id": name} for name in ("aes256_cbc", "aes128_cbc", "tripledes_3key")]
    return [
        {"type": "content_type", "values": ["data"]},
        {"type": "signing_time", "values": [cms.Time(name="utc_time", value=now)]},
        {"type": "message_digest", "values": [hashlib.sha256(b"").digest()]},
        {"type": "smime_capabilities", "values": [capabilities]},
        {
            "type": "encrypt_key_pref",
            "values": [cms.SMIMEEncryptionKeyPreference(name="issuer_and_serial_number", value=ias)],
        },
        {"type": MS_ENCRYPTION_KEY_PREFERENCE, "values": [asn1_core.Any.load(ias.dump())]},
    ]


def _cryptography_signed(signer: bytes, key: PrivateKey, extra: Iterable[bytes]) -> bytes:
    signer_cert = x509.load_der_x509_certificate(signer)
    builder = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(b"certsync")
        .add_signer(
            signer_cert,
            key,  # type: ignore[arg-type]
            hashes.SHA256(),
        )
    )
    for der in extra:
        builder = builder.add_certificate(x509.load_der_x509_certificate(der))
    return builder.sign(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]
    )


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """Return (header_length, content_length, tag_byte) of the DER TLV at `pos`."""
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        return 2, first, tag
    count = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
    return 2 + count, length, tag


def to_indefinite_length(der: bytes, *, depth: int = 3) -> bytes:
    """Re-encode the outer `depth` levels of constructed TLVs with BER indefinite lengths."""
    header, length, tag = _read_tlv(der, 0)
    content = der[header : header + length]
    if depth == 0 or not tag & 0x20:
        return der[: header + length]
    children = []
    pos = 0
    while pos < len(content):
        child_header, child_length, _ = _read_tlv(content, pos)
        end = pos + child_header + child_length
        children.append(to_indefinite_length(content[pos:end], depth=depth - 1))
        pos = end
    return bytes([tag, 0x80]) + b"".join(children) + b"\x00\x00"


# -- planted certificates: one per outcome, for tests, demos and the openssl comparison --------


@dataclass(frozen=True)
class Planted:
    """A value with the reason code each profile must give it (None: valid)."""

    name: str
    attribute: str
    value: bytes = field(repr=False)
    enterprise: str | None
    strict: str | None
    # The openssl verify purpose that matches the key: EC and EdDSA keys cannot do key transport.
    purpose: str = "smimeencrypt"

    def expected(self, profile: str) -> str | None:
        return self.strict if profile == "strict" else self.enterprise


def pkcs7_without_certificates() -> bytes:
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [],
            "encap_content_info": {"content_type": "data"},
            "signer_infos": [],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def _unknown_critical_extension() -> tuple[x509.ExtensionType, bool]:
    oid = ObjectIdentifier("1.3.6.1.4.1.99999.1")
    return x509.UnrecognizedExtension(oid, b"\x05\x00"), True


def planted_values(pki: Pki, *, domain: str = "example.org") -> list[Planted]:
    """Certificates covering every certificate-level reason code and the profile differences."""
    return [*_planted_leaves(pki, domain), *_planted_raw_values(pki, domain)]


def _planted_leaves(pki: Pki, domain: str) -> list[Planted]:
    day = timedelta(days=1)

    def leaf(name: str, enterprise: str | None, strict: str | None, **kw: Any) -> Planted:
        key = kw.get("key", pki.default_leaf_key)
        purpose = "smimeencrypt" if key.startswith("rsa") else "smimesign"
        value = pki.issue(email=kw.pop("email", f"{name}@{domain}"), **kw)
        return Planted(name, "userCertificate", value, enterprise, strict, purpose)

    return [
        leaf("valid-rsa", None, None, key="rsa2048"),
        leaf("valid-ec-p256", None, None, key="ec-p256"),
        leaf("valid-ec-p384", None, None, key="ec-p384"),
        leaf("ed25519-sign-only", "key_usage_unfit", "key_usage_unfit", key="ed25519"),
        leaf("rsa-sign-only", "key_usage_unfit", "key_usage_unfit", key_usage={"digital_signature": True}),
        leaf("valid-root-issued", None, None, issuer="root"),
        leaf("valid-smtputf8", None, None, san_emails=(), smtputf8_mailbox=f"jörg@{domain}"),
        leaf("no-key-usage", None, "key_usage_unfit", key_usage=None),
        leaf("subject-email-only", None, "no_email_address", san_emails=None,
             subject_email=f"subject-email-only@{domain}"),
        leaf("tls-intermediate", None, "profile_eku_forbidden", issuer="intermediate-tls"),
        leaf("eku-root", None, "profile_eku_forbidden", issuer="eku-root-ca"),
        leaf("leaf-server-auth", None, "profile_eku_forbidden",
             eku=(EMAIL_PROTECTION, CLIENT_AUTH, SERVER_AUTH)),
        leaf("expired", "expired", "expired", not_before=pki.now - 400 * day,
             not_after=pki.now - day),
        leaf("not-yet-valid", "not_yet_valid", "not_yet_valid", not_before=pki.now + day),
        leaf("no-eku", "no_email_protection_eku", "no_email_protection_eku", eku=None),
        leaf("client-auth-only", "no_email_protection_eku", "no_email_protection_eku",
             eku=(CLIENT_AUTH,)),
        leaf("key-usage-unfit", "key_usage_unfit", "key_usage_unfit",
             key_usage={"data_encipherment": True}),
        leaf("unknown-issuer", "unknown_issuer", "unknown_issuer", issuer="unknown"),
        leaf("missing-intermediate", "unknown_issuer", "unknown_issuer", issuer="hidden"),
        leaf("revoked", "revoked", "revoked", revoked=True),
        leaf("no-email", "no_email_address", "no_email_address", san_emails=None),
        leaf("rsa1024", "weak_key", "weak_key", key="rsa1024"),
        leaf("secp256k1", "weak_key", "weak_key", key="ec-secp256k1"),
        leaf("sha1", "weak_signature", "weak_signature", sig_hash="sha1"),
        leaf("md5", "weak_signature", "weak_signature", sig_hash="md5"),
        leaf("negative-serial", "negative_serial", "negative_serial", negative_serial=True),
        leaf("unknown-critical-extension", "chain_invalid", "chain_invalid",
             extra_extensions=[_unknown_critical_extension()]),
    ]  # fmt: skip


def _planted_raw_values(pki: Pki, domain: str) -> list[Planted]:
    """Broken DER, CA certificates and PKCS#7 blobs."""
    cert, smime = "userCertificate", "userSMIMECertificate"
    ok = pki.issue(email=f"good@{domain}")
    truncated = ok[: len(ok) // 2]
    bad_signature = bytearray(pki.issue(email=f"badsig@{domain}"))
    bad_signature[-5] ^= 0xFF
    hidden = pki.issue(email=f"hidden-in-p7@{domain}", issuer="hidden")
    signer = pki.issue(email=f"signer@{domain}")
    encryption = pki.issue(email=f"signer@{domain}")
    inter = pki.ca_der("intermediate")
    return [
        Planted("bad-signature", cert, bytes(bad_signature), "chain_invalid", "chain_invalid"),
        Planted("ca-as-leaf", cert, inter, "not_end_entity", "not_end_entity"),
        Planted("truncated", cert, truncated, "malformed", "malformed"),
        Planted("garbage", cert, b"\x30\x82\x01\x00" + bytes(range(256)), "malformed", "malformed"),
        Planted("too-large", cert, ok + bytes(70_000), "too_large", "too_large"),
        Planted("p7-no-certificates", smime, pkcs7_without_certificates(), "no_certificate",
                "no_certificate"),
        Planted("p7-certs-only", smime, pki.pkcs7_certs_only([inter, ok]), None, None),
        Planted("p7-certs-only-ber", smime, pki.pkcs7_certs_only([ok], ber=True), None, None),
        Planted("p7-hidden-intermediate", smime,
                pki.pkcs7_certs_only([hidden, pki.ca_der("hidden")]), None, None),
        Planted("p7-signed", smime, pki.pkcs7_signed(signer=signer, extra=[inter]), None, None),
        Planted("p7-outlook-ber", smime,
                pki.pkcs7_signed(signer=signer, encryption_cert=encryption, ber=True), None, None),
    ]  # fmt: skip
