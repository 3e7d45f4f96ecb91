"""Read trust anchors, intermediates and CRLs from files (PEM bundles or DER) with cryptography.

Every failure is a TrustConfigError naming the file and carrying its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from certsync.certificates.parse import load_certificate
from certsync.certificates.trust import LoadedCrl, TrustConfigError


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TrustConfigError(f"cannot read {what} file {path}: {exc.strerror}", path=path) from None


def load_anchors(path: Path) -> list[x509.Certificate]:
    roots = load_certificates(path)
    if not roots:
        raise TrustConfigError(f"trust anchor file {path} holds no certificate", path=path)
    return roots


def load_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle or a DER file; none for an empty (or blank) file."""
    data = _read(path, "certificate")
    if not data.strip():
        return []
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [load_certificate(data)]
    except ValueError as exc:
        raise TrustConfigError(f"certificate file {path} is not PEM or DER: {exc}", path=path) from None


def load_crl(path: Path) -> LoadedCrl:
    data = _read(path, "CRL")
    try:
        loader = x509.load_pem_x509_crl if b"-----BEGIN" in data else x509.load_der_x509_crl
        crl = loader(data)
        revoked = frozenset(entry.serial_number for entry in crl)
    except ValueError as exc:
        raise TrustConfigError(f"CRL file {path} is not a PEM or DER CRL: {exc}", path=path) from None
    return LoadedCrl(
        path=path,
        issuer=crl.issuer.public_bytes(),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=revoked,
        crl=crl,
    )


def check_crl_signatures(crls: Sequence[LoadedCrl], cas: Sequence[x509.Certificate]) -> None:
    """A CRL issued by a configured CA must verify now; others are checked against each chain."""
    by_subject: dict[bytes, list[x509.Certificate]] = {}
    for ca in cas:
        by_subject.setdefault(ca.subject.public_bytes(), []).append(ca)
    for loaded in crls:
        candidates = by_subject.get(loaded.issuer, [])
        if candidates and not any(crl_signed_by(loaded, ca) for ca in candidates):
            message = f"CRL file {loaded.path} is not signed by the configured CA that it names"
            raise TrustConfigError(message, path=loaded.path)


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
