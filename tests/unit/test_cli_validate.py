"""`certsync validate`: one JSON verdict per value, exit status 1 when any value is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from certsync.cli import main
from certsync_lab.pki import Pki

AT = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Path]:
    pki = Pki(now=AT - timedelta(days=30), key_cache=tmp_path_factory.mktemp("keys"))
    return pki, tmp_path_factory.mktemp("trust")


def _run(pki: tuple[Pki, Path], *certs: bytes, extra: tuple[str, ...] = ()) -> tuple[int, list[dict]]:
    authority, folder = pki
    trust = authority.write_trust_files(
        folder, crl_this_update=AT - timedelta(days=1), crl_next_update=AT + timedelta(days=7)
    )
    files = []
    for n, der in enumerate(certs):
        files.append(folder / f"leaf{n}.der")
        files[-1].write_bytes(der)
    args = [*map(str, files), "--anchors", str(trust.anchors), "--intermediates", str(trust.intermediates)]
    args += [a for crl in trust.crls for a in ("--crl", str(crl))]
    result = CliRunner().invoke(main, ["validate", *args, "--at", AT.isoformat(), *extra])
    return result.exit_code, [json.loads(line) for line in result.output.splitlines()]


def test_valid_certificate_exits_zero(pki) -> None:
    der = pki[0].issue(
        email="a@corp.example.test", not_before=AT - timedelta(days=1), not_after=AT + timedelta(days=90)
    )
    code, verdicts = _run(pki, der, extra=("--email", "a@corp.example.test"))
    assert code == 0
    assert [v["ok"] for v in verdicts] == [True]


def test_each_refusal_has_a_reason_and_exit_one(pki) -> None:
    expired = pki[0].issue(
        email="a@corp.example.test", not_before=AT - timedelta(days=90), not_after=AT - timedelta(days=1)
    )
    code, verdicts = _run(pki, expired, b"not a certificate")
    assert code == 1
    assert [v["reason"] for v in verdicts] == ["expired", "malformed"]


def test_email_mismatch_is_reported_for_the_given_owner(pki) -> None:
    der = pki[0].issue(
        email="a@corp.example.test", not_before=AT - timedelta(days=1), not_after=AT + timedelta(days=90)
    )
    code, verdicts = _run(pki, der, extra=("--email", "someone.else@corp.example.test"))
    assert code == 1
    assert verdicts[0]["reason"] == "email_mismatch"
