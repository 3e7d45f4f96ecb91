"""Trust configuration: anchors, extra intermediates, CRLs and the validation profile.

Loaded once and failed fast: a missing or unreadable file is a configuration error naming the file,
never a per-certificate refusal. The fingerprint changes whenever anything that can change a verdict
changes, so stored verdicts can be invalidated by comparing it.

This module does not import cryptography: settings name a TrustSpec without paying for it, and the
files are read by trust_files when a configuration is loaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)

PROFILES = ("enterprise", "strict")
DEFAULT_CRL_GRACE = timedelta(hours=24)


class TrustConfigError(ValueError):
    """The trust configuration cannot be used; the message names the offending file (`path`)."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class TrustSpec:
    """Picklable description of a trust configuration (paths and settings, no parsed objects).
    `anchors` may be given as one path; it is kept as a tuple of paths."""

    anchors: tuple[Path, ...]
    intermediates: tuple[Path, ...] = ()
    crls: tuple[Path, ...] = ()
    profile: str = "enterprise"
    crl_max_age_after_next_update: timedelta = DEFAULT_CRL_GRACE

    def __post_init__(self) -> None:
        anchors = self.anchors
        paths = (anchors,) if isinstance(anchors, str | Path) else anchors
        object.__setattr__(self, "anchors", tuple(Path(p) for p in paths))

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
        anchors: Path | Sequence[Path],
        intermediates: Sequence[Path] = (),
        crls: Sequence[Path] = (),
        profile: str = "enterprise",
        crl_max_age_after_next_update: timedelta = DEFAULT_CRL_GRACE,
    ) -> TrustConfig:
        """Read every file; an empty intermediates file holds no intermediate, an anchor file
        without a certificate is an error."""
        from certsync.certificates import trust_files

        if profile not in PROFILES:
            raise TrustConfigError(f"unknown validation profile {profile!r}; use one of {PROFILES}")
        spec = TrustSpec(
            anchors=anchors,  # type: ignore[arg-type]  # one path or several; normalised by the spec
            intermediates=tuple(Path(p) for p in intermediates),
            crls=tuple(Path(p) for p in crls),
            profile=profile,
            crl_max_age_after_next_update=crl_max_age_after_next_update,
        )
        if not spec.anchors:
            raise TrustConfigError("no trust anchor file given")
        roots = [trust_files.load_anchors(path) for path in spec.anchors]
        subs = [c for path in spec.intermediates for c in trust_files.load_certificates(path)]
        loaded = tuple(trust_files.load_crl(path) for path in spec.crls)
        trust_files.check_crl_signatures(loaded, [*(c for r in roots for c in r), *subs])
        config = cls(
            spec=spec,
            fingerprint=_fingerprint(spec),
            anchors=tuple(c for r in roots for c in r),
            intermediates=tuple(subs),
            crls=loaded,
        )
        log.info(
            "trust config %s: %d anchors, %d intermediates, %d CRLs, profile %s",
            config.fingerprint[:16],
            len(config.anchors),
            len(subs),
            len(loaded),
            profile,
        )
        return config


def _fingerprint(spec: TrustSpec) -> str:
    digest = hashlib.sha256()
    grace = int(spec.crl_max_age_after_next_update.total_seconds())
    digest.update(f"profile={spec.profile};grace={grace}\n".encode())
    groups = (("anchors", spec.anchors), ("intermediates", spec.intermediates), ("crls", spec.crls))
    for label, paths in groups:
        hashes = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
        digest.update(f"{label}={','.join(hashes)}\n".encode())
    return digest.hexdigest()
