"""The Exchange Online emulator over real TLS in a child process, driven by real msal."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from emulator_support import (
    SCOPE,
    ClientCertificate,
    Invoker,
    client_certificate,
    directory_user,
    msal_app,
    typed,
)

from certsync_lab.emulator.cli import emulator as emulator_cli
from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.emulator.seed import Shares, seed_from_directory
from certsync_lab.emulator.state import register_client

pytestmark = pytest.mark.integration

SECRET_CLIENT = "11111111-aaaa-4bbb-8ccc-000000000001"
CERT_CLIENT = "11111111-aaaa-4bbb-8ccc-000000000002"
CLIENT_SECRET = "lab-secret-value-not-real"
CERT_A = base64.b64encode(b"\x30\x82certificate-a").decode()
CERT_B = base64.b64encode(b"\x30\x82certificate-b").decode()

ONLY = {
    "synced_mailbox": Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=1, cloud_managed=0),
    "cloud_mailbox": Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=1, cloud_managed=1),
    "cloud_only_mailuser": Shares(mailbox=0, mailuser=1, contact=0, missing=0, dirsynced=0),
    "cloud_only_contact": Shares(mailbox=0, mailuser=0, contact=1, missing=0, dirsynced=0),
}


@pytest.fixture(scope="module")
def cert_credential() -> ClientCertificate:
    return client_certificate("certsync test app")


@pytest.fixture(scope="module")
def emulator(
    tmp_path_factory: pytest.TempPathFactory, cert_credential: ClientCertificate
) -> Iterator[EmulatorProcess]:
    home = tmp_path_factory.mktemp("emulator")
    register_client(home, SECRET_CLIENT, secret=CLIENT_SECRET)
    register_client(home, CERT_CLIENT, certificate_pem=cert_credential.certificate_pem)
    for name, shares in ONLY.items():
        seed_from_directory(home=home, users=[directory_user(name)], shares=shares, seed=7)
    bulk = [directory_user(f"bulk{i:02d}") for i in range(25)]
    seed_from_directory(home=home, users=bulk, shares=ONLY["cloud_only_mailuser"], seed=7)
    with EmulatorProcess(home=home) as process:
        yield process


@pytest.fixture(autouse=True)
def _default_config(emulator: EmulatorProcess) -> Iterator[None]:
    yield
    emulator.control.reset_config()


@pytest.fixture(scope="module")
def token(emulator: EmulatorProcess) -> str:
    app = msal_app(
        url=emulator.url,
        tenant=emulator.tenant_id,
        ca_file=emulator.ca_file,
        client_id=SECRET_CLIENT,
        credential=CLIENT_SECRET,
    )
    result = app.acquire_token_for_client(scopes=SCOPE)
    return str(result["access_token"])


@pytest.fixture()
def invoker(emulator: EmulatorProcess, token: str) -> Invoker:
    return Invoker(url=emulator.url, tenant=emulator.tenant_id, ca_file=emulator.ca_file, token=token)


def _app(emulator: EmulatorProcess, client_id: str, credential: object):
    return msal_app(
        url=emulator.url,
        tenant=emulator.tenant_id,
        ca_file=emulator.ca_file,
        client_id=client_id,
        credential=credential,
    )


def test_token_with_client_secret_then_from_cache(emulator: EmulatorProcess) -> None:
    app = _app(emulator, SECRET_CLIENT, CLIENT_SECRET)
    first = app.acquire_token_for_client(scopes=SCOPE)
    second = app.acquire_token_for_client(scopes=SCOPE)
    assert first["token_type"] == "Bearer" and first["expires_in"] > 3000
    assert first["token_source"] == "identity_provider"
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]


def test_wrong_secret_is_refused_like_entra(emulator: EmulatorProcess) -> None:
    result = _app(emulator, SECRET_CLIENT, "not-the-secret").acquire_token_for_client(scopes=SCOPE)
    assert "access_token" not in result
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215:")
    assert "not-the-secret" not in str(result)


def test_unknown_client_is_refused(emulator: EmulatorProcess) -> None:
    result = _app(emulator, "00000000-0000-0000-0000-00000000dead", CLIENT_SECRET)
    refused = result.acquire_token_for_client(scopes=SCOPE)
    assert refused["error"] == "unauthorized_client" and refused["error_codes"] == [700016]


@pytest.mark.parametrize("form", ["public_certificate", "thumbprint"])
def test_token_with_certificate_assertion(
    emulator: EmulatorProcess, cert_credential: ClientCertificate, form: str
) -> None:
    # public_certificate makes msal sign PS256 with x5t#S256; a bare thumbprint gives RS256 + x5t.
    credential = {"private_key": cert_credential.key_pem}
    if form == "public_certificate":
        credential["public_certificate"] = cert_credential.certificate_pem
    else:
        credential["thumbprint"] = cert_credential.sha1_thumbprint
    result = _app(emulator, CERT_CLIENT, credential).acquire_token_for_client(scopes=SCOPE)
    assert "access_token" in result, result.get("error_description")
    invoker = Invoker(
        url=emulator.url, tenant=emulator.tenant_id, ca_file=emulator.ca_file, token=result["access_token"]
    )
    assert invoker.post("Get-Recipient", {"ResultSize": 1}).status_code == 200


def test_assertion_with_bad_signature_is_refused(
    emulator: EmulatorProcess, cert_credential: ClientCertificate
) -> None:
    impostor = client_certificate("impostor")
    credential = {"private_key": impostor.key_pem, "public_certificate": cert_credential.certificate_pem}
    result = _app(emulator, CERT_CLIENT, credential).acquire_token_for_client(scopes=SCOPE)
    assert "access_token" not in result
    assert result["error"] == "invalid_client" and result["error_codes"] == [700027]


def test_assertion_signed_by_unregistered_certificate_is_refused(
    emulator: EmulatorProcess,
) -> None:
    other = client_certificate("someone else")
    credential = {"private_key": other.key_pem, "public_certificate": other.certificate_pem}
    result = _app(emulator, CERT_CLIENT, credential).acquire_token_for_client(scopes=SCOPE)
    assert result["error_codes"] == [700027]
    assert "not registered" in result["error_description"]


def test_invoke_command_requires_a_valid_token(emulator: EmulatorProcess, token: str) -> None:
    anonymous = Invoker(url=emulator.url, tenant=emulator.tenant_id, ca_file=emulator.ca_file, token=None)
    assert anonymous.post("Get-Recipient").status_code == 401
    tampered = Invoker(
        url=emulator.url, tenant=emulator.tenant_id, ca_file=emulator.ca_file, token=token[:-4] + "AAAA"
    )
    response = tampered.post("Get-Recipient")
    assert response.status_code == 401
    assert "invalid_token" in response.headers["WWW-Authenticate"]


def test_get_recipient_pages_with_next_link(invoker: Invoker) -> None:
    seen: list[str] = []
    url = None
    pages = 0
    while True:
        response = invoker.post(
            "Get-Recipient", {"ResultSize": "Unlimited"}, url=url, Prefer="odata.maxpagesize=10"
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["value"]) <= 10
        seen.extend(item["Guid"] for item in page["value"])
        pages += 1
        url = page.get("@odata.nextLink")
        if url is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 29


def test_select_and_result_size_and_type_filters(invoker: Invoker) -> None:
    response = invoker.post(
        "Get-Recipient", {"ResultSize": 5}, url=invoker.endpoint + "?$select=PrimarySmtpAddress,Guid"
    )
    page = response.json()
    assert len(page["value"]) == 5 and "@odata.nextLink" not in page
    assert set(page["value"][0]) == {"PrimarySmtpAddress", "Guid"}
    mailboxes = invoker.post("Get-Mailbox", {"ResultSize": "Unlimited"}).json()["value"]
    assert {item["RecipientTypeDetails"] for item in mailboxes} == {"UserMailbox"}
    assert len(mailboxes) == 2
    contacts = invoker.post("Get-Recipient", {"RecipientTypeDetails": ["MailContact"]}).json()
    assert [item["Alias"] for item in contacts["value"]] == ["cloud_only_contact"]


def test_recipient_shape_and_identity_resolution(invoker: Invoker) -> None:
    item = invoker.post("Get-Recipient", {"Identity": "cloud_mailbox"}).json()["value"][0]
    assert item["RecipientType"] == "UserMailbox"
    assert item["IsDirSynced"] is True and item["IsExchangeCloudManaged"] is True
    assert item["EmailAddresses"][0] == "SMTP:cloud_mailbox@example.test"
    assert "smtp:cloud_mailbox.alt@example.test" in item["EmailAddresses"]
    for key in ("Guid", "ExternalDirectoryObjectId", "PrimarySmtpAddress", "Alias", "Name"):
        found = invoker.post("Get-Recipient", {"Identity": item[key].upper()}).json()["value"]
        assert [match["Guid"] for match in found] == [item["Guid"]], key


def test_set_then_get_round_trip(invoker: Invoker) -> None:
    identity = "cloud_only_mailuser@example.test"
    response = invoker.post(
        "Set-MailUser",
        {
            "Identity": identity,
            **typed("UserCertificate", CERT_A, CERT_B),
            **typed("UserSMimeCertificate", CERT_B),
        },
    )
    assert response.status_code == 200 and response.json()["value"] == []
    item = invoker.post("Get-MailUser", {"Identity": identity}).json()["value"][0]
    assert item["UserCertificate"] == [CERT_A, CERT_B]
    assert item["UserSMimeCertificate"] == [CERT_B]
    edit = {"@odata.type": "#Exchange.GenericHashTable", "Remove": [{"Data": CERT_A}]}
    invoker.post("Set-MailUser", {"Identity": identity, "UserCertificate": edit})
    again = invoker.post("Set-MailUser", {"Identity": identity, **typed("UserCertificate", CERT_B)})
    assert "no settings" in again.json()["@adminapi.warnings"][0]
    invoker.post("Set-MailUser", {"Identity": identity, "UserSMimeCertificate": None})
    item = invoker.post("Get-MailUser", {"Identity": identity}).json()["value"][0]
    assert item["UserCertificate"] == [CERT_B] and item["UserSMimeCertificate"] == []


def _detail(response) -> str:
    return response.json()["error"]["details"][0]["message"]


def test_dirsynced_mailbox_write_is_a_conflict(invoker: Invoker) -> None:
    response = invoker.post("Set-Mailbox", {"Identity": "synced_mailbox", **typed("UserCertificate", CERT_A)})
    assert response.status_code == 400
    code, exception_type, text = _detail(response).split("|", 2)
    assert code.startswith("Ex") and exception_type == "System.InvalidOperationException"
    assert "out of the current user's write scope" in text
    assert "synchronized from your on-premises organization" in text
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "details", "innererror"}
    item = invoker.post("Get-Mailbox", {"Identity": "synced_mailbox"}).json()["value"][0]
    assert item["UserCertificate"] == []


def test_cloud_managed_mailbox_write_is_accepted(invoker: Invoker) -> None:
    response = invoker.post(
        "Set-Mailbox", {"Identity": "cloud_mailbox", **typed("UserSMimeCertificate", CERT_A)}
    )
    assert response.status_code == 200, response.text
    item = invoker.post("Get-Mailbox", {"Identity": "cloud_mailbox"}).json()["value"][0]
    assert item["UserSMimeCertificate"] == [CERT_A]


def test_cmdlet_must_match_recipient_type(invoker: Invoker) -> None:
    response = invoker.post(
        "Set-MailContact", {"Identity": "cloud_mailbox", **typed("UserCertificate", CERT_A)}
    )
    assert response.status_code == 404
    assert "ManagementObjectNotFoundException" in _detail(response)
    ok = invoker.post(
        "Set-MailContact", {"Identity": "cloud_only_contact", **typed("UserCertificate", CERT_A)}
    )
    assert ok.status_code == 200


def test_unknown_identity_and_bad_parameters(invoker: Invoker) -> None:
    missing = invoker.post("Get-Recipient", {"Identity": "nobody@example.test"})
    assert missing.status_code == 404
    assert "couldn't be found" in _detail(missing)
    bad = invoker.post(
        "Set-MailUser", {"Identity": "cloud_only_mailuser", **typed("UserCertificate", "not base64!")}
    )
    assert bad.status_code == 400
    assert "ParameterBindingException" in _detail(bad) and "System.Byte[]" in _detail(bad)
    unknown = invoker.post("Set-MailUser", {"Identity": "cloud_only_mailuser", "Nope": 1})
    assert "matches parameter name 'Nope'" in _detail(unknown)
    not_ours = invoker.post("Remove-Mailbox", {"Identity": "x"})
    assert not_ours.status_code == 400 and "CommandNotFoundException" in _detail(not_ours)


def test_header_checks(invoker: Invoker) -> None:
    mismatch = invoker.post("Get-Recipient", {"ResultSize": 1}, **{"X-CmdletName": "Set-Mailbox"})
    assert mismatch.status_code == 400
    no_anchor = invoker.post("Get-Recipient", {"ResultSize": 1}, **{"X-AnchorMailbox": ""})
    assert no_anchor.status_code == 400
    echoed = invoker.post("Get-Recipient", {"ResultSize": 1}, **{"client-request-id": "abc-123"})
    assert echoed.headers["client-request-id"] == "abc-123"


def test_rate_budget_answers_429_with_retry_after(emulator: EmulatorProcess, invoker: Invoker) -> None:
    emulator.control.set_config(rate_per_s=0.5, burst=2)
    statuses = [invoker.post("Get-Recipient", {"ResultSize": 1}) for _ in range(4)]
    assert [response.status_code for response in statuses] == [200, 200, 429, 429]
    throttled = statuses[2]
    assert int(throttled.headers["Retry-After"]) >= 1
    assert throttled.headers["Rate-Limit-Remaining"] == "0"
    reset = dt.datetime.fromisoformat(throttled.headers["Rate-Limit-Reset"].replace("Z", "+00:00"))
    assert reset > dt.datetime.now(dt.UTC)  # a timestamp, as the service sends it
    assert statuses[0].headers["Rate-Limit-Remaining"] == "1"


def test_concurrency_cap_answers_plain_text_429(emulator: EmulatorProcess, invoker: Invoker) -> None:
    emulator.control.set_config(max_concurrency=2, latency_ms=500)
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def call() -> None:
        response = invoker.post("Get-Recipient", {"ResultSize": 1})
        with lock:
            results.append((response.status_code, response.text))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = [text for status, text in results if status == 200]
    refused = [text for status, text in results if status == 429]
    assert len(accepted) == 2 and len(refused) == 3
    assert refused[0].startswith("You have reached the maximum number of concurrent requests")


def test_fault_injection_by_cmdlet(emulator: EmulatorProcess, invoker: Invoker) -> None:
    emulator.control.inject_fault(cmdlet="Set-MailUser", count=2, status=503, retry_after=3)
    params = {"Identity": "bulk00", **typed("UserCertificate", CERT_A)}
    first = invoker.post("Set-MailUser", params)
    assert first.status_code == 503 and first.headers["Retry-After"] == "3"
    assert invoker.post("Get-Recipient", {"ResultSize": 1}).status_code == 200
    assert invoker.post("Set-MailUser", params).status_code == 503
    assert invoker.post("Set-MailUser", params).status_code == 200
    emulator.control.inject_fault(
        cmdlet="*",
        count=1,
        status=400,
        exception_type="Microsoft.Exchange.Data.DataValidationException",
        text="Injected validation failure.",
    )
    given = invoker.post("Get-Recipient", {"ResultSize": 1})
    assert given.status_code == 400
    assert "DataValidationException|Injected validation failure." in _detail(given)


def test_a_held_call_is_the_one_refused_while_others_pass(
    emulator: EmulatorProcess, invoker: Invoker
) -> None:
    emulator.control.hold(cmdlet="Get-MailUser", count=1, before_ms=1500, then_status=503)
    results: dict[str, int] = {}
    lock = threading.Lock()

    def call(identity: str) -> None:
        response = invoker.post("Get-MailUser", {"Identity": identity})
        with lock:
            results[identity] = response.status_code

    held = threading.Thread(target=call, args=("bulk00",))
    held.start()
    while emulator.control.config()["holds"][0]["count"]:
        time.sleep(0.05)  # until the first call has taken the hold
    call("bulk01")  # a concurrent call meanwhile goes through
    held.join()
    assert results == {"bulk00": 503, "bulk01": 200}
    assert [e["identity"] for e in emulator.control.requests()][-2:] == ["bulk01", "bulk00"]


def test_request_log(emulator: EmulatorProcess, invoker: Invoker) -> None:
    emulator.control.clear_requests()
    invoker.post("Get-MailUser", {"Identity": "bulk01"}, **{"client-request-id": "log-1"})
    invoker.post("Get-MailUser", {"Identity": "ghost"}, **{"client-request-id": "log-2"})
    entries = emulator.control.requests()
    assert [(e["cmdlet"], e["identity"], e["status"], e["client_request_id"]) for e in entries] == [
        ("Get-MailUser", "bulk01", 200, "log-1"),
        ("Get-MailUser", "ghost", 404, "log-2"),
    ]
    assert entries[0]["client_id"] == SECRET_CLIENT and entries[0]["timestamp"]
    assert emulator.control.clear_requests() == 2
    assert emulator.control.requests() == []


def test_state_persists_across_restart(tmp_path: Path) -> None:
    home = tmp_path / "restart"
    register_client(home, SECRET_CLIENT, secret=CLIENT_SECRET)
    seed_from_directory(
        home=home, users=[directory_user("keeper")], shares=ONLY["cloud_only_mailuser"], seed=1
    )
    with EmulatorProcess(home=home) as first:
        tenant = first.tenant_id
        app = _app(first, SECRET_CLIENT, CLIENT_SECRET)
        token = app.acquire_token_for_client(scopes=SCOPE)["access_token"]
        invoker = Invoker(url=first.url, tenant=tenant, ca_file=first.ca_file, token=token)
        assert (
            invoker.post(
                "Set-MailUser", {"Identity": "keeper", **typed("UserCertificate", CERT_A)}
            ).status_code
            == 200
        )
    assert not (home / "endpoint.json").exists()
    with EmulatorProcess(home=home) as second:
        assert second.tenant_id == tenant
        # A token issued before the restart is still honoured: the signing key is persistent.
        invoker = Invoker(url=second.url, tenant=tenant, ca_file=second.ca_file, token=token)
        item = invoker.post("Get-MailUser", {"Identity": "keeper"}).json()["value"][0]
        assert item["UserCertificate"] == [CERT_A]


def test_config_command_changes_the_running_emulator(emulator: EmulatorProcess) -> None:
    result = CliRunner().invoke(
        emulator_cli,
        [
            "config",
            "--home",
            str(emulator.home),
            "--rate",
            "3",
            "--burst",
            "4",
            "--max-concurrency",
            "5",
            "--latency-ms",
            "1",
            "--fault",
            "Set-Mailbox:2:504",
        ],
    )
    assert result.exit_code == 0, result.output
    config = emulator.control.config()
    assert (config["rate_per_s"], config["burst"], config["max_concurrency"]) == (3, 4, 5)
    assert config["faults"][0]["cmdlet"] == "Set-Mailbox" and config["faults"][0]["status"] == 504
    with pytest.raises(ValueError, match="burst"):
        emulator.control.set_config(burst=0)
    cleared = CliRunner().invoke(
        emulator_cli, ["config", "--home", str(emulator.home), "--rate", "0", "--clear-faults"]
    )
    assert cleared.exit_code == 0, cleared.output
    assert emulator.control.config()["rate_per_s"] is None
    assert emulator.control.config()["faults"] == []


def test_state_endpoint_lists_recipients_without_secrets(emulator: EmulatorProcess) -> None:
    state = emulator.control.state()
    assert state["tenant_id"] == emulator.tenant_id
    assert set(state["clients"]) == {SECRET_CLIENT, CERT_CLIENT}
    assert len(state["recipients"]) == 29
    # Clients are listed by id only: neither a secret nor its hash leaves the emulator.
    assert all(isinstance(client, str) for client in state["clients"])
    assert "secret" not in json.dumps(state).lower()


def test_token_endpoint_faults_are_remembered_by_msal(emulator: EmulatorProcess) -> None:
    emulator.control.inject_fault(cmdlet="token", count=1, status=429, retry_after=30)
    app = _app(emulator, SECRET_CLIENT, CLIENT_SECRET)
    throttled = app.acquire_token_for_client(scopes=SCOPE)
    assert throttled["error"] == "temporarily_unavailable" and throttled["error_codes"] == [90033]
    # msal keeps the 429 until Retry-After passes, without asking the endpoint again.
    emulator.control.clear_requests()
    again = app.acquire_token_for_client(scopes=SCOPE)
    assert "access_token" not in again
    assert [e for e in emulator.control.requests() if e["endpoint"] == "token"] == []
    fresh = _app(emulator, SECRET_CLIENT, CLIENT_SECRET).acquire_token_for_client(scopes=SCOPE)
    assert "access_token" in fresh


def test_scope_must_name_exchange_or_the_emulator(emulator: EmulatorProcess) -> None:
    app = _app(emulator, SECRET_CLIENT, CLIENT_SECRET)
    own = app.acquire_token_for_client(scopes=[f"{emulator.url}/.default"])
    assert "access_token" in own
    graph = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
    assert graph["error"] == "invalid_scope" and graph["error_codes"] == [1002012]


def test_strict_mode_refuses_shapes_the_module_never_sends(
    emulator: EmulatorProcess, invoker: Invoker
) -> None:
    bare = {"Identity": "bulk02", "UserCertificate": [CERT_A]}
    refused = invoker.post("Set-MailUser", bare)
    assert refused.status_code == 400 and "ParameterBindingException" in _detail(refused)
    assert refused.headers["x-ExceptionType"] == "ParameterBindingException"
    assert refused.json()["error"]["message"] == "Error executing cmdlet"
    ints = {"Identity": "bulk02", **typed("UserCertificate"), "UserCertificate": [{"Data": [48, 130, 1]}]}
    assert invoker.post("Set-MailUser", ints).status_code == 200
    emulator.control.set_config(strict=False, read_value_shape="data_ints")
    assert invoker.post("Set-MailUser", bare).status_code == 200
    item = invoker.post("Get-MailUser", {"Identity": "bulk02"}).json()["value"][0]
    assert item["UserCertificate"] == [{"Data": list(base64.b64decode(CERT_A))}]


def test_config_command_sets_the_switchable_unknowns(emulator: EmulatorProcess) -> None:
    home = str(emulator.home)
    args = ["config", "--home", home, "--set", "read_value_shape=data_ints", "--set", "strict=false"]
    result = CliRunner().invoke(
        emulator_cli, [*args, "--set", "concurrency_status=503", "--set", "read_lag_s=2"]
    )
    assert result.exit_code == 0, result.output
    config = emulator.control.config()
    assert (config["read_value_shape"], config["strict"], config["concurrency_status"]) == (
        "data_ints",
        False,
        503,
    )
    assert config["read_lag_s"] == 2
    bad = CliRunner().invoke(emulator_cli, ["config", "--home", home, "--set", "read_value_shape=xml"])
    assert bad.exit_code != 0 and "read_value_shape must be one of" in bad.output
