"""What is published for whom: disabled accounts, shared mailboxes, users that left; and the
directory scope settings, which fail fast naming the setting."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from certsync.certificates.verdict import Verdict
from certsync.config import ConfigError, Connection, directory_settings
from certsync.directory import DirectorySettings
from certsync.directory.entries import merge_ranges, to_user
from certsync.exchange.recipients import Recipient
from certsync.plan import AccountPolicy, SourceUser, build_plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)
GUID = uuid.UUID(int=1)


def _verdict(n: int) -> Verdict:
    return Verdict(
        sha256=hashlib.sha256(str(n).encode()).digest(), attribute="userCertificate", ok=True, reason=None,
        rule=None, detail="", not_before=T0, not_after=T0 + timedelta(days=365), emails=("a@x.test",),
    )  # fmt: skip


def _user(*, disabled: bool = False, details: int | None = None) -> SourceUser:
    return SourceUser(
        object_guid=GUID, mail="a@x.test", addresses=("a@x.test",), verdicts=(_verdict(1),),
        disabled=disabled, recipient_type_details=details,
    )  # fmt: skip


def _recipient(kind: str = "UserMailbox", *, held: bool = True) -> Recipient:
    return Recipient(
        recipient_id="r1", primary_smtp="a@x.test", recipient_type=kind, is_dir_synced=False,
        is_cloud_managed=False, user_certificate=(_verdict(1).sha256,) if held else (),
    )  # fmt: skip


def test_a_disabled_accounts_certificates_are_withdrawn_with_a_reason() -> None:
    plan = build_plan([_user(disabled=True)], recipients=[_recipient()], published={})
    assert [(a.kind, a.user_certificate) for a in plan.actions] == [("remove", ())]
    assert [(r.reason, r.rule) for r in plan.results] == [("account_disabled", "account_state")]
    fresh = build_plan([_user(disabled=True)], recipients=[_recipient(held=False)], published={})
    assert fresh.actions == [] and fresh.results[0].reason == "account_disabled"


@pytest.mark.parametrize("kind", ["SharedMailbox", "RoomMailbox", "EquipmentMailbox"])
def test_shared_room_and_equipment_mailboxes_keep_theirs(kind: str) -> None:
    plan = build_plan([_user(disabled=True)], recipients=[_recipient(kind, held=False)], published={})
    assert [a.kind for a in plan.actions] == ["add"]


@pytest.mark.parametrize("details", [4, 16, 32, 34359738368])
def test_exchange_recipient_type_in_ad_marks_shared_mailboxes(details: int) -> None:
    plan = build_plan(
        [_user(disabled=True, details=details)], recipients=[_recipient(held=False)], published={}
    )
    assert [a.kind for a in plan.actions] == ["add"]


def test_an_option_keeps_disabled_accounts_and_users_that_left() -> None:
    keep = AccountPolicy(disabled_accounts="keep", left_scope="keep")
    plan = build_plan([_user(disabled=True)], recipients=[_recipient(held=False)], published={}, policy=keep)
    assert [a.kind for a in plan.actions] == ["add"]
    left = {"r1": GUID}
    assert (
        build_plan(
            [], recipients=[_recipient()], published=left, gone={GUID: "left_scope"}, policy=keep
        ).actions
        == []
    )
    # Deleted users are withdrawn whatever the option says.
    deleted = build_plan([], recipients=[_recipient()], published=left, gone={GUID: "deleted"}, policy=keep)
    assert [(a.kind, a.reason) for a in deleted.actions] == [("remove", "user_deleted")]
    default = build_plan([], recipients=[_recipient()], published=left, gone={GUID: "left_scope"})
    assert [(a.kind, a.reason) for a in default.actions] == [("remove", "user_left_scope")]


def _ldap(**extra: object) -> Connection:
    return Connection(
        conn_id="certsync_ldap", conn_type="ldaps", host="dc1.corp.example", port=636,
        login="CN=sync,DC=corp", password="pw", extra={"base_dn": "OU=People,DC=corp", **extra},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"base_dn": "OU=People,,DC=corp"}, "ldap base_dn 'OU=People,,DC=corp' is not a valid DN"),
        ({"base_dn": "OU=A,DC=corp;garbage"}, "ldap base_dn 'garbage' is not a valid DN"),
        ({"base_dn": "OU=A,DC=corp;OU=B,OU=A,DC=corp"}, "lies within"),
        ({"search_filter": "(&(department=IT)"}, "ldap search_filter .* is not a valid LDAP filter"),
        ({"group_dn": "smime users"}, "ldap group_dn 'smime users' is not a valid DN"),
        ({"page_size": 5000}, "page_size must be between 1 and 1000"),
        ({"time_limit_s": 0}, "time_limit_s must be a whole number >= 1"),
        ({"change_tracking": "cookie"}, "change_tracking must be one of usn, dirsync"),
    ],
)
def test_malformed_scope_fails_fast_naming_the_setting(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"connection 'certsync_ldap': .*{message}"):
        directory_settings(_ldap(**extra))


def test_plain_bind_only_when_allowed() -> None:
    plain = dataclasses.replace(_ldap(), conn_type="ldap", port=389)
    with pytest.raises(ConfigError, match=r"password in clear.*allow_plain_bind"):
        directory_settings(plain)
    assert directory_settings(dataclasses.replace(plain, extra={**plain.extra, "start_tls": "true"})).tls
    assert directory_settings(dataclasses.replace(plain, extra={**plain.extra, "allow_plain_bind": True}))


def test_scope_filter_combines_base_dns_filter_and_nested_group() -> None:
    settings = directory_settings(
        _ldap(
            base_dn=["OU=A,DC=corp", "OU=B,DC=corp"],
            search_filter="department=IT",
            group_dn="CN=S (x),DC=corp",
        )
    )
    assert settings.base_dns == ("OU=A,DC=corp", "OU=B,DC=corp")
    assert settings.scope_filter == (
        "(&(&(objectClass=user)(!(objectClass=computer)))(department=IT)"
        "(memberOf:1.2.840.113556.1.4.1941:=CN=S \\28x\\29,DC=corp))"
    )
    assert settings.scope_key() != DirectorySettings(**{**settings.__dict__, "group_dn": None}).scope_key()


def test_ranged_values_and_odd_values_are_kept_as_data() -> None:
    raw = {
        "objectGUID": [GUID.bytes_le],
        "proxyAddresses;range=0-1": [b"smtp:a@x.test", b"smtp:b@x.test"],
        "proxyAddresses;range=2-*": [b"smtp:\xff@x.test"],
        "mail": [b"a\x00@x.test"],
        "msExchRecipientTypeDetails": [b"4"],
    }
    assert len(merge_ranges(raw)["proxyAddresses"]) == 3
    user = to_user("CN=a", raw)
    assert len(user.proxy_addresses) == 3 and user.mail == "a@x.test" and user.recipient_type_details == 4
    assert "\ufffd" in user.proxy_addresses[2]


def test_pages_read_ahead_keep_order_and_surface_a_failed_read() -> None:
    from certsync.directory import DirectoryError
    from certsync.readahead import ReadAhead

    def pages():  # type: ignore[no-untyped-def]
        yield ["a"]
        yield ["b"]
        raise DirectoryError("ldap search below 'OU=x' failed")

    with ReadAhead(pages()) as ahead:
        read = iter(ahead)
        assert [next(read), next(read)] == [["a"], ["b"]]
        with pytest.raises(DirectoryError, match="failed"):
            next(read)


def test_a_read_ahead_stops_its_thread_when_the_consumer_stops_early() -> None:
    import itertools

    from certsync.readahead import ReadAhead

    ahead = ReadAhead(itertools.count(), ahead=2, name="endless")
    assert list(itertools.islice(ahead, 5)) == [0, 1, 2, 3, 4]
    ahead.close()
    assert not ahead._thread.is_alive()
