"""Validate one attribute value at a point in time and return a Verdict (never raises).

Use one Validator per process and a fixed `at` per run: verified intermediates and CRL signature
checks are cached per validation time.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from certsync.certificates.chain import ChainChecker, earliest
from certsync.certificates.facts import Facts, describe, extension_map, name_text
from certsync.certificates.parse import Parsed, parse_value
from certsync.certificates.policy import LeafPolicy, Refusal, check_validity
from certsync.certificates.reasons import Reason
from certsync.certificates.trust import TrustConfig
from certsync.certificates.verdict import Verdict, email_mismatch, with_email_check

log = logging.getLogger(__name__)

__all__ = ["Validator", "Verdict", "email_mismatch", "with_email_check"]


class Validator:
    def __init__(self, *, trust: TrustConfig) -> None:
        self.trust = trust
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
            issuer = name_text(cert, "issuer")
            return _verdict(parsed, facts, issuer, refusal=refusal)
        until = facts.not_after if chain_until is None else earliest([facts.not_after, chain_until])
        return _verdict(parsed, facts, issuer, refusal=None, until=until)


def _verdict(
    parsed: Parsed, facts: Facts, issuer: str, *, refusal: Refusal | None, until: datetime | None = None
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
