"""Validate one attribute value at a point in time and return a Verdict (never raises).

Use one Validator per process and a fixed `at` per run: verified intermediates and CRL signature
checks are cached per validation time. A refusal stops at the first failing rule; with
`every_rule=True` (for people reading verdicts, not for runs) the refused value is checked once more
against every rule, so the verdict lists them all.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from certsync.certificates.chain import ChainChecker, earliest
from certsync.certificates.facts import Extensions, Facts, describe, extension_map, issuer_text
from certsync.certificates.parse import Parsed, parse_value
from certsync.certificates.policy import LeafPolicy, Refusal, check_validity
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import TrustConfig
from certsync.certificates.verdict import Failure, Verdict, email_mismatch, with_email_check

log = logging.getLogger(__name__)

__all__ = ["Validator", "Verdict", "email_mismatch", "with_email_check"]


class Validator:
    def __init__(self, *, trust: TrustConfig, every_rule: bool = False) -> None:
        self.trust = trust
        self.every_rule = every_rule
        self._policy = LeafPolicy(profile=trust.profile)
        self._chains = ChainChecker(trust=trust)
        self._at_given: datetime | None = None  # callers pass one `at` per run; normalise it once
        self._at = datetime.min

    def check(self, *, attribute: str, value: bytes, at: datetime) -> Verdict:
        if at is not self._at_given:
            self._at_given, self._at = at, _utc(at)
        at = self._at
        parsed = parse_value(attribute=attribute, value=value)
        if not parsed.ok or parsed.certificate is None:
            reason = parsed.error or Reason.MALFORMED
            return Verdict(
                sha256=parsed.sha256,
                attribute=attribute,
                ok=False,
                reason=reason.value,
                rule=f"{self.trust.profile}.parse",
                detail=f"{reason.sentence} {parsed.detail}".strip(),
            )
        try:
            return self._check_parsed(parsed, at)
        except Exception as exc:  # a hostile value must cost one verdict, never the run
            log.warning("unexpected %s validating value %s", type(exc).__name__, parsed.sha256.hex())
            text = " ".join(str(exc).split())[:200]
            return Verdict(
                sha256=parsed.sha256,
                attribute=attribute,
                ok=False,
                reason=Reason.MALFORMED.value,
                rule=f"{self.trust.profile}.parse",
                detail=f"{Reason.MALFORMED.sentence} {type(exc).__name__}: {text}",
            )

    def _check_parsed(self, parsed: Parsed, at: datetime) -> Verdict:
        cert = parsed.certificate
        assert cert is not None
        extensions = extension_map(cert)
        facts = describe(cert, parsed.serial_number or 0, extensions, der=parsed.leaf)
        try:
            self._policy.check_static(cert, facts.serial_number, extensions, subject_rdns=facts.subject_rdns)
            check_validity(facts.not_before, facts.not_after, at, self.trust.profile)
            self._policy.check_emails(facts.emails, facts.san_emails)
            subject_emails = () if facts.san_emails else facts.emails
            chain_until, issuer = self._chains.check(
                cert, facts.serial_number, parsed.extra_certificates, at, subject_emails=subject_emails
            )
        except Refusal as refusal:
            issuer = issuer_text(cert, parsed.leaf)
            more = self._more_refusals(parsed, facts, extensions, at, refusal) if self.every_rule else ()
            return _verdict(parsed, facts, issuer, refusal=refusal, more=more)
        until = facts.not_after if chain_until is None else earliest([facts.not_after, chain_until])
        return _verdict(parsed, facts, issuer, refusal=None, until=until)

    def _more_refusals(
        self, parsed: Parsed, facts: Facts, extensions: Extensions, at: datetime, first: Refusal
    ) -> tuple[Refusal, ...]:
        """The rules the value fails besides `first`, in the order _check_parsed applies them."""
        try:
            return self._every_refusal(parsed, facts, extensions, at, first)
        except Exception as exc:  # the reason is known; a hostile value must not lose it
            log.warning(
                "unexpected %s listing the rules value %s fails", type(exc).__name__, parsed.sha256.hex()
            )
            return ()

    def _every_refusal(
        self, parsed: Parsed, facts: Facts, extensions: Extensions, at: datetime, first: Refusal
    ) -> tuple[Refusal, ...]:
        cert = parsed.certificate
        assert cert is not None
        serial = facts.serial_number
        found = self._policy.static_refusals(cert, serial, extensions, subject_rdns=facts.subject_rdns)
        path_at = None
        try:
            check_validity(facts.not_before, facts.not_after, at, self.trust.profile)
        except Refusal as refusal:
            found.append(refusal)
            path_at = _within(facts.not_before, facts.not_after, at)
        try:
            self._policy.check_emails(facts.emails, facts.san_emails)
        except Refusal as refusal:
            found.append(refusal)
        subject_emails = () if facts.san_emails else facts.emails
        found += self._chains.refusals(
            cert,
            serial,
            parsed.extra_certificates,
            at,
            subject_emails=subject_emails,
            path_at=path_at,
            leaf_refused=bool(found),
        )
        seen = {(first.rule, first.detail)}
        more = []
        for refusal in found:
            if (refusal.rule, refusal.detail) not in seen:
                seen.add((refusal.rule, refusal.detail))
                more.append(refusal)
        return tuple(more)


def _within(not_before: datetime | None, not_after: datetime | None, at: datetime) -> datetime | None:
    """The moment of the leaf's validity nearest to `at`, a time outside it (None: dates unreadable)."""
    if not_before is None or not_after is None:
        return None
    return not_before if at < not_before else not_after


def _failure(refusal: Refusal) -> Failure:
    return Failure(refusal.reason.value, refusal.rule, f"{refusal.reason.sentence} {refusal.detail}")


def _verdict(
    parsed: Parsed,
    facts: Facts,
    issuer: str,
    *,
    refusal: Refusal | None,
    until: datetime | None = None,
    more: tuple[Refusal, ...] = (),
) -> Verdict:
    return Verdict(
        sha256=parsed.sha256,
        attribute=parsed.attribute,
        ok=refusal is None,
        reason=refusal.reason.value if refusal else None,
        rule=refusal.rule if refusal else None,
        detail=f"{refusal.reason.sentence} {refusal.detail}" if refusal else "Valid.",
        subject=facts.subject,
        issuer=issuer,
        serial=facts.serial,
        not_before=facts.not_before,
        not_after=facts.not_after,
        valid_until=refusal.until if refusal else until,
        emails=facts.emails,
        more_failures=tuple(map(_failure, more)) if more else (),
    )


def _utc(at: datetime) -> datetime:
    # Certificate times have whole seconds (RFC 5280 4.1.2.5); comparing at that granularity keeps
    # a certificate valid for the whole second named by its notAfter.
    at = at.replace(microsecond=0)
    if at.tzinfo is UTC:
        return at
    if at.tzinfo is None:
        return at.replace(tzinfo=UTC)  # naive times are taken as UTC, as Airflow stores them
    return at.astimezone(UTC)
