"""Development TLS material: a private CA of the project's own and a server certificate from it.

msal refuses plain-http authorities, so the emulator must speak TLS; clients trust it through the
CA file only (never through system stores or environment variables).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_NAME = "certsync development CA"
CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=825)
# Reissue well before expiry so a long-lived lab home never serves an expired certificate.
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def ensure_tls(*, directory: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """Create (or reuse) the CA and a server certificate valid for ``hostnames``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
    )
    ca_key_path = directory / "ca-key.pem"
    if not (files.ca_cert.exists() and ca_key_path.exists()):
        _write_ca(cert_path=files.ca_cert, key_path=ca_key_path)
        files.server_cert.unlink(missing_ok=True)
    if not _server_cert_usable(files=files, hostnames=hostnames):
        _write_server(files=files, ca_key_path=ca_key_path, hostnames=hostnames)
    return files


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_private_file(path: Path, data: bytes) -> None:
    """Write key material atomically, readable by the owner only."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes may write the same file at once
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_file(path, private_key_pem(key))


def certificate_builder(
    key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    lifetime: dt.timedelta,
    *,
    issuer: x509.Name | None = None,
) -> x509.CertificateBuilder:
    """A certificate's builder for `key`: self-signed unless an issuer is given, valid from five
    minutes ago (clock skew) for `lifetime`."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
    )


def private_key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_ca(*, cert_path: Path, key_path: Path) -> None:
    key = _new_key()
    cert = (
        certificate_builder(key, CA_NAME, CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created development CA %s", cert_path.name)


def _san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _server_cert_usable(*, files: TlsFiles, hostnames: Sequence[str]) -> bool:
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    if cert.issuer != ca.subject:
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < dt.datetime.now(dt.UTC):
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return all(entry in san for entry in _san_entries(hostnames))


def _write_server(*, files: TlsFiles, ca_key_path: Path, hostnames: Sequence[str]) -> None:
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    key = _new_key()
    cert = (
        certificate_builder(key, hostnames[0], SERVER_LIFETIME, issuer=ca_cert.subject)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(files.server_key, key)
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("issued emulator server certificate for %s", ",".join(hostnames))
