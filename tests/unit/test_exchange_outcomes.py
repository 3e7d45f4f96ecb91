"""How answers of Exchange Online's InvokeCommand endpoint become outcomes, how requests are shaped,
and how certificate values are read: against the bodies published for the real service."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid

import pytest
import requests

from certsync.exchange import wire
from certsync.exchange.errors import ExchangeShapeError
from certsync.exchange.outcomes import Outcome, backoff_s, classify, outcome_unknown
from certsync.exchange.recipients import Recipient
from certsync.exchange.throttle import CircuitBreaker, Throttle
from certsync.exchange.values import UnreadableValue, decode_values, value_shape

DER = b"\x30\x03\x02\x01\x01"
B64 = base64.b64encode(DER).decode()
# The unknown-identity body as captured from the real service (notes: "What public evidence shows").
REAL_NOT_FOUND = {
    "error": {
        "code": "NotFound",
        "message": "Error executing cmdlet",
        "details": [
            {
                "code": "Client",
                "target": "",
                "message": "Ex6F9304|Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException|"
                "The operation couldn't be performed because object 'x@contoso.com' couldn't be found on"
                " 'AM0PR01A001DC01.EURPR01A001.prod.outlook.com'.",
            }
        ],
        "innererror": {
            "type": "Microsoft.Exchange.Admin.OData.Core.ODataServiceException",
            "internalexception": {"message": "The operation couldn't be performed"},
        },
    }
}
DIRSYNC_TEXT = (
    "The operation on mailbox \"alice\" failed because it's out of the current user's write scope. The action"
    " 'Set-Mailbox', 'EmailAddresses', can't be performed on the object 'alice' because the object is being"
    " synchronized from your on-premises organization. This action should be performed on the object in"
    " your on-premises organization."
)
SCOPE_TEXT = (
    "The operation on mailbox \"alice\" failed because it's out of the current user's write scope. "
    "The role assignment restricts writes to the recipients of a management scope."
)
CONCURRENCY = (
    "You have reached the maximum number of concurrent requests per tenant. Please wait and try again"
)


def _response(
    status: int, body: object = None, *, raw: bytes | None = None, **headers: str
) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = raw if raw is not None else json.dumps(body).encode()
    response.headers.update(headers)
    return response


def _error(exception_type: str, text: str, status_code: str = "BadRequest") -> dict:
    return {
        "error": {
            "code": status_code,
            "message": "Error executing cmdlet",
            "details": [{"code": "Client", "target": "", "message": f"Ex1|{exception_type}|{text}"}],
        }
    }


def test_success_is_accepted_and_keeps_its_warnings() -> None:
    outcome = classify(_response(200, {"value": [], "@adminapi.warnings": ["no settings modified"]}))
    assert (outcome.kind, outcome.warnings, outcome.audit_outcome) == (
        "accepted",
        ("no settings modified",),
        "accepted",
    )
    assert outcome.audit_detail == "warning: no settings modified"


def test_adminapi_errors_on_a_200_is_never_accepted() -> None:
    body = {
        "value": [],
        "@adminapi.errors": [{"message": "Ex1|System.Management.Automation.ParameterBindingException|bad"}],
    }
    outcome = classify(_response(200, body))
    assert (outcome.kind, outcome.code, outcome.audit_outcome) == (
        "bad_parameter",
        "ParameterBindingException",
        "rejected",
    )
    plain = classify(_response(200, {"value": [], "@adminapi.errors": ["it failed"]}))
    assert plain.kind == "rejected" and plain.audit_outcome == "rejected"


def test_real_not_found_body_is_not_found_by_its_exception_type() -> None:
    outcome = classify(_response(404, REAL_NOT_FOUND))
    assert (outcome.kind, outcome.code) == ("not_found", "ManagementObjectNotFoundException")
    assert "couldn't be found" in (outcome.detail or "")


def test_only_the_precise_dirsync_refusal_is_a_conflict() -> None:
    conflict = classify(_response(400, _error("System.InvalidOperationException", DIRSYNC_TEXT)))
    assert conflict.kind == "conflict"
    scope = classify(_response(400, _error("System.InvalidOperationException", SCOPE_TEXT)))
    assert scope.kind == "permission"  # RBAC or licence: the same first sentence, not a sync conflict


def test_the_exception_type_header_names_the_type_when_the_body_does_not() -> None:
    outcome = classify(
        _response(
            400,
            {"error": {"code": "BadRequest", "message": "x"}},
            **{"x-ExceptionType": "ParameterBindingException"},
        )
    )
    assert (outcome.kind, outcome.code) == ("bad_parameter", "ParameterBindingException")
    aad = classify(
        _response(500, {"error": {"message": "x"}}, **{"x-ExceptionType": "UnableToWriteToAadException"})
    )
    assert aad.kind == "transient"


@pytest.mark.parametrize(
    "exception_type",
    ["DCOverloadedException", "SuitabilityDirectoryException", "ServerInMMException",
     "ADServerSettingsChangedException", "StorageTransientException"],
)  # fmt: skip
def test_transient_exception_types_are_retried(exception_type: str) -> None:
    outcome = classify(_response(500, _error(f"Microsoft.Exchange.Data.Directory.{exception_type}", "busy")))
    assert outcome.kind == "transient" and outcome.retryable and not outcome_unknown(outcome)


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_the_concurrency_message_is_throttling_whatever_its_status(status: int) -> None:
    outcome = classify(_response(status, raw=CONCURRENCY.encode(), **{"Retry-After": "2.5"}))
    assert (outcome.kind, outcome.retry_after_s) == ("throttled", 2.5)


def test_status_fallbacks() -> None:
    assert classify(_response(401, {"error": {"code": "InvalidAuthenticationToken"}})).kind == "auth"
    assert classify(_response(503, raw=b"Service Unavailable")).kind == "unavailable"
    assert classify(_response(408, raw=b"Request Timeout")).kind == "transient"
    for status in (500, 502, 504):
        assert outcome_unknown(classify(_response(status, raw=b"Bad Gateway")))
    assert (
        classify(_response(429, _error("Microsoft.Exchange.Admin.OData.Core.ThrottlingException", "x"))).kind
        == "throttled"
    )


@pytest.mark.parametrize(
    ("status", "raw", "headers", "kind", "reason"),
    [
        (403, b"\x00" * 64, {"Content-Encoding": "gzip"}, "permission", "NUL bytes"),
        (403, b"not json at all", {}, "permission", "not JSON"),
        (502, b"<html><head><title>502 Bad Gateway</title></head></html>", {}, "unknown", "HTML page"),
        (200, b"<!DOCTYPE html><html><title>Sign in</title>", {}, "unknown", "HTML page"),
        (200, b"\x00" * 10, {"Content-Encoding": "gzip"}, "unknown", "NUL bytes"),
        (200, b"", {}, "unknown", "empty body"),
        (200, b"[1, 2]", {}, "unknown", "JSON list"),
        (200, b'{"value": [' + b'{"a": 1},' * 1_200_000 + b"{}]}", {}, "unknown", "exceeds"),
    ],
)  # fmt: skip
def test_bad_bodies_are_classified_with_a_reason_never_accepted(status, raw, headers, kind, reason) -> None:
    outcome = classify(_response(status, raw=raw, **headers))
    assert outcome.kind == kind and outcome.kind != "accepted"
    assert reason in (outcome.detail or ""), outcome


def test_a_real_gzip_body_is_decoded_by_requests() -> None:
    """requests decodes gzip on the wire; the content it hands over is what is classified."""
    assert gzip.decompress(gzip.compress(json.dumps({"value": []}).encode()))  # sanity of the fixture
    assert classify(_response(200, {"value": []})).kind == "accepted"


def test_retry_after_is_honoured_bounded_and_otherwise_exponential() -> None:
    told = classify(_response(429, raw=CONCURRENCY.encode(), **{"Retry-After": "7"}))
    assert backoff_s(told, 1) == 7.0
    assert backoff_s(classify(_response(429, raw=b"x", **{"Retry-After": "99999"})), 1) == 120.0
    silent = classify(_response(503, raw=b"x"))
    assert [backoff_s(silent, n) for n in (1, 2, 3, 9)] == [2.0, 4.0, 8.0, 30.0]


def test_request_shapes_are_the_modules() -> None:
    params = wire.certificate_parameters(identity="a", user_certificate=[DER], user_smime_certificate=[])
    assert params == {
        "Identity": "a",
        "UserCertificate@odata.type": "#Collection(Exchange.ByteArrayType)",
        "UserCertificate": [{"Data": B64}],
        "UserSMimeCertificate@odata.type": "#Collection(Exchange.ByteArrayType)",
        "UserSMimeCertificate": [],
    }
    ints = wire.byte_array_collection("UserCertificate", [DER], encoding="integers")
    assert ints["UserCertificate"] == [{"Data": [48, 3, 2, 1, 1]}]
    headers = wire.headers(token="t", cmdlet="Set-Mailbox", request_id=uuid.UUID(int=1), connection_id="c",
                           tenant_id="tid", page_size=100)  # fmt: skip
    assert headers["X-ClientApplication"] == "ExoManagementModule"
    assert headers["X-AnchorMailbox"] == "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@tid"
    assert wire.hashtable({"Add": []})["@odata.type"] == "#Exchange.GenericHashTable"


@pytest.mark.parametrize("raw", [[B64], [{"Data": B64}], [{"Data": list(DER)}], B64, {"Data": B64}])
def test_every_value_shape_the_evidence_allows_is_read(raw) -> None:
    assert decode_values(raw, name="UserCertificate") == (DER,)


@pytest.mark.parametrize(
    "raw",
    [
        ["System.Byte[]"],
        "System.Byte[]",
        ["not base64!"],
        [{"Data": [256]}],
        [{"Data": None}],
        [42],
        7,
        [{"X": 1}],
    ],
)
def test_an_unreadable_value_is_never_no_certificates(raw) -> None:
    with pytest.raises(UnreadableValue):
        decode_values(raw, name="UserCertificate")
    obj = {"Guid": "g", "PrimarySmtpAddress": "a@x.test", "UserCertificate": raw}
    with pytest.raises(ExchangeShapeError, match="certsync probe"):
        Recipient.from_exchange(obj)


def test_value_shapes_are_named_for_the_probe() -> None:
    assert [value_shape(v) for v in ([B64], [{"Data": B64}], [{"Data": [1]}], "System.Byte[]", [], None)] == [
        "list of base64 string", "list of {Data: base64}", "list of {Data: [int, ...]}", "type name", "empty list", "absent",
    ]  # fmt: skip


def test_recipient_snapshot_hashes_what_exchange_holds() -> None:
    recipient = Recipient.from_exchange(
        {
            "Guid": "g-1",
            "ExternalDirectoryObjectId": "",
            "PrimarySmtpAddress": "a@x.test",
            "RecipientTypeDetails": "MailContact",
            "IsDirSynced": True,
            "IsExchangeCloudManaged": False,
            "UserCertificate": [{"Data": list(DER)}],
        }
    )
    assert recipient.recipient_id == "g-1"  # contacts have no directory object id
    assert recipient.user_certificate == (hashlib.sha256(DER).digest(),)
    assert (recipient.cmdlet, recipient.writable) == ("Set-MailContact", False)


def test_throttle_decreases_once_per_event_and_grows_back() -> None:
    now = [0.0]
    throttle = Throttle(
        max_concurrency=8, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s)
    )
    tickets = [throttle.acquire("x") for _ in range(4)]
    now[0] = 1.0
    throttled = Outcome(kind="throttled", status=429, code="ThrottlingException", retry_after_s=1.0)
    for ticket in tickets:
        throttle.release(ticket, throttled)
    assert throttle.decreases == 1 and throttle.rate is not None  # the other three were sent before it
    rate = throttle.rate
    for _ in range(10):
        throttle.release(throttle.acquire("x"), Outcome(kind="accepted", status=200))
    assert throttle.rate > rate
    concurrency = Outcome(kind="throttled", status=503, code="ConcurrencyLimit")
    now[0] = 5.0
    window = throttle.window
    rate = throttle.rate
    tickets = [throttle.acquire("x") for _ in range(3)]
    for ticket in tickets:
        throttle.release(ticket, concurrency)
    assert int(throttle.window) == int(window) - 1 and throttle.rate == rate  # a count, not a rate
    for _ in range(20):
        throttle.release(throttle.acquire("x"), Outcome(kind="accepted", status=200))
    assert int(throttle.window) == int(window) - 1  # held before probing higher
    now[0] += 31.0
    for _ in range(20):
        throttle.release(throttle.acquire("x"), Outcome(kind="accepted", status=200))
    assert throttle.window > int(window) - 1


def test_breaker_opens_on_consecutive_service_failures_only() -> None:
    breaker = CircuitBreaker(threshold=3)
    down = Outcome(kind="unavailable", status=503, code="HTTP503")
    for _ in range(2):
        breaker.record(down)
    breaker.record(Outcome(kind="not_found", status=404))  # the service answered: it is up
    breaker.record(down)
    breaker.record(down)
    assert not breaker.open
    breaker.record(Outcome(kind="unknown", status=None, code="ConnectTimeout"))
    assert breaker.open and "3 requests in a row" in breaker.describe()
