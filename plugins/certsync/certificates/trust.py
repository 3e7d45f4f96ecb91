"""Trust configuration: anchors, extra intermediates, CRLs and the validation profile.

Loaded once and failed fast: a missing or unreadable file is a configuration error naming the file,
never a per-certificate refusal. The fingerprint changes whenever anything that can change a verdict
changes, so stored verdicts can be invalidated by comparing it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from certsync.certificates.parse import load_certificate

log = logging.getLogger(__name__)

PROFILES = ("enterprise", "strict")
DEFAULT_CRL_GRACE = timedelta(hours=24)


class TrustConfigError(ValueError):
    """The trust configuration cannot be used; the message names the offending file."""


@dataclass(frozen=True)
class TrustSpec:
    """Picklable description of a trust configuration (paths and settings, no parsed objects)."""

    anchors: Path
    intermediates: tuple[Path, ...] = ()
    crls: tuple[Path, ...] = ()
    profile: str = "enterprise"
    crl_max_age_after_next_update: timedelta = DEFAULT_CRL_GRACE

    def load(self) -> TrustConfig:
        return TrustConfig.load(
            anchors=self.anchors,
            intermediates=self.intermediates,
            crls=self.crls,
            profile=self.profile,
            crl_max_age_after_next_update=self.crl_max_age_after_next_update,
        )


@dataclass(frozen=True)
class LoadedCrl:
    path: Path
    issuer: bytes
    this_update: datetime
    next_update: datetime | None
    revoked: frozenset[int]
    crl: x509.CertificateRevocationList = field(repr=False, compare=False)


@dataclass(frozen=True)
class TrustConfig:
    spec: TrustSpec
    fingerprint: str
    anchors: tuple[x509.Certificate, ...] = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = field(repr=False)
    crls: tuple[LoadedCrl, ...] = field(repr=False)

    @property
    def profile(self) -> str:
        return self.spec.profile

    @classmethod
    def load(
        cls,
        *,
        anchors: Path,
        intermediates: Sequence[Path] = (),
        crls: Sequence[Path] = (),
        profile: str = "enterprise",
        crl_max_age_after_next_update: timedelta = DEFAULT_CRL_GRACE,
    ) -> TrustConfig:
        if profile not in PROFILES:
            raise TrustConfigError(f"unknown validation profile {profile!r}; use one of {PROFILES}")
        spec = TrustSpec(
            anchors=Path(anchors),
            intermediates=tuple(Path(p) for p in intermediates),
            crls=tuple(Path(p) for p in crls),
            profile=profile,
            crl_max_age_after_next_update=crl_max_age_after_next_update,
        )
        roots = _load_certificates(spec.anchors)
        if not roots:
            raise TrustConfigError(f"trust anchor file {spec.anchors} holds no certificate")
        subs = [c for path in spec.intermediates for c in _load_certificates(path)]
        loaded = tuple(_load_crl(path) for path in spec.crls)
        _check_crl_signatures(loaded, [*roots, *subs])
        config = cls(
            spec=spec,
            fingerprint=_fingerprint(spec),
            anchors=tuple(roots),
            intermediates=tuple(subs),
            crls=loaded,
        )
        log.info(
            "trust config %s: %d anchors, %d intermediates, %d CRLs, profile %s",
            config.fingerprint[:16],
            len(roots),
            len(subs),
            len(loaded),
            profile,
        )
        return config


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TrustConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None


def _load_certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path, "certificate")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [load_certificate(data)]
    except ValueError as exc:
        raise TrustConfigError(f"certificate file {path} is not PEM or DER: {exc}") from None


def _load_crl(path: Path) -> LoadedCrl:
    data = _read(path, "CRL")
    try:
        loader = x509.load_pem_x509_crl if b"-----BEGIN" in data else x509.load_der_x509_crl
        crl = loader(data)
        revoked = frozenset(entry.serial_number for entry in crl)
    except ValueError as exc:
        raise TrustConfigError(f"CRL file {path} is not a PEM or DER CRL: {exc}") from None
    return LoadedCrl(
        path=path,
        issuer=crl.issuer.public_bytes(),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=revoked,
        crl=crl,
    )


def _check_crl_signatures(crls: Sequence[LoadedCrl], cas: Sequence[x509.Certificate]) -> None:
    """A CRL issued by a configured CA must verify now; others are checked against each chain."""
    by_subject: dict[bytes, list[x509.Certificate]] = {}
    for ca in cas:
        by_subject.setdefault(ca.subject.public_bytes(), []).append(ca)
    for loaded in crls:
        candidates = by_subject.get(loaded.issuer, [])
        if candidates and not any(crl_signed_by(loaded, ca) for ca in candidates):
            raise TrustConfigError(f"CRL file {loaded.path} is not signed by the configured CA that it names")


def crl_signed_by(loaded: LoadedCrl, ca: x509.Certificate) -> bool:
    try:
        return loaded.crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except Exception:  # unsupported key types simply do not verify
        return False


def crl_usable_from(loaded: LoadedCrl, ca: x509.Certificate) -> bool:
    """True when `ca` signed the CRL and may sign CRLs at all (RFC 5280 6.3.3 (f): cRLSign)."""
    return _may_sign_crls(ca) and crl_signed_by(loaded, ca)


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no key usage: the key is unrestricted
    except Exception:  # unreadable extensions: the path check reports them
        return False
    return usage.crl_sign


def _fingerprint(spec: TrustSpec) -> str:
    digest = hashlib.sha256()
    grace = int(spec.crl_max_age_after_next_update.total_seconds())
    digest.update(f"profile={spec.profile};grace={grace}\n".encode())
    groups = (("anchors", (spec.anchors,)), ("intermediates", spec.intermediates), ("crls", spec.crls))
    for label, paths in groups:
        hashes = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
        digest.update(f"{label}={','.join(hashes)}\n".encode())
    return digest.hexdigest()
