"""Seeding the emulator tenant from directory users, and the offline CLI commands."""

from __future__ import annotations

import base64
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from emulator_support import client_certificate, directory_user

from certsync_lab.emulator.cli import emulator as emulator_cli
from certsync_lab.emulator.cmdlets import CmdletRunner, PageRequest
from certsync_lab.emulator.seed import SYNC_VALUE_CAP, Shares, seed_from_directory
from certsync_lab.emulator.state import StateStore, register_client
from certsync_lab.emulator.tls import ensure_tls


def _recipients(home: Path) -> dict[str, dict]:
    store = StateStore(home=home)
    try:
        return {item["Alias"]: item for item in store.dump()["recipients"]}
    finally:
        store.close()


def test_seeding_is_deterministic_and_stable_when_users_are_added(tmp_path: Path) -> None:
    users = [directory_user(f"user{i:03d}") for i in range(60)]
    more = users + [directory_user(f"late{i:03d}") for i in range(40)]
    random.Random(3).shuffle(more)
    seed_from_directory(home=tmp_path / "a", users=users, shares=Shares(), seed=42)
    seed_from_directory(home=tmp_path / "b", users=more, shares=Shares(), seed=42)
    first, second = _recipients(tmp_path / "a"), _recipients(tmp_path / "b")
    assert first  # the default shares create recipients
    for alias, item in first.items():
        other = second[alias]
        for key in ("Guid", "RecipientTypeDetails", "IsDirSynced", "IsExchangeCloudManaged"):
            assert other[key] == item[key], (alias, key)
    # Users without a recipient stay without one when others are added.
    assert set(first) == {alias for alias in second if alias.startswith("user")}
    assert len(first) < len(users)


def test_shares_shape_the_tenant(tmp_path: Path) -> None:
    users = [directory_user(f"p{i:04d}") for i in range(600)]
    report = seed_from_directory(home=tmp_path, users=users, shares=Shares(), seed=5)
    kinds = [item["RecipientTypeDetails"] for item in _recipients(tmp_path).values()]
    assert report.created == len(kinds) and report.without_recipient == 600 - len(kinds)
    assert 0.62 < kinds.count("UserMailbox") / 600 < 0.78
    assert 0.09 < kinds.count("MailUser") / 600 < 0.21
    assert 0.05 < kinds.count("MailContact") / 600 < 0.15
    assert 0.01 < report.without_recipient / 600 < 0.10
    flags = [
        (item["IsDirSynced"], item["IsExchangeCloudManaged"], item["RecipientTypeDetails"])
        for item in _recipients(tmp_path).values()
    ]
    assert all(synced for synced, managed, _ in flags if managed)
    assert all(kind == "UserMailbox" for _, managed, kind in flags if managed)
    assert 0.72 < sum(synced for synced, _, _ in flags) / len(flags) < 0.88


def test_other_seed_gives_other_tenant(tmp_path: Path) -> None:
    users = [directory_user(f"s{i:03d}") for i in range(50)]
    seed_from_directory(home=tmp_path / "a", users=users, shares=Shares(), seed=1)
    seed_from_directory(home=tmp_path / "b", users=users, shares=Shares(), seed=2)
    first, second = _recipients(tmp_path / "a"), _recipients(tmp_path / "b")
    differs = [
        alias
        for alias in set(first) & set(second)
        if first[alias]["RecipientTypeDetails"] != second[alias]["RecipientTypeDetails"]
        or first[alias]["IsDirSynced"] != second[alias]["IsDirSynced"]
    ]
    assert differs or set(first) != set(second)


def test_reseed_keeps_certificates_type_and_refreshes_identity(tmp_path: Path) -> None:
    user = directory_user("stays")
    only_mailuser = Shares(mailbox=0, mailuser=1, contact=0, missing=0, dirsynced=0)
    seed_from_directory(home=tmp_path, users=[user], shares=only_mailuser, seed=9)
    store = StateStore(home=tmp_path)
    recipient = store.resolve("stays")[0]
    kept = base64.b64encode(b"published").decode()
    store.save_recipients([recipient.changed(user_certificate=(kept,))])
    store.close()
    renamed = replace(user, display_name="Renamed Person", mail="new.stays@example.test")
    only_contact = Shares(mailbox=0, mailuser=0, contact=1, missing=0, dirsynced=1)
    report = seed_from_directory(home=tmp_path, users=[renamed], shares=only_contact, seed=10)
    item = _recipients(tmp_path)["stays"]
    assert report.updated == 1 and report.created == 0
    assert item["RecipientTypeDetails"] == "MailUser" and item["IsDirSynced"] is False
    assert item["UserCertificate"] == [kept]
    assert item["DisplayName"] == "Renamed Person"
    assert item["PrimarySmtpAddress"] == "new.stays@example.test"
    assert item["EmailAddresses"][0] == "SMTP:new.stays@example.test"
    again = seed_from_directory(home=tmp_path, users=[renamed], shares=only_contact, seed=10)
    assert again.unchanged == 1 and again.updated == 0


def test_synced_recipients_start_with_what_the_sync_carried(tmp_path: Path) -> None:
    certs = (b"\x30\x82one", b"\x30\x82two")
    too_many = tuple(b"\x30\x82%d" % i for i in range(SYNC_VALUE_CAP + 1))
    synced = Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=1, cloud_managed=0)
    cloud = Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=0)
    no_mail = replace(directory_user("nomail"), mail=None)
    seed_from_directory(
        home=tmp_path,
        shares=synced,
        seed=1,
        users=[
            directory_user("carried", certificates=certs),
            directory_user("blocked", certificates=too_many),
            no_mail,
        ],
    )
    report = seed_from_directory(
        home=tmp_path, shares=cloud, seed=1, users=[directory_user("cloudonly", certificates=certs)]
    )
    items = _recipients(tmp_path)
    assert items["carried"]["UserCertificate"] == [base64.b64encode(c).decode() for c in certs]
    assert items["blocked"]["UserCertificate"] == []
    assert items["cloudonly"]["UserCertificate"] == []
    assert "nomail" not in items and report.created == 1


def test_restamped_tenant_looks_unchanged_since_then_to_a_changed_since_read(tmp_path: Path) -> None:
    import datetime as dt

    seed_from_directory(
        home=tmp_path, users=[directory_user(f"s{i:03d}") for i in range(30)], shares=Shares(), seed=1
    )
    store = StateStore(home=tmp_path)
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        fresh = store.page(
            type_details=None, after_seq=0, limit=100, changed_from=(now - dt.timedelta(hours=1)).isoformat()
        )
        assert fresh  # seeding stamps the time it ran
        assert store.restamp(now - dt.timedelta(days=1)) == len(fresh)
        assert (
            store.page(
                type_details=None,
                after_seq=0,
                limit=100,
                changed_from=(now - dt.timedelta(hours=1)).isoformat(),
            )
            == []
        )
        older = store.page(
            type_details=None, after_seq=0, limit=100, changed_from=(now - dt.timedelta(days=2)).isoformat()
        )
        assert {r.when_changed for _, r in older} == {(now - dt.timedelta(days=1)).isoformat()}
    finally:
        store.close()


def test_shares_are_validated() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        Shares(mailbox=-1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Shares(dirsynced=1.5)


def test_register_client_keeps_secret_out_of_state(tmp_path: Path) -> None:
    client = register_client(tmp_path, "app-1", secret="very-secret-value")
    assert "very-secret-value" not in repr(client)
    dumped = CliRunner().invoke(emulator_cli, ["dump", "--home", str(tmp_path)])
    assert dumped.exit_code == 0, dumped.output
    state = json.loads(dumped.output)
    assert state["clients"] == ["app-1"] and state["recipients"] == []
    assert "very-secret-value" not in (tmp_path / "state.sqlite").read_bytes().decode("latin-1")
    with pytest.raises(ValueError, match="secret, a certificate"):
        register_client(tmp_path, "app-2")
    with pytest.raises(ValueError, match="PEM"):
        register_client(tmp_path, "app-3", certificate_pem="garbage")


def test_add_client_command_reads_secret_from_env_and_certificate_file(tmp_path: Path) -> None:
    cert_file = tmp_path / "app.pem"
    cert_file.write_text(client_certificate("cli app").certificate_pem)
    runner = CliRunner()
    result = runner.invoke(
        emulator_cli,
        ["add-client", "--home", str(tmp_path), "--client-id", "cli-app", "--certificate", str(cert_file)],
        env={"CERTSYNC_CLIENT_SECRET": "from-env-secret"},
    )
    assert result.exit_code == 0, result.output
    assert "from-env-secret" not in result.output
    store = StateStore(home=tmp_path)
    client = store.get_client("cli-app")
    store.close()
    assert client is not None and client.secret_matches("from-env-secret")
    assert client.certificate_pem == cert_file.read_text()
    refused = runner.invoke(
        emulator_cli,
        ["add-client", "--home", str(tmp_path), "--client-id", "x"],
        env={"CERTSYNC_CLIENT_SECRET": ""},
    )
    assert refused.exit_code != 0


def test_tls_material_is_reused_and_reissued_for_new_hostnames(tmp_path: Path) -> None:
    from cryptography import x509

    first = ensure_tls(directory=tmp_path)
    ca_pem, server_pem = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    again = ensure_tls(directory=tmp_path)
    assert again.server_cert.read_bytes() == server_pem and again.ca_cert.read_bytes() == ca_pem
    wider = ensure_tls(directory=tmp_path, hostnames=("localhost", "127.0.0.1", "emulator"))
    assert wider.ca_cert.read_bytes() == ca_pem
    assert wider.server_cert.read_bytes() != server_pem
    server = x509.load_pem_x509_certificate(wider.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "emulator" in names.get_values_for_type(x509.DNSName)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert wider.server_key.stat().st_mode & 0o077 == 0


def test_get_recipient_defaults_to_1000_results_with_a_warning(tmp_path: Path) -> None:
    users = [directory_user(f"many{i:04d}") for i in range(1003)]
    only_mailuser = Shares(mailbox=0, mailuser=1, contact=0, missing=0, dirsynced=0)
    seed_from_directory(home=tmp_path, users=users, shares=only_mailuser, seed=1)
    store = StateStore(home=tmp_path)
    runner = CmdletRunner(store=store)
    default = runner.run(name="Get-Recipient", parameters={}, page=PageRequest(page_size=1000))
    unlimited = runner.run(
        name="Get-Recipient", parameters={"ResultSize": "Unlimited"}, page=PageRequest(page_size=1000)
    )
    store.close()
    assert len(default.value) == 1000 and default.skip_token is None
    assert "ResultSize" in default.warnings[0]
    assert len(unlimited.value) == 1000 and unlimited.skip_token is not None
    assert unlimited.warnings == []


@pytest.mark.integration
def test_seed_from_ad_command_reads_the_directory(populated_dc, tmp_path: Path) -> None:
    password_file = tmp_path / "bind-password"
    password_file.write_text(populated_dc.password)
    home = tmp_path / "emulator"
    args = [
        "seed-from-ad",
        "--home",
        str(home),
        "--url",
        populated_dc.ldap_url,
        "--bind-dn",
        populated_dc.bind_dn,
        "--base-dn",
        populated_dc.users_ou,
        "--password-file",
        str(password_file),
        "--seed",
        "3",
    ]
    result = CliRunner().invoke(emulator_cli, args, env={"CERTSYNC_LDAP_PASSWORD": ""})
    assert result.exit_code == 0, result.output
    assert populated_dc.password not in result.output
    report = json.loads(result.output)
    items = _recipients(home)
    assert report["created"] == len(items) > 0
    assert all(item["PrimarySmtpAddress"] for item in items.values())
    rerun = CliRunner().invoke(emulator_cli, args)
    assert json.loads(rerun.output)["created"] == 0
    missing = CliRunner().invoke(
        emulator_cli, [*args[:-4], "--seed", "3"], env={"CERTSYNC_LDAP_PASSWORD": ""}
    )
    assert missing.exit_code != 0 and "CERTSYNC_LDAP_PASSWORD" in missing.output
