"""Directory entries as users: odd entries are skipped with a reason instead of failing the extract."""

from __future__ import annotations

import uuid

import pytest

from certsync.directory import DirectoryReader, DirectorySettings, smtp_addresses

GUID = uuid.UUID("6f1c2a54-0d2b-4c43-9a51-2f3d4e5f6a7b")


@pytest.fixture()
def reader() -> DirectoryReader:
    settings = DirectorySettings(
        url="ldap://127.0.0.1", bind_dn="CN=x", password="pw", base_dn="DC=corp", allow_plain_bind=True
    )
    return DirectoryReader(settings=settings)


def _raw(**changes: list[bytes]) -> dict[str, list[bytes]]:
    raw = {
        "objectGUID": [GUID.bytes_le],
        "sAMAccountName": [b"anna"],
        "mail": [b"Anna.Smith@corp.example.test"],
        "proxyAddresses": [b"SMTP:anna.smith@corp.example.test", b"smtp:as@corp.example.test", b"X500:/o=x"],
        "userCertificate": [b"\x30\x03\x02\x01\x01"],
        "userAccountControl": [b"514"],
        "uSNChanged": [b"4711"],
    }
    return {**raw, **changes}


def test_entry_becomes_a_user(reader: DirectoryReader) -> None:
    user = reader._read_entry("CN=Anna,DC=corp", _raw())
    assert user is not None
    assert user.object_guid == GUID
    assert user.disabled and user.usn_changed == 4711
    assert user.addresses() == ("anna.smith@corp.example.test", "as@corp.example.test")
    assert user.user_certificate == (b"\x30\x03\x02\x01\x01",)


@pytest.mark.parametrize(
    "changes",
    [
        {"objectGUID": []},
        {"objectGUID": [b"short"]},
        {"userAccountControl": [b"not-a-number"]},
    ],
)
def test_unreadable_entry_is_skipped_with_its_reason(reader: DirectoryReader, changes) -> None:
    assert reader._read_entry("CN=Odd,DC=corp", _raw(**changes)) is None
    ((dn, reason),) = reader.skipped
    assert dn == "CN=Odd,DC=corp" and reason.startswith("unreadable ")


def test_nul_characters_never_reach_the_database(reader: DirectoryReader) -> None:
    user = reader._read_entry("CN=A\x00,DC=corp", _raw(mail=[b"a\x00@corp.example.test"]))
    assert user is not None and "\x00" not in user.dn + (user.mail or "")


def test_smtp_addresses_ignore_other_proxy_kinds() -> None:
    assert smtp_addresses(None, ["X400:c=US", "SIP:a@b", "smtp:B@x.test"]) == ("b@x.test",)
