"""Desired state per recipient (valid certificates only, at most 15, newest first) against what
the recipient holds in Exchange Online -> the actions to take. Pure logic: the store feeds it, the
store saves it.

The plan is state-based: whatever failed to publish last time is simply still different next time,
and values that got there any other way (directory sync before the switch to cloud-managed Exchange
attributes, an admin, drift) are corrected too.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from certsync.certificates.parse import ATTRIBUTES
from certsync.certificates.reasons import Reason
from certsync.certificates.select import select_values
from certsync.certificates.verdict import Verdict, own_addresses
from certsync.exchange.recipients import Recipient

# A valid certificate of a user without any mail address has nowhere to go in Exchange Online.
USER_HAS_NO_MAIL = "user_has_no_mail"
NO_MAIL_SENTENCE = "The user has no mail or SMTP proxy address, so no recipient can carry the certificate."
# A disabled account is usually someone who left: mail encrypted to them would never be read.
ACCOUNT_DISABLED = "account_disabled"
DISABLED_SENTENCE = "The user's account is disabled (userAccountControl 0x2); its certificates are withdrawn."
# Mailboxes whose accounts are disabled by design: Exchange's RecipientTypeDetails names, and the
# msExchRecipientTypeDetails bits (shared 4, room 16, equipment 32, and their Remote* forms).
SHARED_RECIPIENT_TYPES = frozenset({"SharedMailbox", "RoomMailbox", "EquipmentMailbox"})
SHARED_TYPE_BITS = 4 | 16 | 32 | 8589934592 | 17179869184 | 34359738368


class SourceUser(NamedTuple):
    """A user of the source view as the plan reads it. It, ValueResult and Action are NamedTuples,
    not frozen dataclasses, which took twice as long to make: a plan makes one per user and per
    value."""

    object_guid: uuid.UUID
    mail: str | None
    addresses: tuple[str, ...]  # lower-case SMTP addresses: mail and smtp: proxyAddresses
    verdicts: tuple[Verdict, ...]
    disabled: bool = False  # userAccountControl ACCOUNTDISABLE
    recipient_type_details: int | None = None  # msExchRecipientTypeDetails, where AD has Exchange's schema


class UserAddresses(NamedTuple):
    """A user's addresses only: what matching it to a recipient needs (a delta plan reads every
    user's, without their verdicts)."""

    object_guid: uuid.UUID
    mail: str | None
    addresses: tuple[str, ...]


class RecipientAddress(NamedTuple):
    """A recipient's identity and primary address only: what finding claims needs (a delta plan
    reads every recipient's, and the values of only those it plans)."""

    recipient_id: str
    primary_smtp: str


class _Addressed(Protocol):
    @property
    def recipient_id(self) -> str: ...
    @property
    def primary_smtp(self) -> str: ...


R = TypeVar("R", bound=_Addressed)


@dataclass(frozen=True, kw_only=True)
class DeltaScope:
    """What a delta plan plans again (see delta_users)."""

    users: set[uuid.UUID]  # the users to plan again
    claimed_elsewhere: set[str]  # recipients that the users left out claim
    recipients: set[str]  # the recipients build_plan must be given: those it can match or clear


@dataclass(frozen=True, kw_only=True)
class AccountPolicy:
    """What is published for accounts that are disabled or left the scope (certsync_config's
    disabled_accounts and left_scope: withdraw, the default, or keep)."""

    disabled_accounts: str = "withdraw"
    left_scope: str = "withdraw"

    def withdraws(self, user: SourceUser, recipient: Recipient | None) -> bool:
        """Whether a disabled user's certificates are withdrawn: not for shared, room or equipment
        mailboxes, whose accounts are disabled by design (told by AD or by Exchange)."""
        if not user.disabled or self.disabled_accounts == "keep":
            return False
        if (user.recipient_type_details or 0) & SHARED_TYPE_BITS:
            return False
        return recipient is None or recipient.recipient_type not in SHARED_RECIPIENT_TYPES


class ValueResult(NamedTuple):
    object_guid: uuid.UUID
    attribute: str
    sha256: bytes
    reason: str | None  # None: selected for publishing
    rule: str | None
    detail: str


class Action(NamedTuple):
    object_guid: uuid.UUID
    kind: str  # add | replace | remove | conflict | no_recipient
    recipient: Recipient | None
    user_certificate: tuple[bytes, ...] = ()
    user_smime_certificate: tuple[bytes, ...] = ()
    reason: str | None = None


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    results: list[ValueResult] = field(default_factory=list)
    contested: set[str] = field(default_factory=set)  # recipients more than one user matched
    stored_results: int = 0  # how many of `results` the database holds already (users_to_plan)

    def removals(self) -> int:
        return sum(1 for a in self.actions if a.kind == "remove")


def desired_values(
    user: SourceUser, *, limit: int = 15, withdrawn: bool = False
) -> tuple[dict[str, tuple[bytes, ...]], list[ValueResult]]:
    """The values to publish per attribute, and a result (selected or why not) for every value.
    `withdrawn`: the account policy withdraws this user's certificates (a disabled account)."""
    desired: dict[str, tuple[bytes, ...]] = dict.fromkeys(ATTRIBUTES, ())
    results: list[ValueResult] = []
    if not user.verdicts:  # a quarter of the lab's users, once the store keeps refused values back
        return desired, results
    by_attribute: dict[str, list[Verdict]] = {}
    for verdict in user.verdicts:
        by_attribute.setdefault(verdict.attribute, []).append(verdict)
    mine = own_addresses(user.addresses)  # once for all the user's values
    for attribute in ATTRIBUTES:
        candidates: list[Verdict] = []
        for verdict in by_attribute.get(attribute, ()):
            if not verdict.ok:
                results.append(_result(user, verdict, verdict.reason, verdict.rule, verdict.detail))
            elif withdrawn:
                results.append(_result(user, verdict, ACCOUNT_DISABLED, "account_state", DISABLED_SENTENCE))
            elif not user.addresses:
                results.append(_result(user, verdict, USER_HAS_NO_MAIL, "email_match", NO_MAIL_SENTENCE))
            elif mine.isdisjoint(verdict.emails):  # email_mismatch, with the addresses read once
                reason = Reason.EMAIL_MISMATCH
                results.append(_result(user, verdict, reason.value, "email_match", reason.sentence))
            else:
                candidates.append(verdict)
        if not candidates:
            continue
        selection = select_values(candidates, limit=limit)
        desired[attribute] = tuple(v.sha256 for v in selection.kept)
        results.extend(_result(user, v, None, None, "selected") for v in selection.kept)
        results.extend(_result(user, v, r.value, "selection", r.sentence) for v, r in selection.dropped)
    return desired, results


def _result(user: SourceUser, v: Verdict, reason: str | None, rule: str | None, detail: str) -> ValueResult:
    return ValueResult(
        object_guid=user.object_guid,
        attribute=v.attribute,
        sha256=v.sha256,
        reason=reason,
        rule=rule,
        detail=detail,
    )


def match_recipient(user: SourceUser | UserAddresses, by_smtp: Mapping[str, R]) -> R | None:
    """The recipient whose primary SMTP address is the user's mail, else one of its proxy addresses."""
    if user.mail and (found := by_smtp.get(user.mail.lower())):
        return found
    return next((by_smtp[a] for a in user.addresses if a in by_smtp), None)


def _kind(desired: dict[str, tuple[bytes, ...]], recipient: Recipient) -> str | None:
    before = (recipient.user_certificate, recipient.user_smime_certificate)
    after = (desired["userCertificate"], desired["userSMIMECertificate"])
    if after == before:
        return None
    if not any(before):
        return "add"
    return "remove" if not any(after) else "replace"


def plan_user(
    user: SourceUser,
    recipient: Recipient | None,
    *,
    unserved: str = "recipient_not_found",
    limit: int = 15,
    policy: AccountPolicy | None = None,
) -> tuple[Action | None, list[ValueResult]]:
    """The action for one user (None when its recipient already holds the right values) and a
    result for each of its values. `unserved` says why a user without recipient has none."""
    withdrawn = (policy or AccountPolicy()).withdraws(user, recipient)
    desired, results = desired_values(user, limit=limit, withdrawn=withdrawn)
    action = functools.partial(
        Action,
        object_guid=user.object_guid,
        recipient=recipient,
        user_certificate=desired["userCertificate"],
        user_smime_certificate=desired["userSMIMECertificate"],
    )
    if recipient is None:
        return (action(kind="no_recipient", reason=unserved) if any(desired.values()) else None), results
    kind = _kind(desired, recipient)
    if kind is None:
        return None, results
    if recipient.cmdlet is None:
        return action(kind="no_recipient", reason="unsupported_recipient_type"), results
    if not recipient.writable:
        return action(kind="conflict", reason="managed_by_directory_sync"), results
    return action(kind=kind), results


def build_plan(
    users: Iterable[SourceUser],
    *,
    recipients: Sequence[Recipient],
    published: Mapping[str, uuid.UUID],
    limit: int = 15,
    policy: AccountPolicy | None = None,
    gone: Mapping[uuid.UUID, str] | None = None,
    claimed_elsewhere: Iterable[str] = (),
    into: Plan | None = None,
) -> Plan:
    """Plan every user, then clear the recipients certsync published to that no user claims any more
    (a user left the scope, was deleted or lost its mail address). `gone` says why users left the
    source view ('deleted' or 'left_scope'); with left_scope=keep the latter keep what they have.
    `claimed_elsewhere`: recipients claimed by users this plan leaves out (a delta plan). `into`:
    the Plan to fill (a new one by default); its results grow user by user, each user's before
    the next is taken from `users`."""
    policy = policy or AccountPolicy()
    by_smtp = {r.primary_smtp.lower(): r for r in recipients}
    plan = Plan() if into is None else into
    claimed: set[str] = set(claimed_elsewhere)
    for user in users:
        recipient, unserved = match_recipient(user, by_smtp), "recipient_not_found"
        if recipient is not None and recipient.recipient_id in claimed:
            # Two users, one recipient: the first claim wins, the second is reported.
            recipient, unserved = None, "recipient_claimed_by_another_user"
            plan.contested.add(match_recipient(user, by_smtp).recipient_id)  # type: ignore[union-attr]
        if recipient is not None:
            claimed.add(recipient.recipient_id)
        action, results = plan_user(user, recipient, unserved=unserved, limit=limit, policy=policy)
        plan.results.extend(results)
        if action is not None:
            plan.actions.append(action)
    by_id = {r.recipient_id: r for r in recipients}
    plan.actions.extend(_orphan_removals(published, claimed, by_id, gone=gone or {}, policy=policy))
    return plan


def _orphan_removals(
    published: Mapping[str, uuid.UUID],
    claimed: set[str],
    by_id: Mapping[str, Recipient],
    *,
    gone: Mapping[uuid.UUID, str],
    policy: AccountPolicy,
) -> Iterator[Action]:
    for recipient_id, object_guid in published.items():
        recipient = by_id.get(recipient_id)
        if recipient_id in claimed or recipient is None:
            continue
        if not any((recipient.user_certificate, recipient.user_smime_certificate)):
            continue
        why = gone.get(object_guid)
        if why == "left_scope" and policy.left_scope == "keep":
            continue
        reason = "user_deleted" if why == "deleted" else "user_left_scope"
        kind = "remove" if recipient.writable else "conflict"
        yield Action(object_guid=object_guid, kind=kind, recipient=recipient, reason=reason)


def delta_users(
    users: Iterable[UserAddresses | SourceUser],
    *,
    recipients: Sequence[_Addressed],
    published: Mapping[str, uuid.UUID],
    changed_users: set[uuid.UUID],
    changed_recipients: set[str],
    old_addresses: set[str],
) -> DeltaScope:
    """For a plan of only what changed since an earlier plan: the users to plan again, the
    recipients that the users left out claim, and the recipients the plan needs. `users` are all
    users in build_plan's order; `changed_*` what changed since the earlier plan (directory entries,
    verdicts and its unfinished actions; recipients that changed, appeared or went, and its
    unfinished actions' recipients, and those more than one user matched then); `old_addresses`
    the former addresses of recipients that changed or went.

    A user left out has the same entry, verdicts and recipient as in the earlier plan; its claim
    must be the same too. So every user of a recipient that changed, that a changed user matches,
    that more than one user matches (the first claim wins), or whose published owner is not its
    claimant, is planned again, and so is every user holding an address a recipient gave up. The
    plan needs the recipients its users match and those published to that no user left out
    claims (it may clear them): a user matches the same recipient among those as among all."""
    by_smtp = {r.primary_smtp.lower(): r for r in recipients}
    matchers: dict[str, list[uuid.UUID]] = {}
    planned = set(changed_users)
    for user in users:
        recipient = match_recipient(user, by_smtp)
        if recipient is not None:
            matchers.setdefault(recipient.recipient_id, []).append(user.object_guid)
        if old_addresses and not old_addresses.isdisjoint(user.addresses):
            planned.add(user.object_guid)
    dirty_recipients = set(changed_recipients)
    for recipient_id, guids in matchers.items():
        owner = published.get(recipient_id, guids[0])
        if len(guids) > 1 or owner != guids[0] or not changed_users.isdisjoint(guids):
            dirty_recipients.add(recipient_id)
    for recipient_id in dirty_recipients:
        planned.update(matchers.get(recipient_id, ()))
    elsewhere = {recipient_id for recipient_id, guids in matchers.items() if guids[0] not in planned}
    matched = {recipient_id for recipient_id, guids in matchers.items() if not planned.isdisjoint(guids)}
    return DeltaScope(
        users=planned, claimed_elsewhere=elsewhere, recipients=matched | (published.keys() - elsewhere)
    )
