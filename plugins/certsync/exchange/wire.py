"""Request shapes of InvokeCommand, as the ExchangeOnlineManagement module sends them: the one place
that knows how a parameter, a body and the headers of a cmdlet call are written.

Evidence (the module's generated script, CIPP, ExoHelper; see the project notes): a byte[][] parameter
travels as ``"<Name>@odata.type": "#Collection(Exchange.ByteArrayType)"`` with ``[{"Data": ...}]``,
hashtables carry ``"@odata.type": "#Exchange.GenericHashTable"``, and one client-request-id names a
cmdlet call across all its retries. How ``Data`` is written (base64 text or an array of integers) is
not settled by the evidence: it is a setting, and ``certsync probe`` finds which one a tenant takes.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

BYTE_ARRAY_COLLECTION = "#Collection(Exchange.ByteArrayType)"
BYTE_ARRAY = "#Exchange.ByteArrayType"
HASHTABLE = "#Exchange.GenericHashTable"
# The system mailbox Exchange routes app-only admin calls to (CIPP, ExoHelper).
ANCHOR_MAILBOX = "APP:SystemMailbox{bb558c35-97f1-4cb9-8ff7-d53741dc928c}@%s"
CLIENT_APPLICATION = "ExoManagementModule"
CLIENT_MODULE_VERSION = "3.7.0"
BYTE_ENCODINGS = ("base64", "integers")


def byte_data(value: bytes, *, encoding: str = "base64") -> str | list[int]:
    """The ``Data`` of one Exchange.ByteArrayType object."""
    if encoding == "integers":
        return list(value)
    if encoding != "base64":
        raise ValueError(f"byte encoding must be one of {BYTE_ENCODINGS}, not {encoding!r}")
    return base64.b64encode(value).decode("ascii")


def byte_array_collection(name: str, values: Sequence[bytes], *, encoding: str = "base64") -> dict[str, Any]:
    """A byte[][] parameter: its type annotation and one {"Data": ...} object per value. An empty list
    clears the attribute (the module sends the same for ``-UserCertificate @()``)."""
    return {
        f"{name}@odata.type": BYTE_ARRAY_COLLECTION,
        name: [{"Data": byte_data(value, encoding=encoding)} for value in values],
    }


def hashtable(entries: Mapping[str, Any]) -> dict[str, Any]:
    """A hashtable parameter such as ``@{Add=...; Remove=...}``."""
    return {"@odata.type": HASHTABLE, **entries}


def body(cmdlet: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    return {"CmdletInput": {"CmdletName": cmdlet, "Parameters": dict(parameters)}}


def select_query(select: Sequence[str]) -> str:
    return f"?$select={','.join(select)}" if select else ""


def headers(
    *,
    token: str,
    cmdlet: str,
    request_id: uuid.UUID,
    connection_id: str,
    tenant_id: str,
    page_size: int,
) -> dict[str, str]:
    """The module's headers for one request. No ``X-ResponseFormat: clixml``: without it the answer is
    plain JSON (CIPP relies on that). The anchor names the tenant, so any front end can route the call."""
    return {
        "Authorization": f"Bearer {token}",
        "X-CmdletName": cmdlet,
        "client-request-id": str(request_id),
        "connection-id": connection_id,
        "Prefer": f"odata.maxpagesize={page_size}",
        "X-AnchorMailbox": ANCHOR_MAILBOX % tenant_id,
        "X-ClientApplication": CLIENT_APPLICATION,
        "X-ClientModuleVersion": CLIENT_MODULE_VERSION,
        "X-SerializationLevel": "Partial",
        "Accept": "application/json",
        "Accept-Encoding": "gzip",
    }


def certificate_parameters(
    *,
    identity: str,
    user_certificate: Sequence[bytes],
    user_smime_certificate: Sequence[bytes],
    encoding: str = "base64",
) -> dict[str, Any]:
    """The parameters of a Set-* that replaces both certificate attributes of one recipient."""
    return {
        "Identity": identity,
        **byte_array_collection("UserCertificate", user_certificate, encoding=encoding),
        **byte_array_collection("UserSMimeCertificate", user_smime_certificate, encoding=encoding),
    }


def changed_filter(since: datetime) -> str:
    """-Filter (OPATH) for recipients changed at or after `since`, in UTC to the second (down):
    WhenChangedUTC is documented as filterable, and ISO 8601 reads the same in every culture."""
    bound = since.astimezone(UTC).replace(microsecond=0, tzinfo=None)
    return f"WhenChangedUTC -ge '{bound.isoformat()}'"
