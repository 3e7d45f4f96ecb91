"""Path validation to the configured anchors, CA-level profile rules and CRL revocation.

cryptography's verifier re-checks every signature up to the root on each call. Once an intermediate
has been verified at a validation time, it is added to a second Store as if it were an anchor, so
later leaves under it cost one signature check; its own validity, revocation and profile rules were
settled when it was promoted. Intermediates under name-constrained CAs are never promoted, because the
shortcut would skip the constraints of the CAs above them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509 import verification as xv

from certsync.certificates.facts import name_text
from certsync.certificates.policy import ANY_EKU, EMAIL_PROTECTION, Refusal, forbidden_ekus
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import LoadedCrl, TrustConfig, crl_signed_by

log = logging.getLogger(__name__)

MARKER = "certsync-refusal="
_CaCheck = tuple[Refusal | None, datetime | None]


def earliest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


class ChainChecker:
    def __init__(self, *, trust: TrustConfig) -> None:
        self._trust = trust
        self._profile = trust.profile
        self._anchors = list(trust.anchors)
        self._intermediates = list(trust.intermediates)
        self._configured = frozenset(trust.intermediates)
        self._crls: dict[bytes, list[LoadedCrl]] = {}
        for loaded in trust.crls:
            self._crls.setdefault(loaded.issuer, []).append(loaded)
        self._at: datetime | None = None
        self._reset()

    def _reset(self) -> None:
        self._full: xv.ClientVerifier | None = None
        self._fast: xv.ClientVerifier | None = None
        self._promoted: dict[x509.Certificate, list[x509.Certificate]] = {}
        self._ca_checks: dict[tuple[x509.Certificate, ...], _CaCheck] = {}
        self._crl_ok: dict[tuple[int, x509.Certificate], bool] = {}
        self._names: dict[x509.Certificate, tuple[bytes, str]] = {}

    def check(
        self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], at: datetime
    ) -> tuple[datetime | None, str]:
        """Verify the leaf's chain and revocation at `at`.

        Returns until when that holds and the issuer's name.
        """
        if at != self._at:
            self._at = at
            self._reset()
        chain = self._build(leaf, extra, at)
        cas = tuple(chain[1:])
        refusal, ca_until = self._ca_checks.get(cas) or self._check_cas(cas, at)
        if refusal is not None:
            raise refusal
        issuer_key, issuer_text = self._name_of(cas[0])
        leaf_until = self._revocation(leaf, issuer_key, cas[0], at, what="certificate")
        return earliest([leaf_until, ca_until]), issuer_text

    def _name_of(self, ca: x509.Certificate) -> tuple[bytes, str]:
        known = self._names.get(ca)
        if known is None:
            known = (ca.subject.public_bytes(), name_text(ca, "subject"))
            self._names[ca] = known
        return known

    # -- path building ----------------------------------------------------------------------

    def _build(
        self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], at: datetime
    ) -> list[x509.Certificate]:
        if self._fast is not None:
            # Trying is cheaper than reading the leaf's issuer name to see whether it would work.
            try:
                short = self._fast.verify(leaf, []).chain
                if len(short) == 2 and self._usable(short[1], extra):
                    return [leaf, *self._promoted[short[1]]]
            except xv.VerificationError:
                pass  # fall back to the full path for an exact diagnosis
        if self._full is None:
            self._full = self._verifier(self._anchors, at)
        try:
            chain = self._full.verify(leaf, [*self._intermediates, *extra]).chain
        except xv.VerificationError as exc:
            raise self._refusal(str(exc)) from None
        self._maybe_promote(chain, at)
        return chain

    def _usable(self, ca: x509.Certificate, extra: Sequence[x509.Certificate]) -> bool:
        # A verdict depends only on the value and the trust config: an intermediate learned from
        # another user's PKCS#7 blob must not help a leaf whose own value lacks it.
        return ca in self._promoted and (ca in self._configured or ca in extra)

    def _maybe_promote(self, chain: list[x509.Certificate], at: datetime) -> None:
        if len(chain) < 3 or chain[1] in self._promoted:
            return
        for ca in chain[1:]:
            try:
                ca.extensions.get_extension_for_class(x509.NameConstraints)
                return
            except x509.ExtensionNotFound:
                continue
        self._promoted[chain[1]] = chain[1:]
        self._fast = self._verifier([*self._anchors, *self._promoted], at)
        log.debug("promoted intermediate %s", chain[1].subject.rfc4514_string())

    def _verifier(self, store: list[x509.Certificate], at: datetime) -> xv.ClientVerifier:
        # The leaf's EKU was checked before path building, with a precise reason.
        ee = xv.ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, None
        )
        if self._profile != "strict":
            # Legacy AD CS leaves may carry the address only in the subject DN.
            ee = ee.may_be_present(x509.SubjectAlternativeName, xv.Criticality.AGNOSTIC, None)
        ca = xv.ExtensionPolicy.webpki_defaults_ca().may_be_present(
            x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, self._ca_eku
        )
        builder = xv.PolicyBuilder().store(xv.Store(store)).time(at)
        return builder.extension_policies(ca_policy=ca, ee_policy=ee).build_client_verifier()

    def _ca_eku(self, _policy: object, cert: x509.Certificate, eku: object) -> None:
        if eku is None or not isinstance(eku, x509.ExtendedKeyUsage):
            return
        if EMAIL_PROTECTION not in eku and ANY_EKU not in eku:
            rule = f"{self._profile}.ca_eku_email"
            text = "A CA in the chain restricts its extended key usage without emailProtection."
            raise ValueError(f"{MARKER}{Reason.NO_EMAIL_PROTECTION_EKU.value}|{rule}|{text}")

    def _refusal(self, message: str) -> Refusal:
        rule = f"{self._profile}.chain"
        if MARKER in message:
            reason, rule, text = message.split(MARKER, 1)[1].split("|", 2)
            return Refusal(Reason(reason), rule, text.split(" (encountered", 1)[0])
        if "Forbidden signature algorithm" in message:
            text = "A CA certificate in the chain is signed with a forbidden algorithm (SHA-1/MD5)."
            return Refusal(Reason.WEAK_SIGNATURE, f"{self._profile}.chain_signature_hash", text)
        if "all candidates exhausted with no interior errors" in message:
            text = "No path to a configured trust anchor (unknown issuer or missing intermediate)."
            return Refusal(Reason.UNKNOWN_ISSUER, f"{self._profile}.anchor", text)
        text = message.split(" (encountered", 1)[0].removeprefix("validation failed: ")
        return Refusal(Reason.CHAIN_INVALID, rule, f"Chain validation failed: {text[:300]}")

    # -- CA rules and revocation --------------------------------------------------------------

    def _check_cas(self, cas: tuple[x509.Certificate, ...], at: datetime) -> _CaCheck:
        result: _CaCheck
        try:
            until = earliest(c.not_valid_after_utc for c in cas)
            for index, ca in enumerate(cas[:-1]):
                self._strict_ca_eku(ca, is_root=False)
                issuer_key = self._name_of(cas[index + 1])[0]
                revoked_until = self._revocation(ca, issuer_key, cas[index + 1], at, what="CA")
                until = earliest([until, revoked_until])
            self._strict_ca_eku(cas[-1], is_root=True)
            result = (None, until)
        except Refusal as refusal:
            result = (refusal, None)
        self._ca_checks[cas] = result
        return result

    def _strict_ca_eku(self, ca: x509.Certificate, *, is_root: bool) -> None:
        if self._profile != "strict":
            return
        try:
            eku = ca.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            if is_root:
                return
            text = "An intermediate CA has no extended key usage; the profile requires one."
            raise Refusal(Reason.PROFILE_EKU_FORBIDDEN, "strict.ca_eku_required", text) from None
        if is_root:
            text = "The root CA carries an extended key usage, which the profile forbids."
            raise Refusal(Reason.PROFILE_EKU_FORBIDDEN, "strict.root_eku_absent", text)
        forbidden = forbidden_ekus(eku)
        if forbidden:
            text = f"An intermediate CA's extended key usage includes {', '.join(forbidden)}."
            raise Refusal(Reason.PROFILE_EKU_FORBIDDEN, "strict.ca_eku_forbidden", text)

    def _revocation(
        self, cert: x509.Certificate, issuer_key: bytes, issuer: x509.Certificate, at: datetime,
        *, what: str,
    ) -> datetime | None:  # fmt: skip
        crls = [c for c in self._crls.get(issuer_key, ()) if self._signed(c, issuer)]
        if not crls:
            if self._profile == "strict":
                text = f"No configured CRL covers the issuer of this {what}."
                raise Refusal(Reason.REVOCATION_UNKNOWN, "strict.crl_required", text)
            return None
        crl = max(crls, key=lambda c: c.this_update)
        deadline = None
        if crl.next_update is not None:
            deadline = crl.next_update + self._trust.spec.crl_max_age_after_next_update
            if at > deadline:
                text = f"The issuer's CRL expired at {crl.next_update.isoformat()} ({what} check)."
                raise Refusal(Reason.CRL_STALE, f"{self._profile}.crl_fresh", text)
        if cert.serial_number in crl.revoked:
            text = f"The {what} is listed on its issuer's CRL."
            raise Refusal(Reason.REVOKED, f"{self._profile}.not_revoked", text)
        return deadline

    def _signed(self, loaded: LoadedCrl, issuer: x509.Certificate) -> bool:
        key = (id(loaded), issuer)
        known = self._crl_ok.get(key)
        if known is None:
            known = crl_signed_by(loaded, issuer)
            self._crl_ok[key] = known
        return known
