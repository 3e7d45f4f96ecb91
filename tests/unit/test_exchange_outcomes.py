"""How answers of Exchange Online's InvokeCommand endpoint become outcomes of a write."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import requests

from certsync.exchange.client import Outcome, backoff_s, classify, encode_bytes
from certsync.exchange.recipients import Recipient


def _response(
    status: int, body: object = None, *, text: str | None = None, **headers: str
) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = (text if text is not None else json.dumps(body)).encode()
    response.headers.update(headers)
    return response


def _error(exception_type: str, message: str) -> dict:
    return {
        "error": {
            "code": "BadRequest",
            "message": message,
            "details": [{"message": f"Ex|Microsoft.Exchange.{exception_type}|{message}"}],
        }
    }


def test_success_is_accepted() -> None:
    assert classify(_response(200, {"value": []})).kind == "accepted"


def test_directory_sync_refusal_is_a_conflict() -> None:
    text = "The action 'Set-Mailbox' can't be performed on the object because it's being synchronized from your on-premises organization."
    outcome = classify(_response(400, _error("Tasks.TaskInvalidOperationException", text)))
    assert (outcome.kind, outcome.code) == ("conflict", "TaskInvalidOperationException")


def test_unknown_identity_is_rejected_with_the_exception_type() -> None:
    outcome = classify(_response(404, _error("ManagementObjectNotFoundException", "couldn't be found")))
    assert (outcome.kind, outcome.code) == ("rejected", "ManagementObjectNotFoundException")


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_answers_are_retried(status: int) -> None:
    assert classify(_response(status, text="busy")).kind == "retry"


def test_retry_after_is_honoured_bounded_and_otherwise_exponential() -> None:
    plain = "You have reached the maximum number of concurrent requests per tenant. Please wait and try again"
    told = classify(_response(429, text=plain, **{"Retry-After": "7"}))
    assert (told.detail, backoff_s(told, 1)) == (plain, 7.0)
    assert backoff_s(classify(_response(429, text="x", **{"Retry-After": "99999"})), 1) == 120.0
    silent = classify(_response(503, text="x"))
    assert [backoff_s(silent, n) for n in (1, 2, 3, 9)] == [2.0, 4.0, 8.0, 30.0]
    assert backoff_s(Outcome(kind="retry", status=None), 1) == 2.0


def test_byte_arrays_travel_as_base64() -> None:
    assert encode_bytes([b"\x30\x82", b""]) == ["MII=", ""]


def test_recipient_snapshot_hashes_what_exchange_holds() -> None:
    der = b"\x30\x03\x02\x01\x01"
    recipient = Recipient.from_exchange(
        {
            "Guid": "g-1",
            "ExternalDirectoryObjectId": "",
            "PrimarySmtpAddress": "a@x.test",
            "RecipientTypeDetails": "MailContact",
            "IsDirSynced": True,
            "IsExchangeCloudManaged": False,
            "UserCertificate": [base64.b64encode(der).decode(), "not base64!"],
        }
    )
    assert recipient.recipient_id == "g-1"  # contacts have no directory object id
    assert recipient.user_certificate[0] == hashlib.sha256(der).digest()
    assert len(recipient.user_certificate) == 2  # an unreadable value still counts as held
    assert (recipient.cmdlet, recipient.writable) == ("Set-MailContact", False)
