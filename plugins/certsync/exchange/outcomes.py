"""What one InvokeCommand answer means: the error taxonomy, driven by the exception type Exchange
names (``details[0].message`` "Ex…|Full.Exception.Type|text", the ``x-ExceptionType`` header), not by
English text, except the one published phrase of the directory-sync refusal.

Every answer becomes an Outcome, including bodies that are not JSON, HTML pages, gzip-declared bodies
of NUL bytes and huge pages: nothing here raises, and only a 2xx whose body is readable JSON without
``@adminapi.errors`` is ``accepted``.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3

ACCEPTED = "accepted"
NOT_FOUND = "not_found"
CONFLICT = "conflict"  # the directory-sync refusal, and only that
PERMISSION = "permission"  # write scope (RBAC, licence), cmdlet outside the app's role
BAD_PARAMETER = "bad_parameter"
REJECTED = "rejected"  # any other refusal of the cmdlet: final
THROTTLED = "throttled"
TRANSIENT = "transient"  # refused before anything was written; the same request may work later
UNAVAILABLE = "unavailable"
AUTH = "auth"
UNKNOWN = "unknown"  # no readable answer: the write may or may not have been applied

# AUTH is not here: the client already refreshed the token once and sent again; twice refused is final.
RETRYABLE = frozenset({THROTTLED, TRANSIENT, UNAVAILABLE})
FINAL_REFUSALS = frozenset({NOT_FOUND, PERMISSION, BAD_PARAMETER, REJECTED})
# The audit log's outcome column for each kind.
AUDIT_OUTCOME = {ACCEPTED: "accepted", CONFLICT: "conflict"} | {kind: "rejected" for kind in FINAL_REFUSALS}

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 120.0
MAX_BODY_BYTES = 8 * 1024 * 1024  # a page bigger than this is not parsed
CONCURRENCY_PHRASE = "maximum number of concurrent requests per tenant"
DIRSYNC_PHRASE = "being synchronized from your on-premises organization"
WRITE_SCOPE_PHRASE = "out of the current user's write scope"
DIRSYNC_CODE = "DirSyncConflict"
TRANSIENT_TYPES = frozenset(
    {
        "DCOverloadedException",
        "SuitabilityDirectoryException",
        "ServerInMMException",
        "ADServerSettingsChangedException",
        "StorageTransientException",
        "UnableToWriteToAadException",
        "ADTransientException",
        "TransientException",
    }
)
NOT_FOUND_TYPES = frozenset({"ManagementObjectNotFoundException", "ObjectNotFoundException"})
BAD_PARAMETER_TYPES = frozenset(
    {
        "ParameterBindingException",
        "ParameterBindingValidationException",
        "ArgumentException",
        "ArgumentNullException",
        "ArgumentOutOfRangeException",
        "ManagementObjectAmbiguousException",
        "DataValidationException",
        "PropertyValidationException",
    }
)
PERMISSION_TYPES = frozenset(
    {"CommandNotFoundException", "UnauthorizedAccessException", "OperationRequiresGroupManagerException"}
)
THROTTLED_TYPES = frozenset({"ThrottlingException", "ConcurrencyLimitException"})
_TITLE = re.compile(rb"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Outcome:
    """The result of one request."""

    kind: str
    status: int | None
    code: str | None = None  # the exception type (short), or what stood for it
    detail: str | None = None
    retry_after_s: float | None = None
    client_request_id: uuid.UUID | None = None
    warnings: tuple[str, ...] = ()
    rate: dict[str, str] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def audit_outcome(self) -> str:
        """accepted | conflict | rejected | failed, as the audit log records it."""
        return AUDIT_OUTCOME.get(self.kind, "failed")

    @property
    def audit_detail(self) -> str | None:
        """What the audit row says: the kind, the reason, and any warnings Exchange gave."""
        parts = [] if self.kind == ACCEPTED else [f"[{self.kind}] {self.detail or ''}".strip()]
        parts += [f"warning: {w}" for w in self.warnings]
        return "; ".join(parts)[:2000] or None


def retry_after_s(response: requests.Response) -> float | None:
    """Seconds the server asked us to wait (decimal, bounded), or None when it did not say."""
    raw = response.headers.get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def backoff_s(outcome: Outcome, retry: int) -> float:
    """How long to wait before retry number `retry` (1, 2, ...): Retry-After when given, else
    exponential from 2 s as the module does, capped."""
    if outcome.retry_after_s is not None:
        return outcome.retry_after_s
    return min(2.0**retry, 30.0)


def rate_headers(response: requests.Response) -> dict[str, str]:
    names = ("Rate-Limit-Limit", "Rate-Limit-Remaining", "Rate-Limit-Reset", "X-ConcurrencyCount")
    return {name: response.headers[name] for name in names if name in response.headers}


def load_body(response: requests.Response) -> None:
    """Read a streamed response's body ourselves, bounded, and undo gzip only when it is gzip: a
    body that claims gzip but is not (Exchange's 403 of NUL bytes) stays as it came, for read_body to
    name, instead of raising a decoding error that would look like no answer at all."""
    try:
        raw = response.raw.read(MAX_BODY_BYTES + 1, decode_content=False) or b""
    except (OSError, ValueError, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raw = b""
        response.headers["X-Certsync-Read-Error"] = type(exc).__name__
    finally:
        response.close()
    if "gzip" in response.headers.get("Content-Encoding", "").lower() and raw.startswith(b"\x1f\x8b"):
        # A gzip stream that does not decompress is kept as it came: read_body says what it is.
        with contextlib.suppress(zlib.error):
            raw = zlib.decompressobj(wbits=31).decompress(raw, MAX_BODY_BYTES + 1)
    response._content = raw
    response._content_consumed = True


def read_body(response: requests.Response) -> tuple[Any, str | None]:
    """(parsed JSON or None, why it could not be read). Never raises."""
    try:
        raw = response.content
    except (requests.RequestException, OSError, ValueError) as exc:
        return None, f"body unreadable ({type(exc).__name__})"
    if not raw and response.headers.get("X-Certsync-Read-Error"):
        return None, f"body unreadable ({response.headers['X-Certsync-Read-Error']})"
    if len(raw) > MAX_BODY_BYTES:
        return None, f"body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}"
    if raw and not raw.strip(b"\x00"):
        encoding = response.headers.get("Content-Encoding", "none")
        return None, f"body of {len(raw)} NUL bytes (Content-Encoding: {encoding})"
    if b"<html" in raw[:512].lower() or b"<!doctype" in raw[:512].lower():
        title = _TITLE.search(raw[:4096])
        shown = title.group(1).decode("utf-8", "replace").strip()[:200] if title else "no title"
        return None, f"an HTML page ({shown})"
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError):
        text = raw[:300].decode("utf-8", "replace").replace("\x00", "").strip()
        return None, f"not JSON: {text!r}" if text else "empty body"


def exception_parts(error: Any, header_type: str | None) -> tuple[str | None, str]:
    """(short exception type, text) from an error object; the header names the type when the body
    does not."""
    if not isinstance(error, dict):
        return _short(header_type), ""
    details = error.get("details")
    message = ""
    if isinstance(details, list) and details and isinstance(details[0], dict):
        message = str(details[0].get("message") or "")
    if not message:
        message = str(error.get("message") or "")
    if message.count("|") >= 2:
        _id, exc_type, text = message.split("|", 2)
        return _short(exc_type) or _short(header_type), text
    inner = error.get("innererror")
    inner_exc = (
        inner.get("internalException") or inner.get("internalexception") if isinstance(inner, dict) else None
    )
    inner_type = inner_exc.get("type") if isinstance(inner_exc, dict) else None
    return _short(header_type) or _short(inner_type) or _short(error.get("code")), message


def _short(name: Any) -> str | None:
    text = str(name or "").strip()
    return text.rsplit(".", 1)[-1] or None if text else None


def kind_of(*, status: int, exc_type: str | None, text: str) -> str:
    """The taxonomy: exception type first, then the status; English text only for the two published
    phrases (directory sync, per-tenant concurrency), which have no type of their own."""
    lowered = text.lower()
    if DIRSYNC_PHRASE in lowered:
        return CONFLICT
    if CONCURRENCY_PHRASE in lowered or exc_type in THROTTLED_TYPES or status == 429:
        return THROTTLED
    if exc_type in TRANSIENT_TYPES or "issue may be transient" in lowered:
        return TRANSIENT
    if exc_type in NOT_FOUND_TYPES:
        return NOT_FOUND
    if exc_type in BAD_PARAMETER_TYPES:
        return BAD_PARAMETER
    if exc_type in PERMISSION_TYPES or WRITE_SCOPE_PHRASE in lowered or status == 403:
        return PERMISSION
    return _kind_by_status(status)


def _kind_by_status(status: int) -> str:
    if status == 401:
        return AUTH
    if status == 503:
        return UNAVAILABLE
    if status == 408:
        return TRANSIENT
    if status in (500, 502, 504) or status >= 500:
        return UNKNOWN  # the cmdlet may have run before the failure
    if status == 404:
        return NOT_FOUND
    if status == 400:
        return BAD_PARAMETER
    return REJECTED


def classify(response: requests.Response) -> Outcome:
    """Turn one HTTP answer into an outcome; the only place that reads error shapes."""
    status = response.status_code
    parsed, unreadable = read_body(response)
    header_type = response.headers.get("x-ExceptionType")
    common = {"status": status, "retry_after_s": retry_after_s(response), "rate": rate_headers(response)}
    if 200 <= status < 300:
        return _success(parsed, unreadable, header_type, common)
    if unreadable is not None:
        text = unreadable
        if CONCURRENCY_PHRASE in (response.text[:500] if "not JSON" in unreadable else "").lower():
            return Outcome(kind=THROTTLED, code="ConcurrencyLimit", detail=response.text[:500], **common)
        kind = kind_of(status=status, exc_type=_short(header_type), text="")
        return Outcome(kind=kind, code=_short(header_type) or f"HTTP{status}", detail=text, **common)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    exc_type, text = exception_parts(error, header_type)
    kind = kind_of(status=status, exc_type=exc_type, text=text)
    code = exc_type or (DIRSYNC_CODE if kind == CONFLICT else f"HTTP{status}")
    return Outcome(kind=kind, code=code, detail=text[:1000] or f"HTTP {status}", **common)


def _success(parsed: Any, unreadable: str | None, header_type: str | None, common: dict) -> Outcome:
    """A 2xx is accepted only with a readable body and no @adminapi.errors."""
    if unreadable is not None or not isinstance(parsed, dict):
        why = unreadable or f"a JSON {type(parsed).__name__} instead of an object"
        return Outcome(kind=UNKNOWN, code="UnreadableSuccess", detail=f"2xx with {why}", **common)
    warnings = tuple(str(w)[:500] for w in _as_list(parsed.get("@adminapi.warnings")))
    errors = _as_list(parsed.get("@adminapi.errors"))
    if errors:
        first = errors[0]
        error = first if isinstance(first, dict) else {"message": str(first)}
        exc_type, text = exception_parts(error.get("error", error), header_type)
        # A 200 that says it failed is a refusal (by its type), never accepted.
        kind = kind_of(status=200, exc_type=exc_type, text=text)
        return Outcome(
            kind=kind,
            code=exc_type or "AdminApiError",
            detail=f"200 with @adminapi.errors: {text[:900]}",
            warnings=warnings,
            **common,
        )
    return Outcome(kind=ACCEPTED, warnings=warnings, **common)


def _as_list(raw: Any) -> list[Any]:
    if raw is None:
        return []
    return raw if isinstance(raw, list) else [raw]


def outcome_unknown(outcome: Outcome) -> bool:
    """True when the write may or may not have been applied: no answer at all, a gateway or server
    error, or a success whose body could not be read. Throttling, 408, 503 and transient exception
    types come before the cmdlet writes; every other answer is Exchange's verdict on the write."""
    return outcome.kind == UNKNOWN
