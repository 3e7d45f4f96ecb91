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


# -- delta plans: planning only what changed gives the same plan as planning everyone -------------


def _world(rng, *, users: int, addresses: list[str]) -> tuple[list[SourceUser], list[Recipient]]:
    pool = [_verdict(n, email=addresses[n % len(addresses)], ok=n % 5 != 0) for n in range(12)]
    people = [
        SourceUser(
            object_guid=uuid.UUID(int=guid),
            mail=mail,
            addresses=(mail,) if mail else (),
            verdicts=tuple(rng.sample(pool, rng.randint(0, 3))),
        )
        for guid in range(1, users + 1)
        for mail in [rng.choice([*addresses, None])]
    ]
    recipients = [
        _recipient(*rng.sample(pool, rng.randint(0, 2)), smtp=smtp, synced=rng.random() < 0.2)._replace(
            recipient_id=f"r{n}",
        )
        for n, smtp in enumerate(rng.sample(addresses, len(addresses) - 2))
    ]
    return people, recipients


def _applied(plan, recipients: list[Recipient], published: dict) -> tuple[list[Recipient], dict]:
    """Exchange after a run published every publishable action of `plan`."""
    by_id = {r.recipient_id: r for r in recipients}
    published = dict(published)
    for action in plan.actions:
        if action.kind in ("add", "replace", "remove"):
            rid = action.recipient.recipient_id
            by_id[rid] = by_id[rid]._replace(
                user_certificate=action.user_certificate,
                user_smime_certificate=action.user_smime_certificate,
            )
            published[rid] = action.object_guid
    return list(by_id.values()), published


def _changed(rng, people, recipients, addresses):
    """Some users change mail or certificates, some come and go; some recipients drift, move or go."""
    changed: set[uuid.UUID] = set()
    people = list(people)
    for i in rng.sample(range(len(people)), 3):
        people[i] = people[i]._replace(
            mail=(m := rng.choice(addresses)), addresses=(m,), verdicts=people[i].verdicts[:1]
        )
        changed.add(people[i].object_guid)
    del people[rng.randrange(len(people))]
    # A user new to the directory (a full read's merge marks it changed, like any insert).
    fresh = SourceUser(
        object_guid=uuid.UUID(int=1000 + rng.randrange(1000)),
        mail=(m := rng.choice(addresses)),
        addresses=(m,),
        verdicts=tuple(rng.sample(people[0].verdicts + people[-1].verdicts, 1)) if people[0].verdicts else (),
    )
    people.insert(rng.randrange(len(people) + 1), fresh)
    changed.add(fresh.object_guid)
    recipients = list(recipients)
    for i in rng.sample(range(len(recipients)), 2):
        recipients[i] = recipients[i]._replace(user_certificate=())  # drift
    gone = rng.randrange(len(recipients))
    free = sorted(set(addresses) - {r.primary_smtp for r in recipients} | {recipients[gone].primary_smtp})
    recipients[gone] = recipients[0]._replace(recipient_id="r-new", primary_smtp=rng.choice(free))
    return people, recipients, changed


def _key(action) -> tuple:
    rid = action.recipient.recipient_id if action.recipient else None
    return (action.kind, action.object_guid, rid, action.user_certificate, action.reason)


def test_a_delta_plan_equals_the_full_plan() -> None:
    import random

    from certsync.plan import RecipientAddress, delta_users

    addresses = [f"u{n}@x.test" for n in range(14)]
    for seed in range(120):
        rng = random.Random(seed)
        people, recipients = _world(rng, users=12, addresses=addresses)
        base_plan = build_plan(people, recipients=recipients, published={})
        recipients, published = _applied(base_plan, recipients, {})
        now_people, now_recipients, changed = _changed(rng, people, recipients, addresses)
        full = build_plan(now_people, recipients=now_recipients, published=published)
        before = {r.recipient_id: r for r in recipients}
        after = {r.recipient_id: r for r in now_recipients}
        moved = {rid for rid in before.keys() | after.keys() if before.get(rid) != after.get(rid)}
        moved |= base_plan.contested
        scope = delta_users(
            now_people,
            recipients=[RecipientAddress(r.recipient_id, r.primary_smtp) for r in now_recipients],
            published=published,
            changed_users=changed,
            changed_recipients=moved,
            old_addresses={before[rid].primary_smtp for rid in moved if rid in before},
        )
        planned = scope.users
        delta = build_plan(
            [u for u in now_people if u.object_guid in planned],
            recipients=[r for r in now_recipients if r.recipient_id in scope.recipients],
            published=published,
            claimed_elsewhere=scope.claimed_elsewhere,
        )
        current = {u.object_guid for u in now_people}
        carried = [
            a
            for a in base_plan.actions
            if a.kind in ("conflict", "no_recipient") and a.object_guid in current - planned
        ]
        assert sorted(map(_key, full.actions)) == sorted(map(_key, [*delta.actions, *carried])), (
            seed,
            sorted(map(_key, full.actions)),
            sorted(map(_key, delta.actions)),
            sorted(map(_key, carried)),
            planned,
        )
        kept = [r for r in base_plan.results if r.object_guid in current - planned]
        assert sorted(map(repr, full.results)) == sorted(map(repr, [*delta.results, *kept])), seed
        assert len(planned) < len(now_people) or seed % 50  # it does leave users out
        assert len(scope.recipients) < len(now_recipients) or seed % 50  # and recipients
