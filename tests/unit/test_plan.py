"""The plan: desired values (valid, e-mail matched, at most 15, newest first) against what each
recipient holds, with conflicts and unknown recipients reported instead of written."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

from certsync.certificates.verdict import Verdict
from certsync.exchange.recipients import Recipient
from certsync.plan import SourceUser, build_plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _verdict(
    n: int, *, ok: bool = True, email: str = "a@x.test", attribute: str = "userCertificate"
) -> Verdict:
    return Verdict(
        sha256=hashlib.sha256(str(n).encode()).digest(),
        attribute=attribute,
        ok=ok,
        reason=None if ok else "expired",
        rule=None if ok else "enterprise.validity",
        detail="",
        not_before=T0 + timedelta(days=n),
        not_after=T0 + timedelta(days=n + 365),
        emails=(email,),
    )


def _user(*verdicts: Verdict, mail: str | None = "a@x.test", guid: int = 1) -> SourceUser:
    return SourceUser(
        object_guid=uuid.UUID(int=guid), mail=mail, addresses=(mail,) if mail else (), verdicts=verdicts
    )


def _recipient(
    *held: Verdict, smtp: str = "a@x.test", synced: bool = False, cloud: bool = False
) -> Recipient:
    return Recipient(
        recipient_id=f"id-{smtp}",
        primary_smtp=smtp,
        recipient_type="UserMailbox",
        is_dir_synced=synced,
        is_cloud_managed=cloud,
        user_certificate=tuple(v.sha256 for v in held),
    )


def test_only_valid_matching_values_newest_first() -> None:
    old, new, expired, foreign = (
        _verdict(1),
        _verdict(5),
        _verdict(9, ok=False),
        _verdict(7, email="b@x.test"),
    )
    plan = build_plan([_user(old, expired, new, foreign)], recipients=[_recipient()], published={})
    (action,) = plan.actions
    assert action.kind == "add"
    assert action.user_certificate == (new.sha256, old.sha256)
    reasons = {r.sha256: r.reason for r in plan.results}
    assert reasons == {
        old.sha256: None,
        new.sha256: None,
        expired.sha256: "expired",
        foreign.sha256: "email_mismatch",
    }


def test_never_more_than_fifteen_values() -> None:
    many = [_verdict(n) for n in range(20)]
    plan = build_plan([_user(*many)], recipients=[_recipient()], published={})
    (action,) = plan.actions
    assert action.user_certificate == tuple(v.sha256 for v in reversed(many[5:]))
    assert sum(r.reason == "over_limit" for r in plan.results) == 5


def test_no_action_when_the_recipient_already_holds_the_desired_values() -> None:
    a, b = _verdict(1), _verdict(2)
    plan = build_plan([_user(a, b)], recipients=[_recipient(b, a)], published={})
    assert plan.actions == []


def test_replace_and_remove() -> None:
    a, b, expired = _verdict(1), _verdict(2), _verdict(3, ok=False)
    plan = build_plan(
        [_user(a, b), _user(expired, mail="c@x.test", guid=2)],
        recipients=[_recipient(a), _recipient(expired, smtp="c@x.test")],
        published={},
    )
    assert sorted(a.kind for a in plan.actions) == ["remove", "replace"]
    assert plan.removals() == 1


def test_directory_synced_recipient_is_a_conflict_unless_cloud_managed() -> None:
    a = _verdict(1)
    synced = build_plan([_user(a)], recipients=[_recipient(synced=True)], published={})
    assert [(x.kind, x.reason) for x in synced.actions] == [("conflict", "managed_by_directory_sync")]
    cloud = build_plan([_user(a)], recipients=[_recipient(synced=True, cloud=True)], published={})
    assert [x.kind for x in cloud.actions] == ["add"]


def test_users_without_a_recipient_or_mail_get_a_reason() -> None:
    a = _verdict(1)
    plan = build_plan([_user(a), _user(a, mail=None, guid=2)], recipients=[], published={})
    assert [(x.kind, x.reason) for x in plan.actions] == [("no_recipient", "recipient_not_found")]
    assert [r.reason for r in plan.results if r.object_guid == uuid.UUID(int=2)] == ["user_has_no_mail"]


def test_recipient_left_behind_by_a_user_who_left_the_scope_is_cleared() -> None:
    a = _verdict(1)
    recipient = _recipient(a, smtp="gone@x.test")
    published = {recipient.recipient_id: uuid.UUID(int=9)}
    plan = build_plan([], recipients=[recipient], published=published)
    assert [(x.kind, x.reason) for x in plan.actions] == [("remove", "user_left_scope")]


def test_two_users_claiming_one_recipient_first_wins() -> None:
    a = _verdict(1)
    plan = build_plan([_user(a), _user(a, guid=2)], recipients=[_recipient()], published={})
    assert [(x.kind, x.reason) for x in plan.actions] == [
        ("add", None),
        ("no_recipient", "recipient_claimed_by_another_user"),
    ]


def test_renamed_user_moves_to_a_new_recipient_and_the_old_one_is_cleared() -> None:
    """One user can have two actions in a run: its new recipient, and clearing the one it left."""
    a = _verdict(1, email="anna.jones@x.test")
    old = _recipient(a, smtp="anna.smith@x.test")
    new = _recipient(smtp="anna.jones@x.test")
    published = {old.recipient_id: uuid.UUID(int=1)}
    plan = build_plan([_user(a, mail="anna.jones@x.test")], recipients=[old, new], published=published)
    assert [(x.kind, x.recipient.primary_smtp) for x in plan.actions] == [
        ("add", "anna.jones@x.test"),
        ("remove", "anna.smith@x.test"),
    ]
    assert {x.object_guid for x in plan.actions} == {uuid.UUID(int=1)}
