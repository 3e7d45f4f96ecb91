"""Error bodies shaped like the ones Exchange Online and Entra ID return."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

NOT_FOUND = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException"
AMBIGUOUS = "Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException"
PARAMETER_BINDING = "System.Management.Automation.ParameterBindingException"
COMMAND_NOT_FOUND = "System.Management.Automation.CommandNotFoundException"
WRITE_SCOPE = "System.InvalidOperationException"
THROTTLED = "Microsoft.Exchange.Admin.OData.Core.ThrottlingException"
SERVER_ERROR = "Microsoft.Exchange.Admin.OData.Core.ODataServiceException"
DATA_VALIDATION = "Microsoft.Exchange.Data.DataValidationException"

_ERROR_IDS = {
    NOT_FOUND: "Ex6F9304",
    AMBIGUOUS: "Ex0A4E9D",
    PARAMETER_BINDING: "ExB9E0C1",
    COMMAND_NOT_FOUND: "Ex3C7A52",
    WRITE_SCOPE: "Ex9A0B3F",
    THROTTLED: "Ex1D40E8",
    SERVER_ERROR: "Ex5E6B70",
}


@dataclass(eq=False, kw_only=True)
class CmdletError(Exception):
    """A cmdlet failure, answered with the InvokeCommand error body."""

    status: int
    code: str
    exception_type: str
    text: str

    def body(self) -> dict[str, Any]:
        """The error body as the service writes it: a generic message, the reason in
        details[0].message as "Ex…|Full.Exception.Type|text"."""
        return {"error": self.error_object()}

    def error_object(self) -> dict[str, Any]:
        detail = self.detail()
        return {
            "code": self.code,
            "message": "Error executing cmdlet",
            "details": [{"code": "Client", "target": "", "message": detail}],
            "innererror": {
                "message": detail,
                "type": SERVER_ERROR,
                "internalexception": {"message": self.text, "type": self.exception_type},
            },
        }

    def detail(self) -> str:
        return f"{_ERROR_IDS.get(self.exception_type, 'Ex000000')}|{self.exception_type}|{self.text}"

    def headers(self) -> dict[str, str]:
        return {
            "x-ExceptionType": self.exception_type.rsplit(".", 1)[-1],
            "x-ExceptionTargetType": "Recipient",
        }


def not_found(identity: str) -> CmdletError:
    return CmdletError(
        status=404,
        code="NotFound",
        exception_type=NOT_FOUND,
        text=f"The operation couldn't be performed because object '{identity}' couldn't be found"
        " on 'EMULATOR01.PROD.OUTLOOK.COM'.",
    )


def ambiguous(identity: str) -> CmdletError:
    return CmdletError(
        status=400,
        code="BadRequest",
        exception_type=AMBIGUOUS,
        text=f"The operation couldn't be performed because '{identity}' matches multiple entries.",
    )


def parameter_binding(text: str) -> CmdletError:
    return CmdletError(status=400, code="BadRequest", exception_type=PARAMETER_BINDING, text=text)


def command_not_found(name: str) -> CmdletError:
    return CmdletError(
        status=400,
        code="BadRequest",
        exception_type=COMMAND_NOT_FOUND,
        text=f"The term '{name}' is not recognized as a name of a cmdlet available on this endpoint.",
    )


def write_scope(*, cmdlet: str, attribute: str, name: str, kind: str) -> CmdletError:
    return CmdletError(
        status=400,
        code="BadRequest",
        exception_type=WRITE_SCOPE,
        text=f"The operation on {kind} \"{name}\" failed because it's out of the current user's"
        f" write scope. The action '{cmdlet}', '{attribute}', can't be performed on the object"
        f" '{name}' because the object is being synchronized from your on-premises"
        " organization. This action should be performed on the object in your on-premises"
        " organization.",
    )


def aadsts(*, status: int, error: str, code: int, description: str) -> tuple[int, dict[str, Any]]:
    """An Entra ID (AADSTS) token-endpoint error: status and body."""
    trace_id = str(uuid.uuid4())
    correlation_id = str(uuid.uuid4())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {description} Trace ID: {trace_id}"
        f" Correlation ID: {correlation_id} Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


def too_many_values(name: str, cap: int, count: int) -> CmdletError:
    return CmdletError(
        status=400,
        code="BadRequest",
        exception_type=DATA_VALIDATION,
        text=f"The length of the property is too long. The maximum length is {cap} and the length of the"
        f" value provided is {count}. Property: {name}",
    )
