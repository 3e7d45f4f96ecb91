"""The cmdlets the emulator understands: Get-Recipient/Mailbox/MailUser/MailContact and Set-*."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from certsync_lab.emulator import errors, filters
from certsync_lab.emulator.controls import EmulatorConfig
from certsync_lab.emulator.errors import CmdletError
from certsync_lab.emulator.rules import write_refusal
from certsync_lab.emulator.state import RECIPIENT_TYPES, Recipient, StateStore


def _details_of(recipient_type: str) -> frozenset[str]:
    return frozenset(d for d, t in RECIPIENT_TYPES.items() if t == recipient_type)


MAILBOXES = _details_of("UserMailbox")
MAIL_USERS = _details_of("MailUser")
GET_CMDLETS: dict[str, frozenset[str] | None] = {
    "Get-Recipient": None,
    "Get-Mailbox": MAILBOXES,
    "Get-MailUser": MAIL_USERS,
    "Get-MailContact": frozenset({"MailContact"}),
}
# Each Set-* cmdlet finds only recipients of its own kinds (Set-Mailbox on a mail user: not found).
SET_CMDLETS = {
    "Set-Mailbox": MAILBOXES,
    "Set-MailUser": MAIL_USERS,
    "Set-MailContact": frozenset({"MailContact"}),
}
GET_PARAMETERS = frozenset({"Identity", "ResultSize", "RecipientTypeDetails", "Filter"})
WHEN_CHANGED = ("WhenChanged", "WhenChangedUTC")
CERTIFICATE_PARAMETERS = ("UserCertificate", "UserSMimeCertificate")
# Types a RecipientTypeDetails filter may name: those modelled, and groups (which hold no certificates).
KNOWN_TYPE_DETAILS = frozenset(RECIPIENT_TYPES) | {"MailUniversalDistributionGroup", "GroupMailbox"}
DEFAULT_RESULT_SIZE = 1000
MAX_PAGE_SIZE = 1000
HASHTABLE_TYPE = "#Exchange.GenericHashTable"
BYTE_ARRAY_COLLECTION = "#Collection(Exchange.ByteArrayType)"
BYTE_ARRAY_TYPE = "#Exchange.ByteArrayType"
TYPE_SUFFIX = "@odata.type"
RESULT_SIZE_WARNING = (
    "By default, only the first 1000 items are returned. Use the ResultSize parameter to specify"
    ' the number of items returned. To return all items, specify "-ResultSize Unlimited".'
)


@dataclass(frozen=True, kw_only=True)
class CmdletResult:
    value: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    skip_token: str | None = None


@dataclass(frozen=True, kw_only=True)
class PageRequest:
    page_size: int = MAX_PAGE_SIZE
    skip_token: str | None = None
    select: tuple[str, ...] | None = None


class CmdletRunner:
    def __init__(self, *, store: StateStore) -> None:
        self._store = store
        # guid -> (what reads show, until when): a write becomes visible to reads only after the lag.
        self._lagging: dict[str, tuple[Recipient, float]] = {}

    def run(
        self,
        *,
        name: str,
        parameters: Mapping[str, Any],
        page: PageRequest,
        config: EmulatorConfig | None = None,
    ) -> CmdletResult:
        config = config or EmulatorConfig()
        if name in GET_CMDLETS:
            return self._get(name=name, parameters=parameters, page=page, config=config)
        if name in SET_CMDLETS:
            return self._set(name=name, parameters=parameters, config=config)
        raise errors.command_not_found(name)

    def _visible(self, recipient: Recipient) -> Recipient:
        """The recipient as reads show it now: its state before the last write while the lag lasts."""
        lagging = self._lagging.get(recipient.guid)
        if lagging is None:
            return recipient
        if time.monotonic() >= lagging[1]:
            del self._lagging[recipient.guid]
            return recipient
        return lagging[0]

    def _shown(
        self, name: str, recipient: Recipient, page: PageRequest, config: EmulatorConfig
    ) -> dict[str, Any]:
        data = _project(self._visible(recipient), page.select)
        for key in CERTIFICATE_PARAMETERS:
            if key not in data:
                continue
            if name == "Get-Recipient" and not config.get_recipient_certificates:
                del data[key]
            else:
                data[key] = [_read_shape(value, config.read_value_shape) for value in data[key]]
        for key in WHEN_CHANGED:
            if key in data:
                value = filters.shown(
                    data[key], shape=config.when_changed_shape, offset_s=config.clock_offset_s
                )
                if value is None:
                    del data[key]
                else:
                    data[key] = value
        return data

    def _get(
        self, *, name: str, parameters: Mapping[str, Any], page: PageRequest, config: EmulatorConfig
    ) -> CmdletResult:
        _reject_unknown(parameters, GET_PARAMETERS)
        kinds = _type_filter(GET_CMDLETS[name], parameters.get("RecipientTypeDetails"))
        changed = _changed_filter(parameters, config)
        identity = parameters.get("Identity")
        if identity is not None:
            recipient = self._resolve(str(identity), kinds=kinds)
            return CmdletResult(value=[self._shown(name, recipient, page, config)])
        limit = _result_size(parameters.get("ResultSize"))
        after_seq, returned = _decode_skip(page.skip_token)
        wanted = min(page.page_size, limit - returned)
        rows = self._store.page(
            type_details=kinds,
            after_seq=after_seq,
            limit=wanted + 1,
            changed_from=None if changed is None else changed.at.isoformat(),
        )
        more = len(rows) > wanted
        rows = rows[:wanted]
        # The store compared the newest state; a write still lagging shows its older stamp.
        visible = [self._visible(recipient) for _, recipient in rows]
        if changed is not None:
            visible = [r for r in visible if changed.matches(filters.parse_stamp(r.when_changed))]
        value = [self._shown(name, recipient, page, config) for recipient in visible]
        total = returned + len(rows)
        if more and total < limit:
            return CmdletResult(value=value, skip_token=_encode_skip(rows[-1][0], total))
        warnings = [RESULT_SIZE_WARNING] if more and parameters.get("ResultSize") is None else []
        return CmdletResult(value=value, warnings=warnings)

    def _resolve(self, identity: str, *, kinds: frozenset[str] | None) -> Recipient:
        # A recipient of the wrong type is "not found" for that cmdlet, as in Exchange Online.
        matches = [
            recipient
            for recipient in self._store.resolve(identity)
            if kinds is None or recipient.recipient_type_details in kinds
        ]
        if not matches:
            raise errors.not_found(identity)
        if len(matches) > 1:
            raise errors.ambiguous(identity)
        return matches[0]

    def _set(self, *, name: str, parameters: Mapping[str, Any], config: EmulatorConfig) -> CmdletResult:
        allowed = {
            "Identity",
            *CERTIFICATE_PARAMETERS,
            *(f"{p}{TYPE_SUFFIX}" for p in CERTIFICATE_PARAMETERS),
        }
        if name == "Set-Mailbox":
            allowed.add("IsExchangeCloudManaged")
        _reject_unknown(parameters, frozenset(allowed))
        if parameters.get("Identity") in (None, ""):
            raise errors.parameter_binding("Cannot bind argument to parameter 'Identity' because it is null.")
        recipient = self._resolve(str(parameters["Identity"]), kinds=SET_CMDLETS[name])
        changes = _changes(recipient, parameters, strict=config.strict)
        for key in CERTIFICATE_PARAMETERS:
            if config.max_values is not None and len(changes.get(key, ())) > config.max_values:
                raise errors.too_many_values(key, config.max_values, len(changes[key]))
        refusal = write_refusal(recipient=recipient, cmdlet=name, attributes=changes)
        if refusal is not None:
            raise refusal
        if all(getattr(recipient, _FIELD[key]) == value for key, value in changes.items()):
            return CmdletResult(
                value=[],
                warnings=[
                    f"The command completed successfully but no settings of '{recipient.name}'"
                    " have been modified."
                ],
            )
        updated = dataclasses.replace(
            recipient.changed(**{_FIELD[key]: value for key, value in changes.items()}),
            when_changed=filters.stamp(precision_s=config.when_changed_precision_s),
        )
        self._store.save_recipients([updated])
        if config.read_lag_s > 0:
            shown = self._visible(recipient)
            self._lagging[recipient.guid] = (shown, time.monotonic() + config.read_lag_s)
        return CmdletResult(value=[])


_FIELD = {
    "UserCertificate": "user_certificate",
    "UserSMimeCertificate": "user_smime_certificate",
    "IsExchangeCloudManaged": "is_exchange_cloud_managed",
}


def _changes(recipient: Recipient, parameters: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in CERTIFICATE_PARAMETERS:
        if name in parameters:
            _check_annotation(name, parameters, strict=strict)
            current = getattr(recipient, _FIELD[name])
            changes[name] = _apply_multivalue(name, current, parameters[name], strict=strict)
    if "IsExchangeCloudManaged" in parameters:
        flag = parameters["IsExchangeCloudManaged"]
        if not isinstance(flag, bool):
            raise errors.parameter_binding(
                "Cannot process argument transformation on parameter 'IsExchangeCloudManaged'."
                f' Cannot convert value "{flag}" to type "System.Boolean".'
            )
        if flag and not recipient.is_dir_synced:
            raise errors.parameter_binding(
                "IsExchangeCloudManaged can only be set on mailboxes synchronized from on-premises."
            )
        changes["IsExchangeCloudManaged"] = flag
    return changes


def _check_annotation(name: str, parameters: Mapping[str, Any], *, strict: bool) -> None:
    """The module annotates a byte[][] collection; strict mode refuses one that comes without."""
    raw = parameters[name]
    annotation = parameters.get(f"{name}{TYPE_SUFFIX}")
    if annotation is not None and annotation != BYTE_ARRAY_COLLECTION:
        raise errors.parameter_binding(
            f"Cannot process argument transformation on parameter '{name}'. Unknown type '{annotation}'."
        )
    if strict and isinstance(raw, list) and annotation is None:
        raise errors.parameter_binding(
            f"Cannot process argument transformation on parameter '{name}'. Cannot convert the value of"
            ' type "System.Object[]" to type "System.Byte[][]": the collection carries no'
            f' "{name}{TYPE_SUFFIX}": "{BYTE_ARRAY_COLLECTION}".'
        )


def _apply_multivalue(name: str, current: tuple[str, ...], raw: Any, *, strict: bool) -> tuple[str, ...]:
    """Replace (list/null) or edit (hashtable with Add/Remove) a multi-valued byte[] property."""
    if isinstance(raw, Mapping):
        if raw.get("@odata.type") != HASHTABLE_TYPE:
            raise errors.parameter_binding(
                f"Cannot process argument transformation on parameter '{name}'. The hashtable"
                f' must carry "@odata.type": "{HASHTABLE_TYPE}".'
            )
        added = decode_byte_arrays(name, raw.get("Add"), strict=strict)
        removed = set(decode_byte_arrays(name, raw.get("Remove"), strict=strict))
        return _unique(tuple(value for value in (*current, *added) if value not in removed))
    return _unique(decode_byte_arrays(name, raw, strict=strict))


def decode_byte_arrays(name: str, raw: Any, *, strict: bool = False) -> tuple[str, ...]:
    """Byte-array parameter values, normalised to base64: Exchange.ByteArrayType objects
    ({"Data": base64} or {"Data": [int, ...]}) as the module sends them, and, unless strict,
    bare base64 strings."""
    if raw is None:
        return ()
    values = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(values, list):
        raise _not_byte_array(name, raw)
    return tuple(_byte_array(name, value, strict=strict) for value in values)


def _byte_array(name: str, value: Any, *, strict: bool) -> str:
    if isinstance(value, dict) and value.get("@odata.type", BYTE_ARRAY_TYPE) == BYTE_ARRAY_TYPE:
        data = value.get("Data")
        if isinstance(data, list) and data and all(isinstance(b, int) and 0 <= b <= 255 for b in data):
            return base64.b64encode(bytes(data)).decode()
        if isinstance(data, str) and data:
            return _base64(name, data)
        raise _not_byte_array(name, value)
    if isinstance(value, str) and value and not strict:
        return _base64(name, value)
    raise _not_byte_array(name, value)


def _base64(name: str, text: str) -> str:
    try:
        return base64.b64encode(base64.b64decode(text, validate=True)).decode()
    except (binascii.Error, ValueError):
        raise _not_byte_array(name, text) from None


def _read_shape(value: str, shape: str) -> Any:
    """One stored (base64) value in the configured read shape."""
    if shape == "data_base64":
        return {"Data": value}
    if shape == "data_ints":
        return {"Data": list(base64.b64decode(value))}
    if shape == "type_name":
        return "System.Byte[]"
    return value


def _not_byte_array(name: str, value: Any) -> CmdletError:
    shown = str(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return errors.parameter_binding(
        f"Cannot process argument transformation on parameter '{name}'. Cannot convert value"
        f' "{shown}" to type "System.Byte[]".'
    )


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _reject_unknown(parameters: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in parameters:
        if key not in allowed:
            raise errors.parameter_binding(
                f"A parameter cannot be found that matches parameter name '{key}'."
            )


def _changed_filter(parameters: Mapping[str, Any], config: EmulatorConfig) -> filters.ChangedSince | None:
    """The -Filter a Get-* was given, as the configured service treats it (see FILTER_MODES)."""
    if "Filter" not in parameters:
        return None
    if config.filter_mode == "refused":
        raise errors.parameter_binding("A parameter cannot be found that matches parameter name 'Filter'.")
    changed = filters.parse(parameters["Filter"])
    if config.filter_mode != "honoured":
        return None
    return filters.stored_bound(changed, offset_s=config.clock_offset_s)


def _type_filter(base: frozenset[str] | None, raw: Any) -> frozenset[str] | None:
    if raw is None:
        return base
    requested = [raw] if isinstance(raw, str) else raw
    if not isinstance(requested, list) or not all(isinstance(kind, str) for kind in requested):
        raise errors.parameter_binding("Cannot bind parameter 'RecipientTypeDetails'.")
    unknown = [kind for kind in requested if kind not in KNOWN_TYPE_DETAILS]
    if unknown:
        raise errors.parameter_binding(
            f"Cannot bind parameter 'RecipientTypeDetails'. Cannot convert value \"{unknown[0]}\""
            ' to type "Microsoft.Exchange.Data.Directory.Recipient.RecipientTypeDetails".'
        )
    chosen = frozenset(requested)
    return chosen if base is None else base & chosen


def _result_size(raw: Any) -> int:
    if raw is None:
        return DEFAULT_RESULT_SIZE
    if isinstance(raw, str) and raw.lower() == "unlimited":
        return 2**62
    try:
        size = int(raw)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(raw, bool):
        raise errors.parameter_binding(
            f"Cannot bind parameter 'ResultSize'. Cannot convert value \"{raw}\" to type"
            ' "Microsoft.Exchange.Data.Unlimited`1[System.UInt32]".'
        )
    return size


def _project(recipient: Recipient, select: tuple[str, ...] | None) -> dict[str, Any]:
    data = recipient.as_exchange()
    if select is None:
        return data
    wanted = {name.lower() for name in select}
    return {key: value for key, value in data.items() if key.lower() in wanted}


def _encode_skip(after_seq: int, returned: int) -> str:
    raw = json.dumps({"a": after_seq, "n": returned}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_skip(token: str | None) -> tuple[int, int]:
    if not token:
        return 0, 0
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        return int(data["a"]), int(data["n"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.parameter_binding("The skip token is not valid.") from None
