"""The synthetic PKI (cheap, deterministic issuance), the process pool, reports and the bench."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from certsync.certificates.parallel import ValidationPool, validate_many
from certsync.certificates.parse import load_certificate
from certsync.certificates.report import expiring_soon
from certsync.certificates.trust import TrustSpec
from certsync.certificates.validate import Validator
from certsync.certificates.verdict import verdict_rows
from certsync_lab.pki import Pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def key_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


def test_same_seed_and_key_cache_give_the_same_population(key_cache: Path):
    first = Pki(algorithm="rsa", seed=5, key_cache=key_cache)
    second = Pki(algorithm="rsa", seed=5, key_cache=key_cache)
    ders = [first.issue(email=f"u{i}@example.org") for i in range(5)]
    assert ders == [second.issue(email=f"u{i}@example.org") for i in range(5)]
    other_stream = Pki(algorithm="rsa", seed=5, key_cache=key_cache, serial_stream=1)
    assert other_stream.ca_der("intermediate") == first.ca_der("intermediate")
    assert other_stream.issue(email="u0@example.org") != ders[0]
    assert all((key_cache / name).stat().st_mode & 0o077 == 0 for name in
               [p.name for p in key_cache.iterdir()])  # fmt: skip


def test_issuing_is_cheap_because_leaf_keys_are_pooled(key_cache: Path):
    pki = Pki(algorithm="ec", seed=5, key_cache=key_cache, leaf_pool_size=3)
    ders = [pki.issue(email=f"u{i}@example.org") for i in range(600)]
    keys = {load_certificate(d).public_key().public_numbers() for d in ders}
    assert len(keys) == 3
    assert len({load_certificate(d).serial_number for d in ders}) == 600


def test_pool_gives_the_same_verdicts_in_order(tmp_path: Path):
    pki = Pki(algorithm="ec", seed=9)
    ders = [pki.issue(email=f"u{i}@example.org", revoked=i % 7 == 0) for i in range(240)]
    ders += [b"junk", pki.issue(email="x@example.org", issuer="unknown")]
    files = pki.write_trust_files(tmp_path)
    spec = TrustSpec(anchors=files.anchors, intermediates=(files.intermediates,),
                     crls=tuple(files.crls))  # fmt: skip
    items = [("userCertificate", d) for d in ders]
    pooled = validate_many(items, trust=spec, at=pki.now, processes=2, batch_size=100)
    validator = Validator(trust=spec.load())
    serial = [validator.check(attribute=a, value=v, at=pki.now) for a, v in items]
    assert pooled == serial
    assert [v.reason for v in pooled].count("revoked") == 35
    assert pooled[-2].reason == "malformed" and pooled[-1].reason == "unknown_issuer"


def test_pool_encodes_in_the_workers_and_overlaps_chunks(tmp_path: Path):
    """The pipeline's way: chunks submitted before the previous one is read back, each batch's
    verdicts turned into stored rows in the worker; the rows are those of the one-process verdicts."""
    pki = Pki(algorithm="rsa", seed=3)
    expired = pki.issue(email="old@example.org", not_after=pki.now - timedelta(days=1),
                        not_before=pki.now - timedelta(days=30))  # fmt: skip
    ders = [pki.issue(email=f"u{i}@example.org", revoked=i % 5 == 0) for i in range(90)]
    items = [("userCertificate", d) for d in [*ders, expired, b"junk"]]
    files = pki.write_trust_files(tmp_path)
    spec = TrustSpec(anchors=files.anchors, intermediates=(files.intermediates,),
                     crls=tuple(files.crls))  # fmt: skip
    with ValidationPool(trust=spec, at=pki.now, processes=2, batch_size=20) as pool:
        first = pool.submit(items[:50], encode=verdict_rows)
        second = pool.submit(items[50:], encode=verdict_rows)
        rows = first.result() + second.result()
        small = pool.submit(items[:3], encode=verdict_rows).result()  # on the running workers too
    validator = Validator(trust=spec.load())
    expected = verdict_rows(validator.check(attribute=a, value=v, at=pki.now) for a, v in items)
    assert rows == expected and small == expected[:3]
    assert [row[3] for row in rows].count("revoked") == 18
    assert rows[-2][3] == "expired" and rows[-1][3] == "malformed" and rows[1][2] is True


def test_expiring_soon_lists_valid_certificates_by_expiry(tmp_path: Path):
    pki = Pki(algorithm="ec", seed=4)
    ends = [5, 40, 2, 400]
    ders = [pki.issue(email=f"e{d}@example.org", not_after=pki.now + timedelta(days=d)) for d in ends]
    expired = pki.issue(email="old@example.org", not_after=pki.now - timedelta(days=1),
                        not_before=pki.now - timedelta(days=30))  # fmt: skip
    files = pki.write_trust_files(tmp_path)
    validator = Validator(trust=TrustSpec(anchors=files.anchors,
                                          intermediates=(files.intermediates,)).load())  # fmt: skip
    verdicts = [validator.check(attribute="userCertificate", value=d, at=pki.now)
                for d in [*ders, expired]]  # fmt: skip
    soon = expiring_soon(verdicts, at=pki.now, window=timedelta(days=30))
    assert [v.emails[0] for v in soon] == ["e2@example.org", "e5@example.org"]


def test_bench_smoke(tmp_path: Path):
    command = [sys.executable, str(REPO / "bench" / "bench_validation.py"), "--count", "200",
               "--processes", "1", "--home", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith(("RSA", "EC"))]
    assert [r[0] for r in rows] == ["RSA", "EC"]
    assert all(r[1] == "200" and r[2] == "200" for r in rows)
