"""The HTTP surface: token endpoints, InvokeCommand, and the /_emulator/ control plane."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from certsync_lab.emulator.cmdlets import MAX_PAGE_SIZE, CmdletRunner, PageRequest
from certsync_lab.emulator.controls import AUTH_ENDPOINT_TARGET, Controls, FaultRule
from certsync_lab.emulator.errors import CmdletError, aadsts
from certsync_lab.emulator.requestlog import RequestEntry, RequestLog
from certsync_lab.emulator.state import StateStore
from certsync_lab.emulator.tokens import TokenRejected, TokenResult, TokenService

log = logging.getLogger(__name__)

CONCURRENCY_MESSAGE = (
    "You have reached the maximum number of concurrent requests per tenant. Please wait and try again"
)
APP_ANCHOR = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@"
_MAXPAGESIZE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)
_TRANSIENT_TEXT = {
    408: "Request Timeout",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(kw_only=True)
class Emulator:
    """Everything one running emulator holds; the app's routes close over it."""

    store: StateStore
    tokens: TokenService
    runner: CmdletRunner
    controls: Controls
    requests: RequestLog

    @classmethod
    def open(cls, *, home: Path) -> Emulator:
        store = StateStore(home=home)
        return cls(
            store=store,
            tokens=TokenService(store=store, home=home),
            runner=CmdletRunner(store=store),
            controls=Controls(),
            requests=RequestLog(),
        )


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def create_app(emulator: Emulator) -> FastAPI:
    app = FastAPI(title="certsync Exchange Online emulator", docs_url=None, redoc_url=None, openapi_url=None)
    _add_token_routes(app, emulator)
    _add_invoke_route(app, emulator)
    _add_control_routes(app, emulator)
    return app


def _add_token_routes(app: FastAPI, emulator: Emulator) -> None:
    @app.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def openid_configuration(tenant: str, request: Request) -> Response:
        if not emulator.tokens.knows_tenant(tenant):
            return JSONResponse(
                {
                    "error": "invalid_tenant",
                    "error_description": f"AADSTS90002: Tenant '{tenant}' not found.",
                },
                status_code=400,
            )
        base = str(request.base_url)
        return JSONResponse(emulator.tokens.openid_configuration(base_url=base, tenant=tenant))

    @app.get("/{tenant}/discovery/v2.0/keys")
    async def keys(tenant: str) -> Response:
        return JSONResponse(emulator.tokens.jwks())

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request) -> Response:
        started = time.monotonic()
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        token_url = f"{str(request.base_url).rstrip('/')}/{tenant}/oauth2/v2.0/token"
        result = _token_fault(emulator) or emulator.tokens.issue(
            tenant=tenant, form=form, token_url=token_url
        )
        emulator.requests.append(
            RequestEntry(
                timestamp=_now_text(),
                endpoint="token",
                status=result.status,
                client_request_id=request.headers.get("client-request-id"),
                client_id=form.get("client_id"),
                outcome=str(result.body.get("error", "issued")),
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
        )
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache", **result.headers}
        return JSONResponse(result.body, status_code=result.status, headers=headers)


def _token_fault(emulator: Emulator) -> TokenResult | None:
    fault = emulator.controls.take_fault(AUTH_ENDPOINT_TARGET)
    if fault is None:
        return None
    status, body = aadsts(
        status=fault.status,
        error="temporarily_unavailable",
        code=90033,
        description=fault.text or "A transient error has occurred. Please try again.",
    )
    headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
    return TokenResult(status=status, body=body, headers=headers)


@dataclass(kw_only=True)
class _Call:
    """One InvokeCommand call as received."""

    tenant: str
    cmdlet: str
    parameters: dict[str, Any]
    client_request_id: str
    client_id: str | None = None


def _add_invoke_route(app: FastAPI, emulator: Emulator) -> None:
    @app.post("/adminapi/beta/{tenant}/InvokeCommand")
    async def invoke(tenant: str, request: Request) -> Response:
        started = time.monotonic()
        call = _Call(
            tenant=tenant,
            cmdlet="",
            parameters={},
            client_request_id=request.headers.get("client-request-id") or str(uuid.uuid4()),
        )
        response, outcome = await _handle_invoke(emulator, request, call)
        response.headers["client-request-id"] = call.client_request_id
        response.headers["request-id"] = str(uuid.uuid4())
        identity = call.parameters.get("Identity")
        emulator.requests.append(
            RequestEntry(
                timestamp=_now_text(),
                endpoint="InvokeCommand",
                status=response.status_code,
                client_request_id=call.client_request_id,
                cmdlet=call.cmdlet or None,
                identity=None if identity is None else str(identity),
                client_id=call.client_id,
                outcome=outcome,
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
        )
        return response


async def _handle_invoke(emulator: Emulator, request: Request, call: _Call) -> tuple[Response, str]:
    parsed = await _parse_body(request, call)
    if parsed is not None:
        return parsed, "BadRequest"
    try:
        claims = emulator.tokens.verify_access_token(
            authorization=request.headers.get("authorization"), tenant=call.tenant
        )
    except TokenRejected as exc:
        log.info("InvokeCommand refused: %s", exc)
        return _unauthorized(), "Unauthorized"
    call.client_id = claims.client_id
    header_error = _check_headers(emulator, request, call)
    if header_error is not None:
        return _error_response(header_error), header_error.code
    if call.cmdlet in emulator.controls.config.denied_cmdlets:
        # Captured with a cmdlet outside the caller's role: 403, a body of NUL bytes claiming gzip.
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return Response(b"\x00" * 128, status_code=403, headers=headers), "Denied"
    if not emulator.controls.enter(call.tenant):
        status = emulator.controls.config.concurrency_status
        return PlainTextResponse(CONCURRENCY_MESSAGE, status_code=status), "ConcurrencyLimit"
    try:
        return await _admitted(emulator, request, call)
    finally:
        emulator.controls.leave(call.tenant)


async def _parse_body(request: Request, call: _Call) -> Response | None:
    try:
        body = json.loads(await request.body())
        cmdlet_input = body["CmdletInput"]
        call.cmdlet = str(cmdlet_input["CmdletName"])
        parameters = cmdlet_input.get("Parameters") or {}
        if not isinstance(parameters, dict):
            raise TypeError("Parameters must be an object")
        call.parameters = parameters
    except (ValueError, KeyError, TypeError):
        error = CmdletError(
            status=400,
            code="BadRequest",
            exception_type="System.ArgumentException",
            text='The request body must be {"CmdletInput": {"CmdletName": ..., "Parameters": {...}}}.',
        )
        return _error_response(error)
    return None


def _check_headers(emulator: Emulator, request: Request, call: _Call) -> CmdletError | None:
    named = request.headers.get("x-cmdletname")
    if named is not None and named.lower() != call.cmdlet.lower():
        return CmdletError(
            status=400,
            code="BadRequest",
            exception_type="System.ArgumentException",
            text=f"X-CmdletName '{named}' does not match CmdletName '{call.cmdlet}'.",
        )
    if not emulator.controls.config.require_anchor_mailbox:
        return None
    anchor = request.headers.get("x-anchormailbox", "")
    allowed = {APP_ANCHOR + emulator.store.tenant_id, APP_ANCHOR + emulator.store.tenant_domain}
    if anchor.lower() not in {value.lower() for value in allowed}:
        return CmdletError(
            status=400,
            code="BadRequest",
            exception_type="System.ArgumentException",
            text="App-only requests must carry X-AnchorMailbox: APP:SystemMailbox{...}@<tenant>.",
        )
    return None


async def _admitted(emulator: Emulator, request: Request, call: _Call) -> tuple[Response, str]:
    decision = emulator.controls.take_rate()
    rate_headers: dict[str, str] = {}
    if decision is not None:
        rate_headers = decision.headers(limit=emulator.controls.config.rate_limit_limit)
        if not decision.allowed:
            error = CmdletError(
                status=429,
                code="TooManyRequests",
                exception_type="Microsoft.Exchange.Admin.OData.Core.ThrottlingException",
                text="The request was throttled. Retry after the delay given in Retry-After.",
            )
            headers = {**rate_headers, "Retry-After": str(decision.retry_after_s)}
            return _error_response(error, headers=headers), "Throttled"
    delay = emulator.controls.latency_s()
    if delay > 0:
        await asyncio.sleep(delay)
    hold = emulator.controls.take_hold(call.cmdlet)
    if hold is not None and hold.before_ms > 0:
        await asyncio.sleep(hold.before_ms / 1000.0)
    if hold is not None and hold.then_status is not None:
        fault: FaultRule | None = FaultRule(cmdlet=call.cmdlet, count=1, status=hold.then_status)
    else:
        fault = emulator.controls.take_fault(call.cmdlet)
    if fault is not None:
        return _fault_response(fault, rate_headers), f"Fault{fault.status}"
    response, outcome = _run_cmdlet(emulator, request, call)
    response.headers.update(rate_headers)
    if hold is not None and hold.after_ms > 0:
        # Applied, not yet answered; the handler goes on even when the client has gone.
        await asyncio.sleep(hold.after_ms / 1000.0)
    return response, outcome


def _run_cmdlet(emulator: Emulator, request: Request, call: _Call) -> tuple[Response, str]:
    page = PageRequest(
        page_size=_page_size(request.headers.get("prefer")),
        skip_token=request.query_params.get("$skiptoken"),
        select=_select(request.query_params.get("$select")),
    )
    config = emulator.controls.config
    try:
        result = emulator.runner.run(name=call.cmdlet, parameters=call.parameters, page=page, config=config)
    except CmdletError as error:
        outcome = error.exception_type.rsplit(".", 1)[-1]
        if config.adminapi_errors_on_200 and call.cmdlet.startswith("Set-") and error.status == 400:
            # Some failures come back as a success status carrying @adminapi.errors.
            body = {"value": [], "@adminapi.errors": [error.error_object()]}
            return JSONResponse(body, headers=error.headers()), f"{outcome}@200"
        return _error_response(error), outcome
    body: dict[str, Any] = {
        "@odata.context": f"{str(request.base_url).rstrip('/')}/adminapi/beta/{call.tenant}"
        "/$metadata#Collection(Exchange.GenericHashTable)",
        "value": result.value,
    }
    if result.skip_token is not None:
        query = {"$skiptoken": result.skip_token}
        if page.select is not None:
            query["$select"] = ",".join(page.select)
        body["@odata.nextLink"] = (
            f"{str(request.base_url).rstrip('/')}/adminapi/beta/{call.tenant}/InvokeCommand?"
            f"{urlencode(query)}"
        )
    if result.warnings:
        body["@adminapi.warnings"] = result.warnings
    return JSONResponse(body), "Success"


def _page_size(prefer: str | None) -> int:
    match = _MAXPAGESIZE.search(prefer or "")
    if match is None:
        return MAX_PAGE_SIZE
    return max(1, min(MAX_PAGE_SIZE, int(match.group(1))))


def _select(raw: str | None) -> tuple[str, ...] | None:
    if not raw:
        return None
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def _unauthorized() -> Response:
    return JSONResponse(
        {
            "error": {
                "code": "InvalidAuthenticationToken",
                "message": "Access token is missing, invalid or expired.",
            }
        },
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def _error_response(error: CmdletError, *, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        error.body(), status_code=error.status, headers={**error.headers(), **(headers or {})}
    )


def _fault_response(fault: Any, rate_headers: dict[str, str]) -> Response:
    headers = dict(rate_headers)
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if fault.exception_type is not None:
        error = CmdletError(
            status=fault.status,
            code="InjectedFault",
            exception_type=fault.exception_type,
            text=fault.text or "Injected failure.",
        )
        return _error_response(error, headers=headers)
    text = fault.text or _TRANSIENT_TEXT.get(fault.status, "Error")
    return PlainTextResponse(text, status_code=fault.status, headers=headers)


def _add_control_routes(app: FastAPI, emulator: Emulator) -> None:
    @app.get("/_emulator/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "tenant_id": emulator.store.tenant_id})

    @app.get("/_emulator/state")
    async def state() -> Response:
        return JSONResponse(emulator.store.dump())

    @app.get("/_emulator/requests")
    async def requests_log() -> Response:
        return JSONResponse({"requests": emulator.requests.entries()})

    @app.delete("/_emulator/requests")
    async def clear_requests() -> Response:
        return JSONResponse({"cleared": emulator.requests.clear()})

    @app.get("/_emulator/config")
    async def get_config() -> Response:
        return JSONResponse(emulator.controls.config.as_dict())

    @app.put("/_emulator/config")
    async def put_config(request: Request) -> Response:
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("config update must be a JSON object")
            config = emulator.controls.update(changes)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        log.info("emulator config changed: %s", sorted(changes))
        return JSONResponse(config.as_dict())
