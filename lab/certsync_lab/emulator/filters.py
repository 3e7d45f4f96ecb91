"""-Filter on the Get-* cmdlets: the OPATH comparisons of WhenChanged/WhenChangedUTC with a date.

Microsoft documents WhenChanged and WhenChangedUTC as filterable properties of the recipient
cmdlets; the syntax is `Property -op 'value'`, optionally in parentheses. Only these comparisons
are modelled; any other filter is refused as Exchange refuses a filter it cannot parse (a
ParameterBindingException), so a client that sends something else finds out here.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from certsync_lab.emulator import errors
from certsync_lab.emulator.errors import CmdletError

_COMPARISON = re.compile(
    r"^\s*\(?\s*(?P<prop>WhenChangedUTC|WhenChanged)\s+-(?P<op>ge|gt)\s+"
    r"(?P<q>['\"])(?P<value>[^'\"]+)(?P=q)\s*\)?\s*$",
    re.IGNORECASE,
)
# Date texts a PowerShell cast to DateTime accepts in any culture (ISO 8601) and the invariant
# culture's month/day/year form.
_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %I:%M:%S %p")


@dataclass(frozen=True, kw_only=True)
class ChangedSince:
    """Recipients whose WhenChanged is at or after (or strictly after) a moment in UTC."""

    at: dt.datetime
    strict: bool

    def matches(self, when_changed: dt.datetime) -> bool:
        return when_changed > self.at if self.strict else when_changed >= self.at


def parse(raw: object) -> ChangedSince:
    """The filter a Get-* was given, or the refusal Exchange answers to a filter it cannot parse."""
    match = _COMPARISON.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _invalid(raw)
    at = _parse_date(match["value"])
    if at is None:
        raise _invalid(raw)
    return ChangedSince(at=at, strict=match["op"].lower() == "gt")


def _parse_date(text: str) -> dt.datetime | None:
    # WhenChanged and WhenChangedUTC both compare in UTC here: the service's servers run in UTC.
    cleaned = text.strip().removesuffix("Z").removesuffix("z")
    for fmt in _FORMATS:
        try:
            return dt.datetime.strptime(cleaned, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    return None


def _invalid(raw: object) -> CmdletError:
    return errors.parameter_binding(
        f'Cannot bind parameter \'Filter\' to the target. Exception setting "Filter": "Invalid filter'
        f' syntax. For a description of the filter parameter syntax see the command help."{raw}""'
    )


def stamp(*, precision_s: int) -> str:
    """WhenChanged (stored by this host's clock) for a write happening now, at the service's precision."""
    seconds = int(dt.datetime.now(dt.UTC).timestamp()) // precision_s * precision_s
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()


def parse_stamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def shown(text: str, *, shape: str, offset_s: float) -> str | None:
    """A stored WhenChanged (ISO with +00:00) as the service shows it: by its clock, `offset_s` off
    this host's (every stamp alike, as one skewed clock would), in the configured shape; None: left out."""
    if shape == "absent":
        return None
    moment = parse_stamp(text) + dt.timedelta(seconds=offset_s)
    if shape == "date_ms":
        return f"/Date({int(moment.timestamp() * 1000)})/"
    iso = moment.isoformat()
    return iso.replace("+00:00", "Z") if shape == "iso_z" else iso


def stored_bound(changed: ChangedSince, *, offset_s: float) -> ChangedSince:
    """A filter's bound, given by the service's clock, on the stored (host clock) stamps."""
    return ChangedSince(at=changed.at - dt.timedelta(seconds=offset_s), strict=changed.strict)
