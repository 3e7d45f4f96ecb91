"""`certsync validate`, run as users run it: one JSON verdict per value with every failing rule and
ISO 8601 times; exit 0 valid, 1 refused, 2 usage or trust configuration error; a light start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certsync_lab.pki import Pki, TrustFiles

AT = datetime(2026, 6, 1, tzinfo=UTC)
CERTSYNC = Path(sys.executable).with_name("certsync")  # the console script of this environment
# What `certsync validate` must never load: the pipeline's stack, web frameworks and Airflow.
HEAVY = ("sqlalchemy", "fastapi", "uvicorn", "starlette", "airflow", "ldap3", "msal", "requests",
         "yoyo", "tabulate", "pydantic", "certsync.pipeline", "certsync_lab")  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="module")
def pki(home: Path) -> Pki:
    return Pki(algorithm="ec", now=AT - timedelta(days=30), key_cache=home / "keys")


def _trust(pki: Pki, folder: Path) -> TrustFiles:
    # Written after issuing, so the CRLs list every revoked serial.
    return pki.write_trust_files(
        folder, crl_this_update=AT - timedelta(days=1), crl_next_update=AT + timedelta(days=7)
    )


def _issue(pki: Pki, email: str = "a@corp.example.test", **kw) -> bytes:  # type: ignore[no-untyped-def]
    kw.setdefault("not_before", AT - timedelta(days=1))
    kw.setdefault("not_after", AT + timedelta(days=90))
    return pki.issue(email=email, **kw)


def _certsync(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert CERTSYNC.exists(), f"{CERTSYNC} is not installed"
    return subprocess.run([CERTSYNC, *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _validate(folder: Path, trust: TrustFiles, *values: bytes, extra: tuple[str | Path, ...] = ()):  # type: ignore[no-untyped-def]
    files = []
    for n, value in enumerate(values):
        files.append(folder / f"value{n}.der")
        files[-1].write_bytes(value)
    args = [*files, "--anchors", trust.anchors, "--intermediates", trust.intermediates]
    args += [a for crl in trust.crls for a in ("--crl", crl)]
    result = _certsync("validate", *args, "--at", AT.isoformat(), *extra)
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    return result.returncode, verdicts, result.stderr


def test_valid_certificate_exits_zero_with_iso_8601_times(pki, home) -> None:
    der = _issue(pki)
    code, verdicts, _ = _validate(
        home, _trust(pki, home / "t1"), der, extra=("--email", "A@corp.example.test")
    )
    assert code == 0
    [verdict] = verdicts
    assert verdict["ok"] and verdict["failures"] == [] and verdict["reason"] is None
    for key in ("not_before", "not_after", "valid_until", "at"):
        assert "T" in verdict[key] and datetime.fromisoformat(verdict[key]).tzinfo is not None, key
    assert datetime.fromisoformat(verdict["not_before"]) == AT - timedelta(days=1)
    assert datetime.fromisoformat(verdict["at"]) == AT


def test_refused_values_exit_one_each_with_its_reason(pki, home) -> None:
    expired = _issue(pki, not_before=AT - timedelta(days=90), not_after=AT - timedelta(days=1))
    code, verdicts, _ = _validate(home, _trust(pki, home / "t2"), expired, b"not a certificate")
    assert code == 1
    assert [v["reason"] for v in verdicts] == ["expired", "malformed"]
    assert [[f["reason"] for f in v["failures"]] for v in verdicts] == [["expired"], ["malformed"]]


def test_every_failing_rule_is_listed_the_first_being_the_reason(pki, home) -> None:
    der = _issue(pki, email="faults@corp.example.test", key="ec-secp256k1", eku=None, revoked=True,
                 not_before=AT - timedelta(days=90), not_after=AT - timedelta(days=1))  # fmt: skip
    trust = _trust(pki, home / "t3")
    code, [verdict], _ = _validate(home, trust, der, extra=("--email", "someone.else@corp.example.test"))
    assert code == 1
    rules = [f["rule"] for f in verdict["failures"]]
    assert rules == ["enterprise.ec_curve", "enterprise.eku_email", "enterprise.validity",
                     "enterprise.not_revoked", "any.email_matches_user"]  # fmt: skip
    first = verdict["failures"][0]
    assert (first["reason"], first["rule"], first["detail"]) == (
        verdict["reason"],
        verdict["rule"],
        verdict["detail"],
    )
    assert [f["reason"] for f in verdict["failures"]] == [
        "weak_key", "no_email_protection_eku", "expired", "revoked", "email_mismatch",
    ]  # fmt: skip


def test_email_mismatch_is_the_reason_for_a_certificate_of_someone_else(pki, home) -> None:
    code, [verdict], _ = _validate(home, _trust(pki, home / "t4"), _issue(pki),
                                   extra=("--email", "someone.else@corp.example.test"))  # fmt: skip
    assert code == 1
    assert verdict["reason"] == "email_mismatch"
    assert [f["rule"] for f in verdict["failures"]] == ["any.email_matches_user"]


def test_several_anchor_files(pki, home) -> None:
    other = Pki(algorithm="ec", seed=1, now=AT - timedelta(days=30), key_cache=home / "keys")
    ours, theirs = _trust(pki, home / "ours"), _trust(other, home / "theirs")
    values = [home / "ours.der", home / "theirs.der"]
    values[0].write_bytes(_issue(pki))
    values[1].write_bytes(_issue(other))
    both = ("--anchors", ours.anchors, "--anchors", theirs.anchors,
            "--intermediates", ours.intermediates, "--intermediates", theirs.intermediates)  # fmt: skip
    result = _certsync("validate", *values, *both, "--at", AT.isoformat())
    assert result.returncode == 0, result.stdout + result.stderr
    assert [json.loads(line)["ok"] for line in result.stdout.splitlines()] == [True, True]
    only_ours = (
        "--anchors",
        ours.anchors,
        "--intermediates",
        ours.intermediates,
        "--intermediates",
        theirs.intermediates,
    )
    result = _certsync("validate", *values, *only_ours, "--at", AT.isoformat())
    assert result.returncode == 1
    assert [json.loads(line)["reason"] for line in result.stdout.splitlines()] == [None, "unknown_issuer"]


def test_an_empty_intermediates_file_means_none(pki, home) -> None:
    trust = _trust(pki, home / "t5")
    empty = home / "empty.pem"
    empty.write_bytes(b"")
    from_root, from_intermediate = home / "root-issued.der", home / "sub-issued.der"
    from_root.write_bytes(_issue(pki, issuer="root"))
    from_intermediate.write_bytes(_issue(pki))
    base = ("--anchors", trust.anchors, "--intermediates", empty, "--at", AT.isoformat())
    assert _certsync("validate", from_root, *base).returncode == 0
    result = _certsync("validate", from_intermediate, *base)
    assert result.returncode == 1 and json.loads(result.stdout)["reason"] == "unknown_issuer"


def test_usage_and_configuration_errors_exit_two_naming_the_option(pki, home) -> None:
    trust = _trust(pki, home / "t6")
    value = home / "leaf.der"
    value.write_bytes(_issue(pki))
    junk = home / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    notes = home / "notes.crl"
    notes.write_text("hello")
    blank = home / "blank.pem"
    blank.write_text("\n")
    anchors = ("--anchors", trust.anchors)
    cases = {
        "--at": (*anchors, "--at", "next tuesday"),
        "--anchors": ("--anchors", blank),
        "--intermediates": (*anchors, "--intermediates", junk),
        "--crl": (*anchors, "--crl", notes),
    }
    for option, args in cases.items():
        result = _certsync("validate", value, *args)
        assert result.returncode == 2, (option, result.stderr)
        assert f"'{option}'" in result.stderr and result.stdout == "", (option, result.stderr)
        assert "Traceback" not in result.stderr
    assert _certsync("validate", value).returncode == 2  # --anchors missing
    naive = _certsync(
        "validate", value, *anchors, "--intermediates", trust.intermediates, "--at", "2026-06-01"
    )
    assert naive.returncode == 0 and json.loads(naive.stdout)["at"] == "2026-06-01T00:00:00+00:00"
    assert _certsync("validate", home / "absent.der", *anchors).returncode == 2


@pytest.mark.parametrize("help_only", [True, False], ids=["help", "validation"])
def test_validate_imports_nothing_heavy(pki, home, help_only: bool) -> None:
    """What the real command imports, as Python reports it (-X importtime), not how long it takes."""
    if help_only:
        args: tuple[str | Path, ...] = ("--help",)
    else:
        trust = _trust(pki, home / "t7")
        (home / "one.der").write_bytes(_issue(pki))
        args = (home / "one.der", "--anchors", trust.anchors, "--intermediates", trust.intermediates,
                "--at", AT.isoformat())  # fmt: skip
    result = _certsync("validate", *args, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "certsync.cli" in imported
    top = {name.split(".")[0] for name in imported}
    assert not {h for h in HEAVY if h in imported or h in top}
    if help_only:  # the certificate stack loads only when something is validated
        assert "cryptography" not in top and "certsync.certificates.validate" not in imported
    else:
        assert "certsync.certificates.validate" in imported
