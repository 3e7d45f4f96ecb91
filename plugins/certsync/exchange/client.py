"""Exchange Online's InvokeCommand endpoint: the cmdlets certsync needs, nothing more.

Request shapes come from certsync.exchange.wire, the meaning of answers from
certsync.exchange.outcomes, pacing from certsync.exchange.throttle. Reads retry what is retryable
themselves, under one client-request-id per cmdlet call as the module does. Writes (Set-*) make one
attempt (plus one resend after a token refresh when the token was refused, which runs nothing) and
return an Outcome, because the publish stage audits every attempt and decides on retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import requests

from certsync.config import ExchangeSettings
from certsync.exchange import wire
from certsync.exchange.auth import TokenProvider, TokenUnavailable, http_session
from certsync.exchange.errors import ExchangeError, ExchangeShapeError
from certsync.exchange.outcomes import (
    AUTH,
    RETRYABLE_STATUS,
    UNAVAILABLE,
    UNKNOWN,
    Outcome,
    backoff_s,
    classify,
    load_body,
    outcome_unknown,
    read_body,
)
from certsync.exchange.throttle import CircuitBreaker, Throttle
from certsync.exchange.values import UnreadableValue, decode_values
from certsync.readahead import ReadAhead

__all__ = [
    "ANCHOR_MAILBOX",
    "RETRYABLE_STATUS",
    "ExchangeClient",
    "ExchangeError",
    "Outcome",
    "backoff_s",
    "classify",
    "outcome_unknown",
]

log = logging.getLogger(__name__)

ANCHOR_MAILBOX = wire.ANCHOR_MAILBOX
RECIPIENT_FIELDS = (
    "Guid",
    "ExternalDirectoryObjectId",
    "PrimarySmtpAddress",
    "RecipientTypeDetails",
    "IsDirSynced",
    "IsExchangeCloudManaged",
    "UserCertificate",
    "UserSMimeCertificate",
    # The watermark of delta reads (certsync.exchange.changes).
    "WhenChangedUTC",
    "WhenChanged",
)
CERTIFICATE_FIELDS = ("UserCertificate", "UserSMimeCertificate")
# The cmdlets that surely return certificates and IsExchangeCloudManaged (Get-Recipient may not).
READ_CMDLETS = ("Get-Mailbox", "Get-MailUser", "Get-MailContact")
GET_FOR_SET = {
    "Set-Mailbox": "Get-Mailbox",
    "Set-MailUser": "Get-MailUser",
    "Set-MailContact": "Get-MailContact",
}


@dataclasses.dataclass(frozen=True)
class Answer:
    """One request's answer: its outcome, the parsed body (None unless readable JSON), and timing."""

    outcome: Outcome
    body: Any
    headers: dict[str, str]
    latency_s: float


class ExchangeClient:
    """Calls cmdlets through InvokeCommand with an app-only token."""

    def __init__(
        self, *, settings: ExchangeSettings, tokens: TokenProvider, session: requests.Session
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._session = session
        self._url = f"{settings.base_url.rstrip('/')}/adminapi/beta/{settings.tenant_id}/InvokeCommand"
        self._connection_id = str(uuid.uuid4())
        self.throttle = Throttle(max_concurrency=settings.max_concurrency)
        self.breaker = CircuitBreaker(threshold=settings.breaker_threshold)

    @classmethod
    def connect(cls, settings: ExchangeSettings) -> ExchangeClient:
        """A client with its own HTTP session, shared with its msal token provider."""
        session = http_session(settings)
        return cls(
            settings=settings, tokens=TokenProvider(settings=settings, session=session), session=session
        )

    @property
    def settings(self) -> ExchangeSettings:
        return self._settings

    def send(
        self, cmdlet: str, parameters: dict[str, Any], *, request_id: uuid.UUID, url: str | None = None
    ) -> Answer:
        """One cmdlet call, one request (and one resend with a fresh token if the token was refused,
        under the same client-request-id: a 401 comes before the cmdlet runs)."""
        answer = self._request(url or self._url, cmdlet, parameters, request_id, refresh=False)
        if answer.outcome.kind == AUTH:
            log.warning("%s: token refused (HTTP 401); sending once more with a new token", cmdlet)
            answer = self._request(url or self._url, cmdlet, parameters, request_id, refresh=True)
        self.breaker.record(answer.outcome)
        return answer

    def _request(
        self, url: str, cmdlet: str, parameters: dict[str, Any], request_id: uuid.UUID, *, refresh: bool
    ) -> Answer:
        headers = wire.headers(
            token=self._tokens.token(refresh=refresh),
            cmdlet=cmdlet,
            request_id=request_id,
            connection_id=self._connection_id,
            tenant_id=self._settings.tenant_id,
            page_size=self._settings.page_size,
        )
        ticket = self.throttle.acquire(cmdlet)
        started = time.monotonic()
        outcome = Outcome(kind=UNKNOWN, status=None, code="NoAnswer")
        try:  # the slot is given back whatever happens, or the window would shrink for good
            answer = self._post(url, cmdlet, parameters, headers, request_id, started)
            outcome = answer.outcome
            return answer
        finally:
            self.throttle.release(ticket, outcome)

    def _post(
        self,
        url: str,
        cmdlet: str,
        parameters: dict[str, Any],
        headers: dict[str, str],
        request_id: uuid.UUID,
        started: float,
    ) -> Answer:
        try:
            response = self._session.post(
                url,
                json=wire.body(cmdlet, parameters),
                headers=headers,
                timeout=self._settings.timeout_s,
                stream=True,
            )
            load_body(response)
        except requests.RequestException as exc:
            outcome = Outcome(
                kind=UNKNOWN,
                status=None,
                code=type(exc).__name__,
                detail=f"no answer from {self._settings.base_url}",
                client_request_id=request_id,
            )
            return Answer(outcome=outcome, body=None, headers={}, latency_s=time.monotonic() - started)
        outcome = dataclasses.replace(classify(response), client_request_id=request_id)
        body, _why = read_body(response)
        return Answer(
            outcome=outcome, body=body, headers=dict(response.headers), latency_s=time.monotonic() - started
        )

    def call(self, cmdlet: str, parameters: dict[str, Any], *, url: str | None = None) -> Answer:
        """A read: retried with backoff while the answer is retryable, every wait logged, all under
        one client-request-id; raises ExchangeError when it fails for good."""
        request_id = uuid.uuid4()
        attempts = self._settings.max_attempts
        for attempt in range(1, attempts + 1):
            answer = self.send(cmdlet, parameters, request_id=request_id, url=url)
            outcome = answer.outcome
            if outcome.kind == "accepted":
                return answer
            if not (outcome.retryable or outcome.kind == UNKNOWN) or attempt == attempts or self.breaker.open:
                raise ExchangeError(
                    f"{cmdlet} failed ({outcome.kind}, HTTP {outcome.status or 'no answer'}):"
                    f" {outcome.code}: {(outcome.detail or '')[:300]}",
                    status=outcome.status,
                    code=outcome.code,
                )
            wait = backoff_s(outcome, attempt)
            log.warning(
                "%s: %s (HTTP %s %s); retrying in %.1fs (attempt %d of %d, request %s)",
                cmdlet, outcome.kind, outcome.status or "no answer", outcome.code, wait, attempt, attempts, request_id,
            )  # fmt: skip
            time.sleep(wait)
        raise AssertionError("unreachable")

    def read(self, cmdlet: str, parameters: dict[str, Any], *, select: Sequence[str] = ()) -> Iterator[dict]:
        """Run a Get-* cmdlet and yield every object, following @odata.nextLink (same body)."""
        for page in self.pages(cmdlet, parameters, select=select):
            yield from page

    def pages(
        self, cmdlet: str, parameters: dict[str, Any], *, select: Sequence[str] = ()
    ) -> Iterator[list[dict]]:
        """Run a Get-* cmdlet and yield each page's objects, following @odata.nextLink."""
        url: str | None = self._url + wire.select_query(select)
        while url:
            page = self.call(cmdlet, parameters, url=url).body
            if not isinstance(page, dict) or not isinstance(page.get("value", []), list):
                raise ExchangeShapeError(f"{cmdlet} answered a page without a value list: {str(page)[:200]}")
            yield page.get("value", [])
            next_link = page.get("@odata.nextLink")
            url = str(next_link) if next_link else None

    def check(self) -> None:
        """Get a token and read one mailbox, so bad credentials or endpoints fail before any write."""
        self._tokens.token()
        answer = self.call("Get-Mailbox", {"ResultSize": 1})
        log.info("Exchange Online reachable (%d mailbox read)", len((answer.body or {}).get("value", [])))

    def recipients(self, *, changed_since: datetime | None = None) -> Iterator[dict]:
        """Every mailbox, mail user and mail contact with what certsync needs of it; with
        `changed_since`, only those whose WhenChangedUTC is that or later (certsync.exchange.changes)."""
        parameters: dict[str, Any] = {"ResultSize": "Unlimited"}
        if changed_since is not None:
            parameters["Filter"] = wire.changed_filter(changed_since)
        # The Get-* run at once, each a page ahead of this reader (the throttle still bounds the
        # requests in flight): Exchange builds the next pages while this process decodes one.
        # Their objects come in the same order as one after another.
        with contextlib.ExitStack() as readers:
            ahead = [
                readers.enter_context(
                    ReadAhead(self.pages(cmdlet, parameters, select=RECIPIENT_FIELDS), name=cmdlet)
                )
                for cmdlet in READ_CMDLETS
            ]
            for pages in ahead:
                for page in pages:
                    yield from page

    def set_certificates(
        self,
        *,
        cmdlet: str,
        identity: str,
        user_certificate: Sequence[bytes],
        user_smime_certificate: Sequence[bytes],
        request_id: uuid.UUID | None = None,
    ) -> Outcome:
        """One attempt to replace both certificate attributes of a recipient. `request_id` is the
        client-request-id the write-ahead audit recorded for it (a new one when not given)."""
        parameters = wire.certificate_parameters(
            identity=identity,
            user_certificate=user_certificate,
            user_smime_certificate=user_smime_certificate,
            encoding=self._settings.byte_encoding,
        )
        request_id = request_id or uuid.uuid4()
        try:
            return self.send(cmdlet, parameters, request_id=request_id).outcome
        except TokenUnavailable as exc:
            # No token, so no request left: surely not applied.
            return Outcome(
                kind=UNAVAILABLE, status=None, code=exc.code, detail=str(exc), client_request_id=request_id
            )

    def held_certificates(
        self, identity: str, *, cmdlet: str = "Set-Mailbox"
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
        """Read one recipient back with the Get-* matching the Set-* `cmdlet` that wrote it: the
        values of UserCertificate and UserSMimeCertificate it holds now, or None when Exchange knows
        no such recipient. Raises ExchangeShapeError when a value cannot be read."""
        try:
            found = self.call(
                GET_FOR_SET.get(cmdlet, "Get-Recipient"),
                {"Identity": identity},
                url=self._url + wire.select_query(CERTIFICATE_FIELDS),
            ).body
        except ExchangeError as exc:
            if exc.code in ("ManagementObjectNotFoundException", "HTTP404") or exc.status == 404:
                return None
            raise
        value = (found or {}).get("value") or []
        if not value:
            return None
        return certificates_of(value[0], who=identity)


def certificates_of(obj: dict, *, who: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """The two certificate properties of a read object, decoded; an unreadable shape stops here."""
    try:
        return (
            decode_values(obj.get("UserCertificate"), name="UserCertificate"),
            decode_values(obj.get("UserSMimeCertificate"), name="UserSMimeCertificate"),
        )
    except UnreadableValue as exc:
        raise ExchangeShapeError(
            f"recipient {who}: {exc}; certsync cannot read the certificates Exchange holds and stops"
            " rather than take them for none (run `certsync probe` to see the shapes this tenant returns)"
        ) from None
