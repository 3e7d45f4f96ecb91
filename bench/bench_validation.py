"""Certificate validation throughput: parse only vs full validation, per core, RSA and EC PKIs.

    python bench/bench_validation.py                  # 150,000 certificates per PKI
    python bench/bench_validation.py --count 2000     # quick run
    python bench/bench_validation.py --processes 2    # also measure a process pool

Populations are generated on a process pool and cached under --home (with the PKI keys), so the
second run starts measuring at once. The per-core rates count this process's CPU time, so other
work on the machine does not lower them; the pool's rate is wall time. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from certsync.certificates.facts import describe, extension_map
from certsync.certificates.parallel import validate_many
from certsync.certificates.parse import parse_value
from certsync.certificates.trust import TrustConfig, TrustSpec
from certsync.certificates.validate import Validator
from certsync_lab.pki import Pki

ATTRIBUTE = "userCertificate"
SEED = 2026


@dataclass(frozen=True)
class Result:
    pki: str
    count: int
    generate_s: float
    parse_per_s: float
    full_per_s: float
    pool_per_s: float | None
    processes: int
    valid: int


def _pki(algorithm: str, home: Path, stream: int = 0) -> Pki:
    return Pki(algorithm=algorithm, seed=SEED, key_cache=home / "keys", serial_stream=stream)


def _issue_chunk(args: tuple[str, str, int, int]) -> list[bytes]:
    algorithm, home, stream, count = args
    pki = _pki(algorithm, Path(home), stream)
    ders = []
    for i in range(count):
        # Spread validity like a real population: issued up to two years ago, valid for three.
        start = pki.now - timedelta(days=(i * 7919) % 700)
        ders.append(pki.issue(email=f"user{stream}-{i}@example.org", not_before=start,
                              not_after=start + timedelta(days=1095)))  # fmt: skip
    return ders


def _write(path: Path, ders: Sequence[bytes]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for der in ders:
            out.write(struct.pack(">I", len(der)))
            out.write(der)
    tmp.replace(path)


def _read(path: Path) -> list[bytes]:
    data, ders, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        ders.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return ders


def population(algorithm: str, count: int, home: Path, processes: int) -> tuple[list[bytes], float]:
    """The cached population, or a fresh one issued on `processes` workers."""
    _pki(algorithm, home)  # create and cache the CA keys once, before the workers race for them
    path = home / f"population-{algorithm}-{SEED}-{count}.bin"
    if path.exists():
        return _read(path), 0.0
    started = time.perf_counter()
    workers = max(1, processes)
    sizes = [count // workers + (1 if w < count % workers else 0) for w in range(workers)]
    jobs = [(algorithm, str(home), w + 1, n) for w, n in enumerate(sizes)]
    if workers == 1:
        ders = _issue_chunk(jobs[0])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            ders = [d for chunk in pool.map(_issue_chunk, jobs) for d in chunk]
    elapsed = time.perf_counter() - started
    _write(path, ders)
    return ders, elapsed


def measure_parse(ders: Sequence[bytes]) -> float:
    started = time.process_time()
    for der in ders:
        parsed = parse_value(attribute=ATTRIBUTE, value=der)
        cert = parsed.certificate
        if cert is not None:
            describe(cert, parsed.serial_number or 0, extension_map(cert), der=parsed.leaf)
    return len(ders) / (time.process_time() - started)


def measure_full(ders: Sequence[bytes], trust: TrustConfig, pki: Pki) -> tuple[float, int]:
    validator = Validator(trust=trust)
    started = time.process_time()
    valid = sum(validator.check(attribute=ATTRIBUTE, value=d, at=pki.now).ok for d in ders)
    return len(ders) / (time.process_time() - started), valid


def measure_pool(ders: Sequence[bytes], spec: TrustSpec, pki: Pki, processes: int) -> float:
    items = [(ATTRIBUTE, d) for d in ders]
    started = time.perf_counter()
    validate_many(items, trust=spec, at=pki.now, processes=processes, batch_size=1000)
    return len(ders) / (time.perf_counter() - started)


def run_one(algorithm: str, count: int, home: Path, processes: int) -> Result:
    ders, generate_s = population(algorithm, count, home, processes)
    pki = _pki(algorithm, home)
    files = pki.write_trust_files(home / f"trust-{algorithm}")
    trust = TrustConfig.load(anchors=files.anchors, intermediates=[files.intermediates],
                             crls=files.crls)  # fmt: skip
    parse_rate = measure_parse(ders)
    full_rate, valid = measure_full(ders, trust, pki)
    pool_rate = measure_pool(ders, trust.spec, pki, processes) if processes > 1 else None
    return Result(algorithm, len(ders), generate_s, parse_rate, full_rate, pool_rate, processes,
                  valid)  # fmt: skip


def table(results: Sequence[Result]) -> str:
    header = ("PKI", "certs", "valid", "generate s", "parse/s/core", "full/s/core",
              "full/parse", "pool/s", "pool/s/core")  # fmt: skip
    rows = [header]
    for r in results:
        pool = f"{r.pool_per_s:,.0f}" if r.pool_per_s else "-"
        per_core = f"{r.pool_per_s / r.processes:,.0f}" if r.pool_per_s else "-"
        generated = f"{r.generate_s:.1f}" if r.generate_s else "cached"
        rows.append((r.pki.upper(), f"{r.count:,}", f"{r.valid:,}", generated,
                     f"{r.parse_per_s:,.0f}", f"{r.full_per_s:,.0f}",
                     f"{r.full_per_s / r.parse_per_s:.2f}", pool, per_core))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=150_000, help="certificates per PKI")
    parser.add_argument("--pki", default="rsa,ec", help="comma-separated: rsa, ec")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="workers for generation and the pooled run (1: skip the pool)")  # fmt: skip
    parser.add_argument("--home", type=Path, default=Path(".certsync") / "bench",
                        help="cache directory for keys and populations")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.home.mkdir(parents=True, exist_ok=True)
    results = []
    for algorithm in [a.strip() for a in args.pki.split(",") if a.strip()]:
        results.append(run_one(algorithm, args.count, args.home, args.processes))
    print(f"certificate validation, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
