"""Reading only the recipients Exchange Online changed since an earlier read.

Microsoft documents WhenChanged and WhenChangedUTC as filterable properties of the recipient
cmdlets' -Filter (OPATH). Nothing here was tried on a live tenant, so the read copes with each
plausible answer: the filter honoured; refused with a ParameterBindingException (HTTP 400), when
the read falls back to a full one and says so; or accepted but not applied, when more comes back
than asked for (harmless: the merge takes it all). The bound comes from Exchange's own WhenChanged
values, never from this host's clock, and the caller moves it back by an overlap that covers the
minutes a write can stay invisible to reads.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from certsync.exchange.client import READ_CMDLETS, RECIPIENT_FIELDS, ExchangeClient
from certsync.exchange.errors import ExchangeError
from certsync.exchange.recipients import Recipient

log = logging.getLogger(__name__)

WHEN_CHANGED_FIELDS = ("WhenChangedUTC", "WhenChanged")
# ASP.NET's JSON date: /Date(milliseconds since 1970 UTC[+-hhmm])/; the offset is only a display hint.
_DOTNET_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
# A refused filter is a bad parameter: the cmdlet never ran, so a full read is the safe answer.
NOT_FOUND_CODES = ("ManagementObjectNotFoundException", "HTTP404")
FILTER_REFUSALS = ("ParameterBindingException", "InvalidFilter", "FilterParsing", "BadRequest")


@dataclass(frozen=True, kw_only=True)
class ReadPlan:
    """What a read of recipients is asked to do: full, or changed since `since` (a delta)."""

    mode: str
    why: str
    since: datetime | None = None
    # Recipients a write found missing since the base snapshot: a delta looks each up again.
    recheck: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RecipientRead:
    """What one read returned: the recipients, how it was made, and the newest WhenChanged seen
    (None when any recipient came without a readable one: then the next read must be full)."""

    recipients: list[Recipient]
    mode: str
    why: str
    since: datetime | None
    newest: datetime | None
    unstamped: int
    older: int = 0  # recipients a delta returned that changed before its bound (filter not applied)
    gone: frozenset[str] = frozenset()  # looked up again (ReadPlan.recheck) and not found


def when_changed(obj: dict) -> datetime | None:
    """The UTC moment a Get-* says the object last changed, or None when absent or unreadable.
    WhenChangedUTC first; WhenChanged only when it carries its offset (otherwise its time zone is
    the server's, unknown here)."""
    for name in WHEN_CHANGED_FIELDS:
        moment = _parse(obj.get(name), assume_utc=name == "WhenChangedUTC")
        if moment is not None:
            return moment
    return None


def _parse(raw: object, *, assume_utc: bool) -> datetime | None:
    if not isinstance(raw, str) or not raw:
        return None
    dotnet = _DOTNET_DATE.match(raw.strip())
    if dotnet:
        return datetime.fromtimestamp(int(dotnet[1]) / 1000, UTC)
    try:
        moment = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC) if assume_utc else None
    return moment.astimezone(UTC)


def read(client: ExchangeClient, plan: ReadPlan) -> RecipientRead:
    """Read the recipients `plan` asks for; a delta whose filter Exchange refuses becomes a full read."""
    if plan.mode == "delta" and plan.since is not None:
        try:
            return _recheck(client, _collect(client, plan), plan.recheck)
        except ExchangeError as exc:
            if exc.status != 400 and exc.code not in FILTER_REFUSALS:
                raise
            log.warning(
                "Exchange Online refused the changed-since filter (%s, HTTP %s): reading every recipient"
                " instead, as a full read; later delta runs try the filter again",
                exc.code,
                exc.status,
            )
            why = f"filter refused ({exc.code}): full read"
            return _collect(client, ReadPlan(mode="full", why=why))
    return _collect(client, ReadPlan(mode="full", why=plan.why))


def _recheck(client: ExchangeClient, read: RecipientRead, identities: tuple[str, ...]) -> RecipientRead:
    """Look up again each recipient a write was told does not exist: a delta read never sees a
    deletion, so without this the merged snapshot would keep offering it to the plan (and each run
    fail on it) until the next full read. Found again (e.g. now of another type): its fresh state."""
    found = {r.recipient_id for r in read.recipients}
    fresh: list[Recipient] = []
    gone: set[str] = set()
    for identity in (i for i in identities if i not in found):
        obj = _lookup(client, identity)
        if obj is None:
            gone.add(identity)
        else:
            fresh.append(Recipient.from_exchange(obj))
    if gone:
        log.info("%d recipients a write found missing are gone from Exchange Online too", len(gone))
    return dataclasses.replace(read, recipients=read.recipients + fresh, gone=frozenset(gone))


def _lookup(client: ExchangeClient, identity: str) -> dict | None:
    for cmdlet in READ_CMDLETS:  # each Get-* finds only its own kinds of recipient
        try:
            value = list(client.read(cmdlet, {"Identity": identity}, select=RECIPIENT_FIELDS))
        except ExchangeError as exc:
            if exc.status == 404 or exc.code in NOT_FOUND_CODES:
                continue
            raise
        if value:
            return value[0]
    return None


def _collect(client: ExchangeClient, plan: ReadPlan) -> RecipientRead:
    found: list[Recipient] = []
    newest: datetime | None = None
    unstamped = older = 0
    for obj in client.recipients(changed_since=plan.since if plan.mode == "delta" else None):
        found.append(Recipient.from_exchange(obj))
        moment = when_changed(obj)
        if moment is None:
            unstamped += 1
            continue
        newest = moment if newest is None or moment > newest else newest
        if plan.since is not None and moment < plan.since - timedelta(seconds=1):
            older += 1
    if older:
        log.warning(
            "Exchange Online returned %d recipients changed before the filter's bound: it accepted the"
            " filter without applying it, so this delta read cost as much as a full one",
            older,
        )
    if unstamped:
        log.warning(
            "%d recipients came without a readable WhenChanged: the next read of Exchange Online is a"
            " full one (run `certsync probe` to see what this tenant returns)",
            unstamped,
        )
    return RecipientRead(
        recipients=found, mode=plan.mode, why=plan.why, since=plan.since, newest=newest,
        unstamped=unstamped, older=older,
    )  # fmt: skip
