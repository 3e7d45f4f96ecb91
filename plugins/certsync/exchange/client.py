"""Exchange Online's InvokeCommand endpoint: the cmdlets certsync needs, nothing more.

Reads (Get-Recipient) retry transient failures themselves. Writes (Set-*) make exactly one attempt
and return an `Outcome`, because the publish stage must audit every attempt and decide on retries.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from certsync.config import ExchangeSettings
from certsync.exchange.auth import TokenProvider, http_session

log = logging.getLogger(__name__)

# The system mailbox Exchange routes app-only admin calls to (as the ExchangeOnlineManagement module does).
ANCHOR_MAILBOX = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@%s"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RECIPIENT_FIELDS = (
    "Guid",
    "ExternalDirectoryObjectId",
    "PrimarySmtpAddress",
    "RecipientTypeDetails",
    "IsDirSynced",
    "IsExchangeCloudManaged",
    "UserCertificate",
    "UserSMimeCertificate",
)
MAX_RETRY_AFTER_S = 120.0
# Error codes of a Get-* that found no recipient by that identity.
NOT_FOUND_CODES = frozenset({"ManagementObjectNotFoundException", "NotFound"})
# Marks of Exchange's refusal to write an object that directory synchronisation owns.
DIRSYNC_MARKS = ("synchronized from your on-premises", "out of the current user's write scope")


class ExchangeError(RuntimeError):
    """A call failed for good: not retryable, or out of attempts."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Outcome:
    """The result of one write attempt."""

    kind: str  # accepted | conflict | rejected | retry
    status: int | None
    code: str | None = None
    detail: str | None = None
    retry_after_s: float | None = None
    client_request_id: uuid.UUID | None = None


def encode_bytes(values: Sequence[bytes]) -> list[str]:
    """How a byte[][] parameter travels in InvokeCommand JSON: a list of base64 strings."""
    return [base64.b64encode(v).decode("ascii") for v in values]


def _retry_after(response: requests.Response) -> float | None:
    """Seconds the server asked us to wait (bounded), or None when it did not say."""
    raw = response.headers.get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def backoff_s(outcome: Outcome, retry: int) -> float:
    """How long to wait before retry number `retry` (1, 2, ...): Retry-After when given, else exponential."""
    if outcome.retry_after_s is not None:
        return outcome.retry_after_s
    return min(2.0**retry, 30.0)


def _error_parts(response: requests.Response) -> tuple[str | None, str]:
    """(exception type or error code, message) from an Exchange error body, JSON or plain text."""
    try:
        error = response.json().get("error", {})
    except ValueError:
        return None, response.text[:500]
    details = error.get("details") or []
    if details and "|" in details[0].get("message", ""):
        _code, exc_type, text = [*details[0]["message"].split("|", 2), "", ""][:3]
        return exc_type.rsplit(".", 1)[-1] or error.get("code"), text
    return error.get("code"), str(error.get("message", ""))[:500]


def classify(response: requests.Response) -> Outcome:
    """Turn one HTTP answer to a write into an outcome; the only place that reads error shapes."""
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(kind="accepted", status=status)
    if status in RETRYABLE_STATUS:
        code, text = _error_parts(response)
        return Outcome(
            kind="retry",
            status=status,
            code=code,
            detail=text,
            retry_after_s=_retry_after(response),
        )
    code, text = _error_parts(response)
    if any(mark in text.lower() for mark in DIRSYNC_MARKS):
        return Outcome(kind="conflict", status=status, code=code or "DirSyncConflict", detail=text)
    return Outcome(kind="rejected", status=status, code=code, detail=text)


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

    @classmethod
    def connect(cls, settings: ExchangeSettings) -> ExchangeClient:
        """A client with its own HTTP session, shared with its msal token provider."""
        session = http_session(settings)
        return cls(
            settings=settings, tokens=TokenProvider(settings=settings, session=session), session=session
        )

    def _headers(self, cmdlet: str, request_id: uuid.UUID) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._tokens.token()}",
            "X-CmdletName": cmdlet,
            "client-request-id": str(request_id),
            "connection-id": self._connection_id,
            "Prefer": f"odata.maxpagesize={self._settings.page_size}",
            "X-AnchorMailbox": ANCHOR_MAILBOX % self._settings.tenant_id,
            "Accept": "application/json",
        }

    def _post(
        self, url: str, cmdlet: str, parameters: dict[str, Any], request_id: uuid.UUID
    ) -> requests.Response:
        body = {"CmdletInput": {"CmdletName": cmdlet, "Parameters": parameters}}
        try:
            response = self._session.post(
                url,
                json=body,
                headers=self._headers(cmdlet, request_id),
                timeout=self._settings.timeout_s,
            )
        except requests.RequestException as exc:
            raise ExchangeError(
                f"{cmdlet}: cannot reach {self._settings.base_url}: {type(exc).__name__}"
            ) from None
        return response

    def _read_page(self, url: str, cmdlet: str, parameters: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(1, self._settings.max_attempts + 1):
            response = self._post(url, cmdlet, parameters, uuid.uuid4())
            if response.ok:
                return response.json()
            outcome = classify(response)
            if outcome.kind != "retry" or attempt == self._settings.max_attempts:
                raise ExchangeError(
                    f"{cmdlet} failed with HTTP {response.status_code}: {outcome.code}: {outcome.detail}",
                    status=response.status_code,
                    code=outcome.code,
                )
            wait = backoff_s(outcome, attempt)
            log.warning("%s: HTTP %s, retrying in %.1fs", cmdlet, response.status_code, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def read(self, cmdlet: str, parameters: dict[str, Any], *, select: Sequence[str] = ()) -> Iterator[dict]:
        """Run a Get-* cmdlet and yield every object, following @odata.nextLink."""
        url: str | None = self._url + (f"?$select={','.join(select)}" if select else "")
        while url:
            page = self._read_page(url, cmdlet, parameters)
            yield from page.get("value", [])
            url = page.get("@odata.nextLink")

    def check(self) -> None:
        """Get a token and read one recipient, so bad credentials or endpoints fail before any write."""
        self._tokens.token()
        page = self._read_page(self._url, "Get-Recipient", {"ResultSize": 1})
        log.info("Exchange Online reachable (%d recipient read)", len(page.get("value", [])))

    def recipients(self) -> Iterator[dict]:
        return self.read("Get-Recipient", {"ResultSize": "Unlimited"}, select=RECIPIENT_FIELDS)

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
        parameters = {
            "Identity": identity,
            "UserCertificate": encode_bytes(user_certificate),
            "UserSMimeCertificate": encode_bytes(user_smime_certificate),
        }
        request_id = request_id or uuid.uuid4()
        try:
            outcome = classify(self._post(self._url, cmdlet, parameters, request_id))
        except ExchangeError as exc:
            outcome = Outcome(kind="retry", status=None, code="ConnectionError", detail=str(exc))
        return dataclasses.replace(outcome, client_request_id=request_id)

    def held_certificates(self, identity: str) -> tuple[list[str], list[str]] | None:
        """Read one recipient back (Get-Recipient -Identity): the base64 values of UserCertificate
        and UserSMimeCertificate it holds now, or None when Exchange knows no such recipient. Used
        only to settle a write whose answer was lost."""
        try:
            found = list(
                self.read(
                    "Get-Recipient",
                    {"Identity": identity},
                    select=("UserCertificate", "UserSMimeCertificate"),
                )
            )
        except ExchangeError as exc:
            if exc.code in NOT_FOUND_CODES:
                return None
            raise
        if not found:
            return None
        return list(found[0].get("UserCertificate") or ()), list(found[0].get("UserSMimeCertificate") or ())


def outcome_unknown(outcome: Outcome) -> bool:
    """True when the write may or may not have been applied: no answer at all (timeout, broken
    connection) or a gateway/server error. Throttling (429), 408 and 503 come before the cmdlet
    runs, and every other answer is Exchange's verdict on the write."""
    return outcome.kind == "retry" and (outcome.status is None or outcome.status in (500, 502, 504))
