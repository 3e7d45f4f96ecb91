"""certsync's Exchange client against the emulator in each plausible form of the real service: every
value shape on read, Get-Recipient with and without certificates, each status of the per-tenant
concurrency message, @adminapi.errors on a 200, read-after-write lag, a value cap, a denied cmdlet,
throttling, a token endpoint that fails, a service that is down. One emulator process; the
alternatives are switched on it between tests (strict request shapes throughout)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from emulator_support import directory_user

from certsync.cli import main as cli_main
from certsync.config import ExchangeSettings
from certsync.exchange.client import ExchangeClient
from certsync.exchange.errors import ExchangeError, ExchangeShapeError
from certsync.exchange.recipients import Recipient
from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.emulator.seed import Shares, seed_from_directory
from certsync_lab.emulator.state import register_client

pytestmark = pytest.mark.integration

CLIENT = "33333333-aaaa-4bbb-8ccc-000000000001"
SECRET = "client-test-secret-not-real"
DER_A = b"\x30\x82\x01\x0acertificate-a"
DER_B = b"\x30\x82\x01\x0bcertificate-b"
KINDS = {
    "mbx": Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=0),
    "mu": Shares(mailbox=0, mailuser=1, contact=0, missing=0, dirsynced=0),
    "ct": Shares(mailbox=0, mailuser=0, contact=1, missing=0, dirsynced=0),
    "synced": Shares(mailbox=1, mailuser=0, contact=0, missing=0, dirsynced=1, cloud_managed=0),
}
CMDLET = {"mbx": "Set-Mailbox", "mu": "Set-MailUser", "ct": "Set-MailContact", "synced": "Set-Mailbox"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    home = tmp_path_factory.mktemp("emulator-client")
    register_client(home, CLIENT, secret=SECRET)
    for name, shares in KINDS.items():
        seed_from_directory(home=home, users=[directory_user(name)], shares=shares, seed=3)
    with EmulatorProcess(home=home) as process:
        yield process


@pytest.fixture(autouse=True)
def _default_config(emulator: EmulatorProcess) -> Iterator[None]:
    emulator.control.reset_config()
    yield
    emulator.control.reset_config()


def _settings(emulator: EmulatorProcess, **changes: object) -> ExchangeSettings:
    values: dict = {
        "base_url": emulator.url,
        "tenant_id": emulator.tenant_id,
        "client_id": CLIENT,
        "authority_host": emulator.url,
        "client_secret": SECRET,
        "ca_file": str(emulator.ca_file),
        "timeout_s": 10.0,
        "max_attempts": 3,
    }
    return ExchangeSettings(**{**values, **changes})


@pytest.fixture(scope="module")
def client(emulator: EmulatorProcess) -> ExchangeClient:
    return ExchangeClient.connect(_settings(emulator))


def _id(emulator: EmulatorProcess, name: str) -> str:
    state = emulator.control.state()["recipients"]
    return next(
        r["ExternalDirectoryObjectId"] for r in state if r["PrimarySmtpAddress"].startswith(f"{name}@")
    )


def _sha(*values: bytes) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(v).digest() for v in values)


@pytest.mark.parametrize("shape", ["base64", "data_base64", "data_ints"])
@pytest.mark.parametrize("get_recipient_certificates", [True, False])
def test_writes_are_read_back_in_every_value_shape(
    emulator: EmulatorProcess, client: ExchangeClient, shape: str, get_recipient_certificates: bool
) -> None:
    emulator.control.set_config(read_value_shape=shape, get_recipient_certificates=get_recipient_certificates)
    for name in ("mbx", "mu", "ct"):
        outcome = client.set_certificates(
            cmdlet=CMDLET[name], identity=_id(emulator, name), user_certificate=[DER_A, DER_B],
            user_smime_certificate=[DER_B],
        )  # fmt: skip
        assert outcome.kind == "accepted", outcome
        held = client.held_certificates(_id(emulator, name), cmdlet=CMDLET[name])
        assert held == ((DER_A, DER_B), (DER_B,))
    read = {r.primary_smtp.split("@")[0]: r for r in map(Recipient.from_exchange, client.recipients())}
    assert set(read) == set(KINDS)
    for name in ("mbx", "mu", "ct"):
        assert (read[name].user_certificate, read[name].user_smime_certificate) == (
            _sha(DER_A, DER_B),
            _sha(DER_B),
        )
    assert read["synced"].is_dir_synced and not read["synced"].writable


def test_integer_byte_encoding_is_accepted_by_a_strict_service(emulator: EmulatorProcess) -> None:
    client = ExchangeClient.connect(_settings(emulator, byte_encoding="integers"))
    outcome = client.set_certificates(
        cmdlet="Set-MailUser",
        identity=_id(emulator, "mu"),
        user_certificate=[DER_B],
        user_smime_certificate=[],
    )
    assert outcome.kind == "accepted", outcome
    assert client.held_certificates(_id(emulator, "mu"), cmdlet="Set-MailUser") == ((DER_B,), ())


def test_a_type_name_instead_of_bytes_stops_the_read(
    emulator: EmulatorProcess, client: ExchangeClient
) -> None:
    client.set_certificates(
        cmdlet="Set-Mailbox",
        identity=_id(emulator, "mbx"),
        user_certificate=[DER_A],
        user_smime_certificate=[],
    )
    emulator.control.set_config(read_value_shape="type_name")
    with pytest.raises(ExchangeShapeError, match="type name"):
        [Recipient.from_exchange(obj) for obj in client.recipients()]
    with pytest.raises(ExchangeShapeError, match="certsync probe"):
        client.held_certificates(_id(emulator, "mbx"), cmdlet="Set-Mailbox")


def test_refusals_are_classified_by_exception_type(emulator: EmulatorProcess, client: ExchangeClient) -> None:
    synced = client.set_certificates(
        cmdlet="Set-Mailbox",
        identity=_id(emulator, "synced"),
        user_certificate=[DER_A],
        user_smime_certificate=[],
    )
    assert (synced.kind, synced.code, synced.audit_outcome) == (
        "conflict",
        "InvalidOperationException",
        "conflict",
    )
    missing = client.set_certificates(
        cmdlet="Set-MailUser", identity=_id(emulator, "mbx"), user_certificate=[], user_smime_certificate=[]
    )
    assert (missing.kind, missing.code) == ("not_found", "ManagementObjectNotFoundException")
    emulator.control.set_config(max_values=1)
    capped = client.set_certificates(
        cmdlet="Set-MailUser",
        identity=_id(emulator, "mu"),
        user_certificate=[DER_A, DER_B],
        user_smime_certificate=[],
    )
    assert (capped.kind, capped.code) == ("bad_parameter", "DataValidationException")


def test_adminapi_errors_on_a_200_are_failures(emulator: EmulatorProcess, client: ExchangeClient) -> None:
    emulator.control.set_config(adminapi_errors_on_200=True, max_values=1)
    synced = client.set_certificates(
        cmdlet="Set-Mailbox",
        identity=_id(emulator, "synced"),
        user_certificate=[DER_A],
        user_smime_certificate=[],
    )
    assert (synced.status, synced.kind) == (200, "conflict")
    capped = client.set_certificates(
        cmdlet="Set-MailUser",
        identity=_id(emulator, "mu"),
        user_certificate=[DER_A, DER_B],
        user_smime_certificate=[],
    )
    assert (capped.status, capped.kind, capped.audit_outcome) == (200, "bad_parameter", "rejected")


def test_a_denied_cmdlet_answers_nul_bytes_and_is_a_permission_refusal(
    emulator: EmulatorProcess, client: ExchangeClient
) -> None:
    emulator.control.set_config(denied_cmdlets=["Set-MailContact"])
    outcome = client.set_certificates(
        cmdlet="Set-MailContact", identity=_id(emulator, "ct"), user_certificate=[], user_smime_certificate=[]
    )
    assert (outcome.status, outcome.kind) == (403, "permission")
    assert "NUL bytes" in (outcome.detail or "")


def test_the_get_cmdlets_read_at_once_come_in_cmdlet_order_and_a_failed_one_surfaces(
    emulator: EmulatorProcess,
) -> None:
    """client.recipients runs Get-Mailbox, Get-MailUser and Get-MailContact side by side, each a page
    ahead (one recipient a page here): the objects still come one cmdlet after another, and a cmdlet
    that fails raises its error to the reader, with no read left running."""
    one_a_page = ExchangeClient.connect(_settings(emulator, page_size=1))
    kinds = [obj["RecipientTypeDetails"] for obj in one_a_page.recipients()]
    assert kinds == ["UserMailbox", "UserMailbox", "MailUser", "MailContact"]
    emulator.control.set_config(denied_cmdlets=["Get-MailUser"])
    before = threading.active_count()
    read = one_a_page.recipients()
    with pytest.raises(ExchangeError, match="Get-MailUser failed"):
        list(read)
    assert threading.active_count() == before


@pytest.mark.parametrize("status", [429, 503, 400])
def test_the_concurrency_message_is_throttling_whatever_its_status(
    emulator: EmulatorProcess, status: int
) -> None:
    # A client of its own: the module's client may still hold a window of 1 from an earlier case,
    # and then never sends two requests at once.
    client = ExchangeClient.connect(_settings(emulator))
    emulator.control.set_config(max_concurrency=1, latency_ms=300, concurrency_status=status)
    decreases = client.throttle.decreases
    outcomes = []

    def write() -> None:
        outcomes.append(
            client.set_certificates(
                cmdlet="Set-MailUser",
                identity=_id(emulator, "mu"),
                user_certificate=[DER_A],
                user_smime_certificate=[],
            )
        )

    threads = [threading.Thread(target=write) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kinds = sorted(o.kind for o in outcomes)
    assert "accepted" in kinds and "throttled" in kinds, outcomes
    assert all(o.code == "ConcurrencyLimit" for o in outcomes if o.kind == "throttled")
    assert client.throttle.decreases > decreases  # the window and pace came down


def test_reads_lag_writes_and_retries_keep_one_request_id(
    emulator: EmulatorProcess, client: ExchangeClient
) -> None:
    identity = _id(emulator, "mbx")
    client.set_certificates(
        cmdlet="Set-Mailbox", identity=identity, user_certificate=[], user_smime_certificate=[]
    )
    emulator.control.set_config(read_lag_s=1.5)
    client.set_certificates(
        cmdlet="Set-Mailbox", identity=identity, user_certificate=[DER_A], user_smime_certificate=[]
    )
    assert client.held_certificates(identity, cmdlet="Set-Mailbox") == ((), ())  # not yet visible
    time.sleep(1.6)
    assert client.held_certificates(identity, cmdlet="Set-Mailbox") == ((DER_A,), ())
    emulator.control.clear_requests()
    emulator.control.inject_fault(cmdlet="Get-Mailbox", count=1, status=503, retry_after=0)
    emulator.control.inject_fault(cmdlet="Get-Mailbox", count=1, status=401)
    assert client.held_certificates(identity, cmdlet="Set-Mailbox") == ((DER_A,), ())
    calls = [e for e in emulator.control.requests() if e["endpoint"] == "InvokeCommand"]
    assert [c["status"] for c in calls] == [503, 401, 200]
    assert len({c["client_request_id"] for c in calls}) == 1  # one cmdlet call, however many tries


def test_rate_budget_is_honoured_with_retry_after(emulator: EmulatorProcess, client: ExchangeClient) -> None:
    emulator.control.set_config(rate_per_s=4, burst=2)
    started = time.monotonic()
    for _ in range(8):
        client.call("Get-MailUser", {"ResultSize": 1})
    assert time.monotonic() - started >= 1.0  # 8 calls on a 4/s budget with a burst of 2
    assert client.throttle.rate is not None  # pacing adopted once throttled


def test_token_endpoint_failures_are_retried_and_a_dead_service_opens_the_breaker(
    emulator: EmulatorProcess,
) -> None:
    client = ExchangeClient.connect(_settings(emulator, breaker_threshold=3))
    emulator.control.inject_fault(cmdlet="token", count=1, status=503)
    client.call("Get-MailUser", {"ResultSize": 1})  # one token failure, retried after a logged wait
    emulator.control.inject_fault(cmdlet="*", count=100, status=503)
    started = time.monotonic()
    for _ in range(3):
        outcome = client.set_certificates(
            cmdlet="Set-MailUser",
            identity=_id(emulator, "mu"),
            user_certificate=[],
            user_smime_certificate=[],
        )
        assert outcome.kind == "unavailable"
    assert client.breaker.open and "3 requests in a row" in client.breaker.describe()
    assert time.monotonic() - started < 5


def test_probe_reports_shapes_lag_and_restores(emulator: EmulatorProcess) -> None:
    """`certsync probe` on one recipient: the write shows after the lag, the original comes back."""
    identity = _id(emulator, "mu")
    client = ExchangeClient.connect(_settings(emulator))
    client.set_certificates(
        cmdlet="Set-MailUser", identity=identity, user_certificate=[DER_A], user_smime_certificate=[]
    )
    emulator.control.set_config(
        read_value_shape="data_ints", get_recipient_certificates=False, read_lag_s=1.0
    )
    env = {
        "AIRFLOW_CONN_CERTSYNC_EXCHANGE": json.dumps(
            {
                "conn_type": "certsync_exchange",
                "login": CLIENT,
                "password": SECRET,
                "host": "127.0.0.1",
                "port": int(emulator.url.rsplit(":", 1)[1]),
                "extra": {
                    "tenant_id": emulator.tenant_id,
                    "authority_host": emulator.url,
                    "ca_file": str(emulator.ca_file),
                },
            }
        )
    }
    result = CliRunner().invoke(cli_main, ["probe", identity, "--wait", "10", "--json"], env=env)
    assert result.exit_code == 0, result.output
    findings = json.loads(result.output)["findings"]
    assert findings["byte_encoding_accepted"] == "base64"
    assert findings["get_recipient_returns_certificates"] is False
    assert findings["value_shape_on_read"]["UserCertificate"] == "list of {Data: [int, ...]}"
    assert 0.5 <= findings["read_after_write_lag_s"] <= 10 and findings["restored"] is True
    assert findings["error_shape_not_found"]["code"] == "ManagementObjectNotFoundException"
    time.sleep(1.1)
    assert client.held_certificates(identity, cmdlet="Set-MailUser") == ((DER_A,), ())
