"""The validate stage alone, on a bench lab's real values, repeated with its verdicts cleared.

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/bench_validate_stage.py --users 20000 --setup'
    .venv/bin/python bench/bench_validate_stage.py --users 20000 --repeat 3 [--profile DIR | --no-database]

`--setup` starts the lab (bench_cycle's: a new PostgreSQL cluster, the directory as built), runs
begin and extract once and stops it; the run stays open, its id kept in the lab's
validate-run.json with the cluster's system identifier (make bench makes a new cluster for each
first run; then --setup is needed again, and the bench says so). Every later call starts only
PostgreSQL (and the emulator the settings name), empties certsync.cert_verdict (as the owner) and
runs `pipeline.validate` on that run `--repeat` times, printing wall and CPU seconds of
the bench process tree (itself and its validation workers) and of PostgreSQL's, the peak RSS of
each and the load average. With `--profile DIR`, each repetition is recorded by py-spy (workers
included) and its top frames printed. With `--no-database`, the same values are read once and each
repetition only checks them on the stage's pool, nothing read or saved meanwhile: what the stage
would take if the database cost nothing. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_cycle

# The sampler runs in the measured process: reading /proc four times a second cost about as much
# CPU as saving the verdicts; once a second keeps the peak RSS within a chunk's worth of values.
bench_cycle.SAMPLE_EVERY_S = 1.0

log = logging.getLogger("bench_validate_stage")


def relocate_samba(stack: Any) -> None:
    """A copied lab's smb.conf still names the original's directories (Samba would then run on the
    original's sam.ldb): point it at the copy, as SambaDC does when it restores a cached domain."""
    origin_file = stack.samba.home / "lab-origin"
    origin = origin_file.read_text().strip() if origin_file.exists() else str(stack.samba.home)
    if origin != str(stack.samba.home):
        conf = stack.samba.smb_conf
        conf.write_text(conf.read_text().replace(origin, str(stack.samba.home)))
        origin_file.write_text(f"{stack.samba.home}\n")


def setup(users: int) -> None:
    from certsync import pipeline

    stack = bench_cycle.build(users)
    relocate_samba(stack)
    bench_cycle.start(stack, bench_cycle.BUDGET)
    try:
        services = bench_cycle.lab_services(stack, 0)
        run_id = bench_cycle.begin_run(services, "validate bench")
        counts = pipeline.extract(services, run_id=run_id)
        cluster = cluster_id(services)
        services.engine.dispose()
    finally:
        stack.down()
    kept = {"run_id": run_id, "cluster": cluster, "extract": counts}
    (stack.home / "validate-run.json").write_text(json.dumps(kept))
    print(f"run {run_id}: {counts}")


def cluster_id(services: Any) -> int:
    """The PostgreSQL cluster's system identifier: a new one for each cluster initdb makes."""
    import sqlalchemy as sa

    with services.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT system_identifier FROM pg_control_system()")).scalar_one())


def clear_verdicts(stack: Any) -> None:
    import psycopg

    from certsync_lab.stack import DATABASE

    with psycopg.connect(stack.postgres.dsn_for(DATABASE), autocommit=True) as conn:
        conn.execute("TRUNCATE certsync.cert_verdict")
        conn.execute("CHECKPOINT")  # the previous repetition's writes are not flushed during the next


def run_values(services: Any, run_id: int) -> tuple[datetime, list[tuple[str, bytes]]]:
    """The run's validation time and the distinct (attribute, value) pairs the stage checks."""
    import cycle_limits

    from certsync.store import runs

    with services.engine.connect() as conn:
        return runs.run_info(conn, run_id).logical_date, cycle_limits.distinct_values(conn)


def yardsticks(services: Any, items: list[tuple[str, bytes]], at: datetime) -> tuple[float, float]:
    """CPU seconds of Validator.check over `items` in this one process, with no database, pool or
    verdict saving (the stage's own cost is judged against it in the same run), and the wall
    seconds of the stage's limit in `make bench` (cycle_limits.raw_parse)."""
    import cycle_limits

    checked = cycle_limits.one_process_check(items, trust=services.settings.trust.load(), at=at)
    return checked["cpu_s"], cycle_limits.raw_parse(items)["seconds"]


def reference_cpu_s(services: Any, run_id: int) -> tuple[int, float, float]:
    """The count of the run's values and the yardsticks of the stage on them."""
    at, items = run_values(services, run_id)
    return len(items), *yardsticks(services, items, at)


@contextlib.contextmanager
def lab_run(users: int) -> Iterator[tuple[Any, Any, int]]:
    """The kept lab's stack, certsync's Services on it and the run --setup began, with PostgreSQL
    (and the emulator the settings name; validate never calls it) running until the block ends."""
    stack = bench_cycle.build(users)
    kept = json.loads((stack.home / "validate-run.json").read_text())
    stack.postgres.start()
    stack.emulator.start()
    try:
        services = bench_cycle.lab_services(stack, 0)
        if kept.get("cluster") != cluster_id(services):
            # make bench makes a new cluster for each first run: the kept run id is another's, or none
            raise SystemExit(
                f"run {kept['run_id']} was set up in a database since replaced: run --setup again"
            )
        yield stack, services, kept["run_id"]
        services.engine.dispose()
    finally:
        stack.emulator.stop()
        stack.postgres.stop()


def measure(users: int, repeat: int, profile: Path | None) -> None:
    from certsync import pipeline

    with lab_run(users) as (stack, services, run_id):
        # The emulator is this process's child: a root of its own keeps it out of certsync's tree.
        roots = {k: v for k, v in bench_cycle.service_pids(stack).items() if k != "samba"}
        for i in range(repeat):
            clear_verdicts(stack)
            out = profile / f"validate-{i}.txt" if profile else None
            with bench_cycle.StageSampler(roots=roots) as sampler, bench_cycle.py_spy(out, subprocesses=True):
                sampler.stage = "validate"
                cpu, own = sampler.cpu_s(), time.process_time()
                began = time.perf_counter()
                counts = pipeline.validate(services, run_id=run_id)
                seconds = time.perf_counter() - began
                used = {k: v - cpu[k] for k, v in sampler.cpu_s().items()}
                own = time.process_time() - own  # this process alone: reading, saving, the pool's pipes
                sampler.sample()
            rss = sampler.peaks["validate"]
            count, ref_s, limit_s = reference_cpu_s(services, run_id)
            stage_s = used["certsync"] + used["postgres"]
            rate = counts["validated"] / seconds
            print(
                f"validate {counts['validated']} values ({counts['refused']} refused) in {seconds:.2f} s,"
                f" {rate:.0f}/s; CPU s: certsync {used['certsync']:.1f} (this process {own:.1f}) postgres {used['postgres']:.1f};"
                f" one-process check of the {count} values {ref_s:.1f} CPU s (stage/check {stage_s / ref_s:.2f});"
                f" limit (raw parse) {limit_s:.2f} s, ratio {limit_s / seconds:.2f};"
                f" peak RSS MiB: certsync {rss['certsync']:.0f} postgres {rss['postgres']:.0f};"
                f" load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if out is not None:
                for frame in bench_cycle.summarise_profile(out, top=15):
                    print("   ", frame)


def without_database(users: int, repeat: int) -> None:
    """The stage's pool on the same values with no database: the values read once beforehand, each
    repetition checking all of them on `validation_processes` workers, encoded as the stage saves
    them, and nothing saved. What the stage would take if reading and saving cost nothing."""
    from certsync.certificates.parallel import ValidationPool
    from certsync.certificates.verdict import verdict_rows
    from certsync.store import validation

    with lab_run(users) as (_, services, run_id):
        at, items = run_values(services, run_id)
    settings, chunk = services.settings, validation.CHUNK
    for _ in range(repeat):
        workers_cpu = _children_cpu_s()
        began, own = time.perf_counter(), time.process_time()
        with ValidationPool(trust=settings.trust, at=at, processes=settings.validation_processes) as pool:
            parts = [
                pool.submit(items[i : i + chunk], encode=verdict_rows) for i in range(0, len(items), chunk)
            ]
            checked = sum(len(part.result()) for part in parts)
        seconds, own = time.perf_counter() - began, time.process_time() - own
        workers_cpu = _children_cpu_s() - workers_cpu
        check_s, limit_s = yardsticks(services, items, at)
        print(
            f"no database: {checked} values in {seconds:.2f} s; CPU s: workers {workers_cpu:.1f} (one-process"
            f" check {check_s:.1f}) this process {own:.1f}; limit (raw parse) {limit_s:.2f} s,"
            f" ratio {limit_s / seconds:.2f}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


def _children_cpu_s() -> float:
    """CPU seconds of this process's ended children (the pool's workers, once it shut down)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20_000, help="the bench lab's size")
    parser.add_argument("--setup", action="store_true", help="begin and extract a run to validate")
    parser.add_argument("--repeat", type=int, default=2, help="validate this many times")
    parser.add_argument("--profile", type=Path, help="py-spy each repetition into this directory")
    parser.add_argument("--no-database", action="store_true", help="the pool alone on the same values")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.setup:
        setup(args.users)
        return 0
    if args.no_database:
        without_database(args.users, args.repeat)
        return 0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    measure(args.users, args.repeat, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
