"""`certsync probe`: one careful round trip against a real tenant, on one recipient the administrator
names, that settles what public evidence leaves unknown about InvokeCommand.

Steps: get a token; read the recipient with Get-Recipient and with the Get-* of its kind; add a
short-lived self-signed test certificate to its UserCertificate (keeping what it holds), in the byte
encoding configured and, if that is refused as a bad parameter, in the other one; read back until
the value shows (the read-after-write lag); restore the original values and read back again; ask for
an identity that does not exist (the error shape). Every answer's status, latency, headers of
interest, error type and value shapes are recorded. Nothing else in the tenant is touched, and the
original values are restored even when a step fails.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certsync.exchange import wire
from certsync.exchange.client import CERTIFICATE_FIELDS, GET_FOR_SET, RECIPIENT_FIELDS, Answer, ExchangeClient
from certsync.exchange.recipients import CMDLET_BY_TYPE
from certsync.exchange.values import UnreadableValue, decode_values, value_shape

HEADERS_OF_INTEREST = (
    "Rate-Limit-Limit",
    "Rate-Limit-Remaining",
    "Rate-Limit-Reset",
    "X-ConcurrencyCount",
    "X-CombinedAppOnlyConcurrencyCount",
    "x-ExceptionType",
    "x-ExceptionTargetType",
    "Retry-After",
    "Content-Type",
    "Content-Encoding",
)


@dataclass
class Step:
    """What one request showed."""

    name: str
    cmdlet: str
    status: int | None
    kind: str
    latency_ms: float
    code: str | None = None
    detail: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ProbeReport:
    recipient: str
    steps: list[Step] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient,
            "findings": self.findings,
            "steps": [asdict(s) for s in self.steps],
        }


def test_certificate() -> bytes:
    """A self-signed P-256 certificate valid for one day, named so an administrator recognises it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certsync probe test certificate (remove me)")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


class Prober:
    def __init__(self, *, client: ExchangeClient, identity: str, wait_s: float, poll_s: float = 5.0) -> None:
        self.client = client
        self.identity = identity
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.report = ProbeReport(recipient=identity)

    def _send(
        self, name: str, cmdlet: str, parameters: dict[str, Any], *, select: tuple[str, ...] = ()
    ) -> Answer:
        url = f"{self.client.settings.base_url.rstrip('/')}/adminapi/beta/{self.client.settings.tenant_id}/InvokeCommand"
        answer = self.client.send(
            cmdlet, parameters, request_id=uuid.uuid4(), url=url + wire.select_query(select)
        )
        outcome = answer.outcome
        item = _first(answer.body)
        self.report.steps.append(
            Step(
                name=name,
                cmdlet=cmdlet,
                status=outcome.status,
                kind=outcome.kind,
                latency_ms=round(answer.latency_s * 1000, 1),
                code=outcome.code,
                detail=(outcome.detail or "")[:300] or None,
                headers={
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower() in {h.lower() for h in HEADERS_OF_INTEREST}
                },
                shapes={f: value_shape(item.get(f)) for f in CERTIFICATE_FIELDS} if item is not None else {},
                warnings=list(outcome.warnings),
            )
        )
        return answer

    def run(self) -> ProbeReport:
        started = time.monotonic()
        self.client._tokens.token()
        self.report.findings["token_ms"] = round((time.monotonic() - started) * 1000, 1)
        generic = self._send(
            "read via Get-Recipient", "Get-Recipient", {"Identity": self.identity}, select=RECIPIENT_FIELDS
        )
        item = _first(generic.body) or {}
        kind = str(item.get("RecipientTypeDetails") or "")
        set_cmdlet = CMDLET_BY_TYPE.get(kind)
        self.report.findings["get_recipient_returns_certificates"] = all(
            f in item for f in CERTIFICATE_FIELDS
        )
        self.report.findings["recipient"] = {
            k: item.get(k)
            for k in ("RecipientTypeDetails", "IsDirSynced", "IsExchangeCloudManaged", "PrimarySmtpAddress")
        }
        if set_cmdlet is None:
            self.report.findings["stopped"] = (
                f"recipient type {kind or 'unknown'!r} has no Set-* certsync uses"
            )
            return self.report
        self.get_cmdlet = GET_FOR_SET[set_cmdlet]
        original = self._read("read before the write")
        self.report.findings["value_shape_on_read"] = self.report.steps[-1].shapes
        if original is None:
            self.report.findings["stopped"] = (
                "the certificate values could not be read, so nothing was written (a restore needs them)"
            )
        else:
            self._write_and_restore(set_cmdlet, original)
        self._send("error shape: unknown identity", self.get_cmdlet, {"Identity": str(uuid.uuid4())})
        self.report.findings["error_shape_not_found"] = asdict(self.report.steps[-1])
        return self.report

    def _read(self, name: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
        answer = self._send(name, self.get_cmdlet, {"Identity": self.identity}, select=CERTIFICATE_FIELDS)
        item = _first(answer.body)
        if item is None:
            return None
        try:
            return tuple(decode_values(item.get(f), name=f) for f in CERTIFICATE_FIELDS)  # type: ignore[return-value]
        except UnreadableValue as exc:
            self.report.findings["unreadable"] = str(exc)
            return None

    def _write_and_restore(
        self, set_cmdlet: str, original: tuple[tuple[bytes, ...], tuple[bytes, ...]]
    ) -> None:
        test = test_certificate()
        user_certificate, smime = original
        try:
            encoding = self._write(set_cmdlet, [*user_certificate, test], smime)
            self.report.findings["byte_encoding_accepted"] = encoding
            if encoding is not None:
                self.report.findings["read_after_write_lag_s"] = self._wait_for(lambda held: test in held[0])
        finally:
            restored = self._write(set_cmdlet, list(user_certificate), smime, name="restore")
            self.report.findings["restored"] = restored is not None
            if restored is not None:
                self.report.findings["restore_visible_after_s"] = self._wait_for(
                    lambda held: test not in held[0]
                )

    def _write(
        self, set_cmdlet: str, user_certificate: list[bytes], smime: tuple[bytes, ...], *, name: str = "write"
    ) -> str | None:
        """Send in the configured encoding, then the other one if refused as a bad parameter;
        returns the encoding that was accepted (None: neither)."""
        first = self.client.settings.byte_encoding
        for encoding in (first, *(e for e in wire.BYTE_ENCODINGS if e != first)):
            parameters = wire.certificate_parameters(
                identity=self.identity,
                user_certificate=user_certificate,
                user_smime_certificate=smime,
                encoding=encoding,
            )
            answer = self._send(f"{name} ({encoding})", set_cmdlet, parameters)
            if answer.outcome.kind == "accepted":
                return encoding
            if answer.outcome.kind != "bad_parameter":
                return None
        return None

    def _wait_for(self, done: Any) -> float | None:
        """Seconds until a read shows what `done` looks for (None: not within --wait)."""
        started = time.monotonic()
        pause = 0.5  # doubling up to poll_s: a short lag is measured closely, a long one cheaply
        while True:
            held = self._read("read back")
            if held is not None and done(held):
                return round(time.monotonic() - started, 1)
            if time.monotonic() - started >= self.wait_s:
                return None
            time.sleep(pause)
            pause = min(pause * 2, self.poll_s)


def _first(body: Any) -> dict[str, Any] | None:
    if isinstance(body, dict) and isinstance(body.get("value"), list) and body["value"]:
        first = body["value"][0]
        return first if isinstance(first, dict) else None
    return None


def render(report: ProbeReport) -> str:
    """The report as an administrator reads it: findings first, then every request."""
    lines = [f"certsync probe of {report.recipient}", "", "Findings:"]
    lines += [f"  {key}: {value}" for key, value in report.findings.items() if key != "error_shape_not_found"]
    lines += ["", "Requests:"]
    for step in report.steps:
        lines.append(
            f"  {step.name}: {step.cmdlet} -> HTTP {step.status or 'no answer'} {step.kind}"
            f" {step.code or ''} in {step.latency_ms} ms"
        )
        for label, value in (("shapes", step.shapes), ("headers", step.headers), ("warnings", step.warnings)):
            if value:
                lines.append(f"      {label}: {value}")
        if step.detail and step.kind != "accepted":
            lines.append(f"      detail: {step.detail}")
    return "\n".join(lines)
