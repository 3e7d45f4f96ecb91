"""Ed25519 keys of the audit log: the writer's private key (held outside the database, in an Airflow
connection or secrets backend) and the public keys an auditor trusts.

A key is named by its id, `ed25519:` and the first 16 hex digits of the SHA-256 of its raw public
key, so a row, a key row and a checkpoint say which key signed them without carrying the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# The writer's key: the connection's password (base64 of the 32-byte seed, or a PKCS#8 PEM);
# extra.previous_key optionally holds the key it replaces, which then endorses the new one.
AUDIT_SIGNING_CONN_ID = "certsync_audit_signing"  # as certsync.config names it


class AuditKeyError(ValueError):
    """A key cannot be read; the message never contains key material."""


def key_id(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    private: Ed25519PrivateKey = field(repr=False)
    key_id: str
    public_raw: bytes

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey) -> SigningKey:
        raw = public_raw(private.public_key())
        return cls(private=private, key_id=key_id(raw), public_raw=raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls.from_private(Ed25519PrivateKey.generate())

    @classmethod
    def from_text(cls, text: str, *, where: str) -> SigningKey:
        text = text.strip()
        try:
            if text.startswith("-----BEGIN"):
                private = serialization.load_pem_private_key(text.encode(), password=None)
                if not isinstance(private, Ed25519PrivateKey):
                    raise AuditKeyError(f"{where}: the PEM key is not an Ed25519 key")
                return cls.from_private(private)
            seed = base64.b64decode(text, validate=True)
            if len(seed) != 32:
                raise AuditKeyError(f"{where}: an Ed25519 private key is 32 bytes (base64), not {len(seed)}")
            return cls.from_private(Ed25519PrivateKey.from_private_bytes(seed))
        except (ValueError, TypeError, binascii.Error) as exc:
            if isinstance(exc, AuditKeyError):
                raise
            raise AuditKeyError(f"{where}: not an Ed25519 private key (base64 seed or PKCS#8 PEM)") from None

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def private_text(self) -> str:
        """The base64 seed, the form the connection's password takes."""
        raw = self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return base64.b64encode(raw).decode()

    def public_text(self) -> str:
        """What an auditor keeps: the raw public key in base64, with its id as a comment."""
        return f"{base64.b64encode(self.public_raw).decode()} {self.key_id}"


@dataclass(frozen=True, kw_only=True)
class AuditSigner:
    """The key that signs new rows, and the one it replaced (which endorses it in the chain)."""

    key: SigningKey
    previous: SigningKey | None = None


def public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verifies(key: Ed25519PublicKey | None, signature: bytes | None, message: bytes) -> bool:
    if key is None or signature is None or len(signature) != 64:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def parse_public_keys(text: str, *, where: str) -> dict[str, Ed25519PublicKey]:
    """Public keys, one per line (base64 of the raw key, optionally followed by a comment) or PEM
    blocks; keyed by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for block in _pem_blocks(text):
        key = serialization.load_pem_public_key(block.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise AuditKeyError(f"{where}: a PEM public key that is not Ed25519")
        keys[key_id(public_raw(key))] = key
    lines = [line for line in text.splitlines() if line.strip() and "-----" not in line]
    if "-----BEGIN" not in text:
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("#"):
                continue
            try:
                raw = base64.b64decode(line.split()[0], validate=True)
                key = Ed25519PublicKey.from_public_bytes(raw)
            except (ValueError, binascii.Error):
                raise AuditKeyError(f"{where}: line {number} is not an Ed25519 public key (base64)") from None
            keys[key_id(raw)] = key
    if not keys:
        raise AuditKeyError(f"{where}: no public key in it")
    return keys


def _pem_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("-----BEGIN"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("-----END"):
                blocks.append("\n".join(current) + "\n")
                current = None
    return blocks


def read_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuditKeyError(f"public key file {str(path)!r} cannot be read: {exc.strerror}") from None
        keys.update(parse_public_keys(text, where=f"public key file {str(path)!r}"))
    return keys
