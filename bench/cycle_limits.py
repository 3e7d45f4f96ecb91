"""What each stage's system allows, measured on the same rows in the same run (bench_cycle.py):
a raw ldapsearch of the same entries and attributes, a raw paged read of the same recipients, a
raw parse of the certificates in the same values (and, shown beside it, the same parse with each
signature checked), and psql COPY of the same rows (in, and out where a stage reads)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from certsync.certificates.parse import USER_SMIME_CERTIFICATE
from certsync.directory import ATTRIBUTES
from certsync.directory.settings import USER_FILTER
from certsync.exchange.client import READ_CMDLETS, RECIPIENT_FIELDS

# The rows each database-bound stage writes (COPY in) or reads (COPY out), by table and run column.
STAGE_ROWS: dict[str, dict[str, list[tuple[str, str | None]]]] = {
    "extract": {"in": [("staging_user", "run_id"), ("staging_value", "run_id"), ("cert_blob", "first_run_id")], "out": []},
    "read_recipients": {"in": [("exo_recipient", "seen_run_id")], "out": []},
    "plan": {
        "in": [("planned_action", "run_id"), ("value_result", "run_id")],
        "out": [("source_user", None), ("source_value", None), ("cert_verdict", None), ("exo_recipient", "seen_run_id")],
    },
}  # fmt: skip


def ldapsearch(*, url: str, bind_dn: str, password_file: Path, base: str, page_size: int) -> dict[str, Any]:
    """ldapsearch -E pr=<page>/noprompt of the reader's filter and attributes; output counted only."""
    cmd = ["ldapsearch", "-x", "-LLL", "-H", url, "-D", bind_dn, "-y", str(password_file), "-b", base]
    cmd += ["-E", f"pr={page_size}/noprompt", USER_FILTER, *ATTRIBUTES]
    began = time.perf_counter()
    entries = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            entries += line.startswith(b"dn:")
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise RuntimeError(f"ldapsearch failed with {proc.returncode}")
    return {"items": entries, "seconds": seconds}


def password_file(home: Path, password: str) -> Path:
    path = home / "bench-bind.password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password)  # -y reads the file whole: no trailing newline
    return path


def raw_recipient_read(exchange: Any) -> dict[str, Any]:
    """The same paged Get-* requests read_recipients makes, JSON decoded, nothing else done."""
    began = time.perf_counter()
    count = sum(
        1
        for cmdlet in READ_CMDLETS
        for _ in exchange.read(cmdlet, {"ResultSize": "Unlimited"}, select=RECIPIENT_FIELDS)
    )
    return {"items": count, "seconds": time.perf_counter() - began}  # fmt: skip


def raw_parse(
    items: list[tuple[str, bytes]], *, signers: dict[x509.Name, Any] | None = None
) -> dict[str, Any]:
    """Each (attribute, value)'s certificates loaded and the fields any check needs read (names,
    serial, validity, extensions; cryptography decodes them lazily), one process: a
    userCertificate as DER, a userSMIMECertificate by cryptography's PKCS#7 loader, each certificate
    it holds. A value that does not load is counted, as validation refuses it. With `signers`
    (issuer_keys), each certificate that a configured CA issued also has its signature checked
    with that CA's key, nothing else: the one check a validation cannot skip."""
    began = time.perf_counter()
    failed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BER PKCS#7 and negative serials warn
        for attribute, value in items:
            try:
                if attribute == USER_SMIME_CERTIFICATE:
                    certs = pkcs7.load_der_pkcs7_certificates(value)
                else:
                    certs = [x509.load_der_x509_certificate(value)]
                for cert in certs:
                    _ = (
                        cert.subject,
                        cert.issuer,
                        cert.serial_number,
                        cert.not_valid_after_utc,
                        list(cert.extensions),
                    )
                    if signers is not None:
                        _signature_checked(cert, signers)
            except Exception:  # a malformed planted value counts as not parsed, as in validation
                failed += 1
    return {"items": len(items), "seconds": time.perf_counter() - began, "not_parsed": failed}


def issuer_keys(trust: Any) -> dict[x509.Name, Any]:
    """The public key of each configured anchor and intermediate, by its subject (a Name: the parse
    has read each certificate's issuer as one, and looking it up so is 1.2 us, by its encoding 2.0)."""
    return {ca.subject: ca.public_key() for ca in (*trust.anchors, *trust.intermediates)}


def _signature_checked(cert: x509.Certificate, signers: dict[x509.Name, Any]) -> None:
    key = signers.get(cert.issuer)
    if key is None:  # an unknown issuer: validation refuses it without a signature check
        return
    signature, signed = cert.signature, cert.tbs_certificate_bytes
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, cert.signature_algorithm_parameters, cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, cert.signature_algorithm_parameters)
        else:
            key.verify(signature, signed)
    except InvalidSignature:  # checked, and refused by validation; the value was parsed
        pass


# Each distinct (attribute, value) of the source view, ordered by the value's hash: a LIMIT takes a
# sample spread over the lab's values.
DISTINCT_VALUES = """
SELECT v.attribute, b.value FROM (SELECT DISTINCT attribute, sha256 FROM certsync.source_value) v
JOIN certsync.cert_blob b USING (sha256) ORDER BY v.sha256 LIMIT %(n)s
"""


def distinct_values(conn: Any, limit: int | None = None) -> list[tuple[str, bytes]]:
    """The values validation checks, as (attribute, value) pairs; `limit`: the first that many."""
    with conn.connection.driver_connection.cursor(binary=True) as rows:
        return [(a, bytes(v)) for a, v in rows.execute(DISTINCT_VALUES, {"n": limit})]


def one_process_check(items: list[tuple[str, bytes]], *, trust: Any, at: Any) -> dict[str, Any]:
    """Validator.check of (attribute, value) pairs in this one process, no database or pool: what a
    validation process costs per value on this machine, beside raw_parse in the same run. Two
    processes doing nothing else would validate at twice this rate, so the stage's ratio to its
    limit can reach at most 2 x this rate / raw_parse's rate here."""
    from certsync.certificates.validate import Validator

    validator = Validator(trust=trust)
    began, cpu = time.perf_counter(), time.process_time()
    for attribute, value in items:
        validator.check(attribute=attribute, value=value, at=at)
    return {"items": len(items), "seconds": time.perf_counter() - began, "cpu_s": time.process_time() - cpu}


def _psql(dsn: str, command: str) -> float:
    began = time.perf_counter()
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn, "-c", command], check=True)
    return time.perf_counter() - began


def _where(column: str | None, run_id: int) -> str:
    return f" WHERE {column} = {int(run_id)}" if column else ""


def copy_in(dsn: str, table: str, column: str | None, run_id: int) -> dict[str, Any]:
    """psql \\copy FROM of this run's rows of `table` into an empty copy of it with its indexes."""
    with tempfile.NamedTemporaryFile(suffix=".copy") as dump:
        _psql(dsn, f"\\copy (SELECT * FROM certsync.{table}{_where(column, run_id)}) TO '{dump.name}'")  # noqa: S608 - constant table names
        _psql(dsn, f"DROP TABLE IF EXISTS public.bench_{table}; CREATE TABLE public.bench_{table} (LIKE certsync.{table} INCLUDING DEFAULTS INCLUDING INDEXES)")  # fmt: skip
        seconds = _psql(dsn, f"\\copy public.bench_{table} FROM '{dump.name}'")
        rows = sum(1 for _ in open(dump.name, "rb"))  # noqa: SIM115 - counted once, closed by GC
        _psql(dsn, f"DROP TABLE public.bench_{table}")
    return {"items": rows, "seconds": seconds}


def copy_out(dsn: str, table: str, column: str | None, run_id: int) -> dict[str, Any]:
    seconds = _psql(dsn, f"\\copy (SELECT * FROM certsync.{table}{_where(column, run_id)}) TO '/dev/null'")  # noqa: S608 - constant table names
    return {"items": None, "seconds": seconds}


def copy_limits(dsn: str, run_id: int, *, tries: int = 1) -> dict[str, dict[str, Any]]:
    """Per database-bound stage: the COPY seconds of the rows it writes and reads, and the detail;
    each COPY timed `tries` times, its fastest kept."""
    found: dict[str, dict[str, Any]] = {}
    for stage, rows in STAGE_ROWS.items():
        parts = {f"in {t}": fastest(copy_in, dsn, t, c, run_id, tries=tries) for t, c in rows["in"]}
        parts |= {f"out {t}": fastest(copy_out, dsn, t, c, run_id, tries=tries) for t, c in rows["out"]}
        found[stage] = {"seconds": sum(p["seconds"] for p in parts.values()), "parts": parts, "tries": tries}
    return found


def fastest(measure: Callable[..., dict[str, Any]], *args: Any, tries: int, **kwargs: Any) -> dict[str, Any]:
    """`measure`'s figures from the fastest of `tries` calls: interference only slows a limit down."""
    best = min((measure(*args, **kwargs) for _ in range(tries)), key=lambda found: found["seconds"])
    return {**best, "tries": tries}
