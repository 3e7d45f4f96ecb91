"""Directory extraction: a full read next to a raw ldapsearch of the same entries, then a delta run
after a share of the users changed, and the extracting process's peak memory.

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/bench_extract.py --users 20000'

The first invocation builds the directory (users with certificates from the lab PKI, loaded into a
Samba AD DC living in --home) and keeps it; later invocations start that DC and measure at once. Samba
serves LDAP on the fixed port 389: run it in a private network namespace (above). Each measurement
runs in a child process of its own, so its peak RSS is its own. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".certsync" / "bench-extract"
AT = datetime(2026, 6, 1, tzinfo=UTC)
OU_NAME = "Bench"
log = logging.getLogger("bench_extract")


def _dc(home: Path):  # type: ignore[no-untyped-def]
    from certsync_lab.samba import SambaDC

    return SambaDC(home=home / "samba", cache_dir=REPO / ".certsync" / "test-cache" / "samba")


def build(home: Path, users: int) -> None:
    """Generate and load `users` users once; a marker file says the directory holds them."""
    marker = home / f"built-{users}"
    if marker.exists():
        return
    from certsync_lab.pki import Pki
    from certsync_lab.population import generate_population, load_population

    began = time.monotonic()
    population = generate_population(count=users, pki=Pki(seed=0, key_cache=home / "pki-keys"), seed=0, at=AT)
    generated = time.monotonic()
    with _dc(home) as dc:
        load_population(
            url=dc.ldap_url, bind_dn=dc.bind_dn, password=dc.password, ou_dn=_ou(dc), users=population
        )
    marker.write_text(json.dumps({"generate_s": generated - began, "load_s": time.monotonic() - generated}))
    log.info("built %d users in %.0f s (kept in %s)", users, time.monotonic() - began, home)


def _ou(dc) -> str:  # type: ignore[no-untyped-def]
    return f"OU={OU_NAME},{dc.base_dn}"


def _settings(dc, page_size: int):  # type: ignore[no-untyped-def]
    from certsync.directory import DirectorySettings

    return DirectorySettings(
        url=dc.ldap_url, bind_dn=dc.bind_dn, password=dc.password, base_dn=_ou(dc),
        allow_plain_bind=True, page_size=page_size, time_limit_s=600,
    )  # fmt: skip


def raw_ldapsearch(dc, page_size: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """ldapsearch -E pr=<page>/noprompt of the same filter and attributes, output counted, not kept."""
    from certsync.directory import ATTRIBUTES
    from certsync.directory.settings import USER_FILTER

    cmd = ["ldapsearch", "-x", "-LLL", "-H", dc.ldap_url, "-D", dc.bind_dn, "-y", str(_password_file(dc))]
    cmd += ["-b", _ou(dc), "-E", f"pr={page_size}/noprompt", USER_FILTER, *ATTRIBUTES]
    began = time.monotonic()
    entries = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            entries += line.startswith(b"dn:")  # "dn::" when the DN is base64 (non-ASCII names)
    elapsed = time.monotonic() - began
    if proc.returncode:
        raise RuntimeError(f"ldapsearch failed with {proc.returncode}")
    return {"entries": entries, "seconds": elapsed, "entries_per_s": entries / elapsed}


def _password_file(dc) -> Path:  # type: ignore[no-untyped-def]
    path = dc.home / "bench-bind.password"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(dc.password)  # -y reads the file whole: no trailing newline
    return path


# -- measurements, each in a child process ----------------------------------------------------------


def measure(kind: str, home: Path, dsn: str, page_size: int, run_key: str) -> dict[str, Any]:
    """One measurement in this (child) process: 'read' (the reader alone, no database), or an
    extract ('full' or 'delta') into PostgreSQL with COPY, merge and watermark."""
    from certsync.directory import DirectoryReader
    from certsync.store import db, runs, source

    dc = _dc(home)
    settings = _settings(dc, page_size)
    began = time.monotonic()
    if kind == "read":
        count = sum(1 for _ in DirectoryReader(settings=settings).iter_users())
        counts: dict[str, Any] = {"users": count}
    else:
        engine = db.create_engine(dsn)
        with engine.begin() as conn:
            run_id = runs.begin_run(
                conn, dag_id="bench-extract", airflow_run_id=run_key, logical_date=AT, mode=kind,
                dry_run=True, trust_fingerprint="-",
            )  # fmt: skip
        began = time.monotonic()
        with engine.begin() as conn:
            counts = source.extract(
                conn, reader=DirectoryReader(settings=settings), run_id=run_id, full_every=None
            )
    elapsed = time.monotonic() - began
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **counts,
        "seconds": elapsed,
        "entries_per_s": counts["users"] / elapsed,
        "peak_rss_mib": peak_kib / 1024,
    }


def _child(kind: str, home: Path, dsn: str, page_size: int, run_key: str) -> dict[str, Any]:
    args = [sys.executable, __file__, "--home", str(home), "--page-size", str(page_size)]
    args += ["--measure", kind, "--dsn", dsn, "--run-key", run_key]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measurement {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def churn(dc, share: float, seed: int) -> int:  # type: ignore[no-untyped-def]
    """Change `share` of the users: a new displayName (and so a new uSNChanged) each."""
    import ldap3

    conn = dc.connect()
    try:
        found = conn.extend.standard.paged_search(
            _ou(dc), "(&(objectClass=user)(!(objectClass=computer)))", attributes=["cn"], paged_size=1000
        )
        dns = [e["dn"] for e in found if e.get("type") == "searchResEntry"]
        picked = random.Random(seed).sample(dns, max(1, int(len(dns) * share)))
        stamp = datetime.now(UTC).isoformat()
        for dn in picked:
            conn.modify(dn, {"displayName": [(ldap3.MODIFY_REPLACE, [f"changed {stamp}"])]})
        return len(picked)
    finally:
        conn.unbind()


def run(home: Path, users: int, page_size: int, share: float) -> dict[str, Any]:
    from certsync.config import database_dsn
    from certsync_lab.postgres import EmbeddedPostgres
    from certsync_lab.stack import certsync_database

    build(home, users)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    with _dc(home) as dc, EmbeddedPostgres(data_dir=home / f"pg-{stamp}") as pg:
        dsn = database_dsn(certsync_database(pg, "certsync"))
        figures: dict[str, Any] = {"users": users, "page_size": page_size}
        figures["ldapsearch"] = raw_ldapsearch(dc, page_size)
        figures["read"] = _child("read", home, dsn, page_size, f"read-{stamp}")
        figures["ldapsearch_again"] = raw_ldapsearch(dc, page_size)  # the server's caches warm either way
        figures["full"] = _child("full", home, dsn, page_size, f"full-{stamp}")
        figures["changed"] = churn(dc, share, seed=int(time.time()))
        figures["delta"] = _child("delta", home, dsn, page_size, f"delta-{stamp}")
        figures["quiet_delta"] = _child("delta", home, dsn, page_size, f"quiet-{stamp}")
    raw = max(figures["ldapsearch"]["entries_per_s"], figures["ldapsearch_again"]["entries_per_s"])
    figures["read_vs_ldapsearch"] = figures["read"]["entries_per_s"] / raw
    figures["full_vs_ldapsearch"] = figures["full"]["entries_per_s"] / raw
    return figures


def report(f: dict[str, Any]) -> str:
    raw = f["ldapsearch"]
    rows = [
        f"users {f['users']}, page size {f['page_size']}",
        f"ldapsearch -E pr={f['page_size']}/noprompt: {raw['entries']} entries in {raw['seconds']:.2f} s"
        f" = {raw['entries_per_s']:,.0f}/s (again: {f['ldapsearch_again']['entries_per_s']:,.0f}/s)",
        f"reader only (LDAP + decoding):   {f['read']['users']} in {f['read']['seconds']:.2f} s"
        f" = {f['read']['entries_per_s']:,.0f}/s"
        f"  ratio {f['read_vs_ldapsearch']:.2f}  peak RSS {f['read']['peak_rss_mib']:.0f} MiB",
        f"full extract (+ COPY, merge):    {f['full']['entries_per_s']:,.0f}/s in {f['full']['seconds']:.1f} s"
        f"  ratio {f['full_vs_ldapsearch']:.2f}  peak RSS {f['full']['peak_rss_mib']:.0f} MiB",
        f"delta after {f['changed']} changed users: {f['delta']['seconds']:.2f} s ({f['delta']['users']} read,"
        f" peak RSS {f['delta']['peak_rss_mib']:.0f} MiB); without changes: {f['quiet_delta']['seconds']:.2f} s",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--churn", type=float, default=0.01, help="share of users changed before the delta")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--run-key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(
            json.dumps(measure(args.measure, args.home, args.dsn, args.page_size, args.run_key), default=str)
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.home.mkdir(parents=True, exist_ok=True)
    figures = run(args.home, args.users, args.page_size, args.churn)
    print(report(figures))
    if args.json:
        print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
