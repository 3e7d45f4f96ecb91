"""Set-Mailbox reaches every kind of mailbox (shared, room, equipment) and Set-MailUser guest mail
users too, as in Exchange Online; a cmdlet of the wrong kind still finds nothing."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from emulator_support import SCOPE, Invoker, directory_user, msal_app, typed

from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.emulator.seed import Shares, seed_from_directory
from certsync_lab.emulator.state import StateStore, register_client

pytestmark = pytest.mark.integration

CLIENT = "22222222-aaaa-4bbb-8ccc-000000000001"
SECRET = "recipient-types-secret-not-real"
CERT = base64.b64encode(b"\x30\x82certificate-c").decode()
KINDS = {
    "SharedMailbox": "Mailbox",
    "RoomMailbox": "Mailbox",
    "EquipmentMailbox": "Mailbox",
    "GuestMailUser": "MailUser",
}


@pytest.fixture(scope="module")
def invoker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Invoker]:
    home = tmp_path_factory.mktemp("emulator-kinds")
    register_client(home, CLIENT, secret=SECRET)
    shares = Shares(mailbox=0, mailuser=1, contact=0, missing=0, dirsynced=0)
    seed_from_directory(home=home, users=[directory_user(k.lower()) for k in KINDS], shares=shares, seed=1)
    store = StateStore(home=home)
    try:
        for kind in KINDS:
            (recipient,) = store.resolve(f"{kind.lower()}@example.test")
            store.save_recipients([recipient.changed(recipient_type_details=kind)])
    finally:
        store.close()
    with EmulatorProcess(home=home) as emulator:
        app = msal_app(
            url=emulator.url,
            tenant=emulator.tenant_id,
            ca_file=emulator.ca_file,
            client_id=CLIENT,
            credential=SECRET,
        )
        token = app.acquire_token_for_client(scopes=SCOPE)["access_token"]
        yield Invoker(url=emulator.url, tenant=emulator.tenant_id, ca_file=emulator.ca_file, token=token)


@pytest.mark.parametrize(("kind", "noun"), KINDS.items())
def test_set_and_get_reach_the_kind(invoker: Invoker, kind: str, noun: str) -> None:
    identity = f"{kind.lower()}@example.test"
    assert (
        invoker.post(f"Set-{noun}", {"Identity": identity, **typed("UserCertificate", CERT)}).status_code
        == 200
    )
    item = invoker.post(f"Get-{noun}", {"Identity": identity}).json()["value"][0]
    assert (item["RecipientTypeDetails"], item["UserCertificate"]) == (kind, [CERT])
    other = "MailUser" if noun == "Mailbox" else "Mailbox"
    wrong = invoker.post(f"Set-{other}", {"Identity": identity, **typed("UserCertificate", CERT)})
    assert "ManagementObjectNotFoundException" in wrong.text
