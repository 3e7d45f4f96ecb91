"""Path validation to the configured anchors, CA-level profile rules and CRL revocation.

cryptography's verifier re-checks every signature up to the root on each call. Once an intermediate
has been verified at a validation time, it is added to a second Store as if it were an anchor, so
later leaves under it cost one signature check; its own validity, revocation and profile rules were
settled when it was promoted. Intermediates under name-constrained CAs are never promoted, because the
shortcut would skip the constraints of the CAs above them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification as xv

from certsync.certificates.constraints import check_subject_emails, email_constraints
from certsync.certificates.facts import name_text
from certsync.certificates.policy import ANY_EKU, EMAIL_PROTECTION, Refusal, forbidden_ekus
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import LoadedCrl, TrustConfig
from certsync.certificates.trust_files import crl_usable_from

log = logging.getLogger(__name__)

MARKER = "certsync-refusal="


def earliest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


@dataclass(frozen=True)
class IssuerState:
    """Everything about a leaf's issuing CA that is the same for all its leaves at one time."""

    ca: x509.Certificate
    name: str
    refusal: Refusal | None  # the CA chain itself fails the profile or is revoked (the first rule)
    until: datetime | None  # earliest CA expiry or CA-level CRL deadline
    crl: LoadedCrl | None  # the freshest CRL of this CA that it really signed
    crl_deadline: datetime | None  # next update plus grace
    configured: bool = False  # the CA is in the trust config, not only in some value's blob
    email_constraints: tuple[x509.NameConstraints, ...] = ()  # rfc822 limits set by the chain's CAs
    refusals: tuple[Refusal, ...] = ()  # every CA-level rule the chain fails, `refusal` first

    @functools.cached_property
    def leaf_until(self) -> datetime | None:
        """Until when the chain holds for a leaf that is not revoked (its own expiry aside)."""
        return earliest([self.until, self.crl_deadline])


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
        self._promoted: dict[x509.Certificate, IssuerState] = {}
        # Keyed by id(): the fast verifier hands back the very objects held in its Store.
        self._promoted_by_id: dict[int, IssuerState] = {}
        self._states: dict[tuple[x509.Certificate, ...], IssuerState] = {}

    def check(
        self,
        leaf: x509.Certificate,
        serial: int,
        extra: Sequence[x509.Certificate],
        at: datetime,
        *,
        subject_emails: Sequence[str] = (),
    ) -> tuple[datetime | None, str]:
        """Verify the leaf's chain and revocation at `at`; return until when that holds and the
        issuer's name. `subject_emails` are addresses read from the subject DN (no SAN), which the
        chain's rfc822 name constraints must also cover."""
        state = self._state(leaf, extra, at)
        if state.refusal is not None:
            raise state.refusal
        check_subject_emails(subject_emails, state.email_constraints, self._profile)
        return self._leaf_revocation(serial, state, at), state.name

    def refusals(
        self,
        leaf: x509.Certificate,
        serial: int,
        extra: Sequence[x509.Certificate],
        at: datetime,
        *,
        subject_emails: Sequence[str] = (),
        path_at: datetime | None = None,
        leaf_refused: bool = False,
    ) -> list[Refusal]:
        """Every rule of the chain that `check` would apply and the leaf fails, in `check`'s order.

        `path_at`, a time within the leaf's own validity, builds the path when the leaf is outside
        it at `at`: its dates are a rule of their own, and the verifier would otherwise stop at them.
        The chain's CAs and CRLs are still judged at `at`. `leaf_refused` says the leaf already
        fails rules of its own: the verifier re-checks some of them (serial, CA flag, signature
        hash, SAN) without naming the certificate at fault, so its generic refusals would most
        likely repeat them and are left out."""
        found: list[Refusal] = []
        try:
            if path_at is None:
                state = self._state(leaf, extra, at)
            else:
                verifier = self._verifier(self._anchors, path_at)
                cas = tuple(verifier.verify(leaf, [*self._intermediates, *extra]).chain[1:])
                found += _cas_outside(cas, at, self._profile)
                state = self._issuer_state(cas, at, cache=False)
        except (xv.VerificationError, Refusal) as exc:
            refusal = exc if isinstance(exc, Refusal) else self._refusal(str(exc))
            generic = (f"{self._profile}.chain", f"{self._profile}.chain_signature_hash")
            return [] if leaf_refused and refusal.rule in generic else [refusal]
        found += state.refusals
        _collect(found, lambda: check_subject_emails(subject_emails, state.email_constraints, self._profile))
        _collect(found, lambda: self._not_revoked(state.crl, serial, what="certificate"))
        return found

    def _state(self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], at: datetime) -> IssuerState:
        """The issuer's state for this leaf at `at`; raises the Refusal of a path that fails."""
        if at != self._at:
            self._at = at
            self._reset()
        state = self._fast_path(leaf, extra)
        if state is None:
            chain = self._full_path(leaf, extra, at)
            cas = tuple(chain[1:])
            state = self._states.get(cas) or self._issuer_state(cas, at)
            self._maybe_promote(chain, state, at)
        return state

    # -- path building ----------------------------------------------------------------------

    def _fast_path(self, leaf: x509.Certificate, extra: Sequence[x509.Certificate]) -> IssuerState | None:
        if self._fast is None:
            return None
        # Trying is cheaper than reading the leaf's issuer name to see whether it would work.
        try:
            short = self._fast.verify(leaf, []).chain
        except xv.VerificationError:
            return None  # the full path gives the exact diagnosis
        state = self._promoted_by_id.get(id(short[-1])) if len(short) == 2 else None
        if state is None or state.ca is not short[-1]:
            return None
        # A verdict depends only on the value and the trust config: an intermediate learned from
        # another user's PKCS#7 blob must not help a leaf whose own value lacks it.
        if state.configured or state.ca in extra:
            return state
        return None

    def _full_path(
        self, leaf: x509.Certificate, extra: Sequence[x509.Certificate], at: datetime
    ) -> list[x509.Certificate]:
        if self._full is None:
            self._full = self._verifier(self._anchors, at)
        try:
            return self._full.verify(leaf, [*self._intermediates, *extra]).chain
        except xv.VerificationError as exc:
            raise self._refusal(str(exc)) from None

    def _maybe_promote(self, chain: list[x509.Certificate], state: IssuerState, at: datetime) -> None:
        if len(chain) < 3 or state.refusal is not None or chain[1] in self._promoted:
            return
        for ca in chain[1:]:
            try:
                ca.extensions.get_extension_for_class(x509.NameConstraints)
                return
            except x509.ExtensionNotFound:
                continue
        self._promoted[chain[1]] = state
        # Promoted CAs passed the CA EKU rule on the full path; skip the Python callback here.
        self._fast = self._verifier([*self._anchors, *self._promoted], at, ca_eku_rule=False)
        try:
            probe = self._fast.verify(chain[0], []).chain[-1]  # the Store's object for chain[1]
        except xv.VerificationError:
            return  # stays promoted in the Store but is never trusted by the shortcut
        state = dataclasses.replace(state, ca=probe, configured=probe in self._configured)
        self._promoted_by_id[id(probe)] = state
        log.debug("promoted intermediate %s", state.name)

    def _verifier(
        self, store: list[x509.Certificate], at: datetime, *, ca_eku_rule: bool = True
    ) -> xv.ClientVerifier:
        # The leaf's EKU was checked before path building, with a precise reason.
        ee = xv.ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, None
        )
        if self._profile != "strict":
            # Legacy AD CS leaves may carry the address only in the subject DN.
            ee = ee.may_be_present(x509.SubjectAlternativeName, xv.Criticality.AGNOSTIC, None)
        ca = xv.ExtensionPolicy.webpki_defaults_ca().may_be_present(
            x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, self._ca_eku if ca_eku_rule else None
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
        rule = f"{self._profile}.chain"
        return Refusal(Reason.CHAIN_INVALID, rule, f"Chain validation failed: {text[:300]}")

    # -- CA rules and revocation --------------------------------------------------------------

    def _issuer_state(
        self, cas: tuple[x509.Certificate, ...], at: datetime, *, cache: bool = True
    ) -> IssuerState:
        """The CA-level rules, each checked even when an earlier one failed (once per chain)."""
        issuer = cas[0]
        found: list[Refusal] = []
        until = earliest(c.not_valid_after_utc for c in cas)
        for index, ca in enumerate(cas[:-1]):
            _collect(found, lambda ca=ca: self._strict_ca_eku(ca, is_root=False))
            _collect(found, lambda ca=ca: self._strict_ca_profile(ca, is_root=False))
            try:
                crl, deadline = self._crl_for(cas[index + 1], at, what="CA")
                self._not_revoked(crl, ca.serial_number, what="CA")
                until = earliest([until, deadline])
            except Refusal as refusal:
                found.append(refusal)
        # Root-only rules for a self-signed anchor; an intermediate configured as an anchor (alone
        # or beside its root) ends the path too, but it is a CA like any other.
        top_is_root = is_self_signed(cas[-1])
        _collect(found, lambda: self._strict_ca_eku(cas[-1], is_root=top_is_root))
        _collect(found, lambda: self._strict_ca_profile(cas[-1], is_root=top_is_root))
        crl, deadline = None, None
        try:
            crl, deadline = self._crl_for(issuer, at, what="certificate")
        except Refusal as refusal:
            found.append(refusal)
        state = IssuerState(
            ca=issuer,
            name=name_text(issuer, "subject"),
            refusal=found[0] if found else None,
            until=until,
            crl=crl,
            crl_deadline=deadline,
            email_constraints=email_constraints(cas),
            refusals=tuple(found),
        )
        if cache:
            self._states[cas] = state
        return state

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

    def _strict_ca_profile(self, ca: x509.Certificate, *, is_root: bool) -> None:
        """S/MIME BR 7.1.2.1/7.1.2.2 key identifiers and 6.1.5 RSA modulus rules for CA certificates."""
        if self._profile != "strict":
            return
        present = {type(ext.value): ext.value for ext in ca.extensions}
        if x509.SubjectKeyIdentifier not in present:
            text = "A CA certificate has no subjectKeyIdentifier (RFC 5280 4.2.1.2, S/MIME BR 7.1.2)."
            raise Refusal(Reason.CHAIN_INVALID, "strict.ca_key_identifiers", text)
        aki = present.get(x509.AuthorityKeyIdentifier)
        if aki is None and not is_root:
            text = "An intermediate CA has no authorityKeyIdentifier (RFC 5280 4.2.1.1)."
            raise Refusal(Reason.CHAIN_INVALID, "strict.ca_key_identifiers", text)
        if is_root and isinstance(aki, x509.AuthorityKeyIdentifier):
            _check_root_aki(aki, present[x509.SubjectKeyIdentifier])
        key = ca.public_key()
        if isinstance(key, rsa.RSAPublicKey) and key.key_size % 8:
            text = f"A CA's RSA modulus of {key.key_size} bits is not a multiple of 8 (S/MIME BR 6.1.5)."
            raise Refusal(Reason.WEAK_KEY, "strict.rsa_modulus", text)

    def _crl_for(
        self, issuer: x509.Certificate, at: datetime, *, what: str
    ) -> tuple[LoadedCrl | None, datetime | None]:
        """The freshest CRL that `issuer` signed, and its deadline; refuses stale or missing ones."""
        named = self._crls.get(issuer.subject.public_bytes(), [])
        crls = [c for c in named if crl_usable_from(c, issuer)]
        if named and not crls:
            # Revocation was meant to be checked here: an unusable CRL must not read as "not revoked".
            text = f"The CRLs naming the issuer of this {what} are not signed by it with cRLSign."
            raise Refusal(Reason.REVOCATION_UNKNOWN, f"{self._profile}.crl_usable", text)
        if not crls:
            if self._profile == "strict":
                text = f"No configured CRL covers the issuer of this {what}."
                raise Refusal(Reason.REVOCATION_UNKNOWN, "strict.crl_required", text)
            return None, None
        crl = max(crls, key=lambda c: c.this_update)
        if crl.next_update is None:
            return crl, None
        deadline = crl.next_update + self._trust.spec.crl_max_age_after_next_update
        if at > deadline:
            text = f"The issuer's CRL expired at {crl.next_update.isoformat()} ({what} check)."
            raise Refusal(Reason.CRL_STALE, f"{self._profile}.crl_fresh", text)
        return crl, deadline

    def _not_revoked(self, crl: LoadedCrl | None, serial: int, *, what: str) -> None:
        if crl is not None and serial in crl.revoked:
            text = f"The {what} is listed on its issuer's CRL."
            raise Refusal(Reason.REVOKED, f"{self._profile}.not_revoked", text)

    def _leaf_revocation(self, serial: int, state: IssuerState, at: datetime) -> datetime | None:
        self._not_revoked(state.crl, serial, what="certificate")
        return state.leaf_until


def is_self_signed(cert: x509.Certificate) -> bool:
    """Whether `cert` is a root: its issuer is its subject and its own key signed it."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _collect(found: list[Refusal], check: Callable[[], object]) -> None:
    try:
        check()
    except Refusal as refusal:
        found.append(refusal)


def _cas_outside(cas: Sequence[x509.Certificate], at: datetime, profile: str) -> list[Refusal]:
    """The CAs of a path built at another time that are outside their validity at `at`."""
    outside = [ca for ca in cas if not ca.not_valid_before_utc <= at <= ca.not_valid_after_utc]
    if not outside:
        return []
    names = "; ".join(name_text(ca, "subject") for ca in outside)
    text = f"Chain validation failed: CA certificate not valid at {at.isoformat()}: {names}."
    return [Refusal(Reason.CHAIN_INVALID, f"{profile}.chain", text)]


def _check_root_aki(aki: x509.AuthorityKeyIdentifier, ski: x509.ExtensionType) -> None:
    """S/MIME BR 7.1.2.1: a root's AKI, if present, holds only its own key identifier."""
    digest = ski.digest if isinstance(ski, x509.SubjectKeyIdentifier) else None
    if aki.authority_cert_issuer is not None or aki.authority_cert_serial_number is not None:
        text = "The root's authorityKeyIdentifier names an issuer or serial; only keyIdentifier is allowed."
        raise Refusal(Reason.CHAIN_INVALID, "strict.root_aki", text)
    if aki.key_identifier is not None and aki.key_identifier != digest:
        text = "The root's authorityKeyIdentifier differs from its own subjectKeyIdentifier."
        raise Refusal(Reason.CHAIN_INVALID, "strict.root_aki", text)
