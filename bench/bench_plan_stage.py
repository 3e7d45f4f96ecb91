"""The plan stage of a first run, planned again and again on the same database.

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/bench_plan_stage.py --users 100000 --repeat 3 --between restart'

On the lab of `bench_cycle.py` (built once, kept), a new PostgreSQL cluster and the tenant as seeded,
one run goes through begin, extract, read_recipients and validate as a first run does; then the
plan (`pipeline.plan`, which clears the run's earlier plan) runs `--repeat` times in this process.
`--between` says what happens after validate, before the first plan:
- `none`: nothing, as in a first run;
- `checkpoint`: a CHECKPOINT, which ends the one that a 100,000-user first run's WAL starts;
- `restart`: PostgreSQL stopped and started again (the same data, its buffers empty and clean).
Printed per plan: wall seconds, CPU seconds of this process and of PostgreSQL's tree, and the WAL it
wrote. Samba serves LDAP on the fixed port 389: run it in a private network namespace. Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_cycle

BETWEEN = ("none", "checkpoint", "restart")


def owner_sql(stack: Any, statement: str, params: tuple[Any, ...] = ()) -> Any:
    """One statement as the database's owner, autocommitted; its first column of its first row."""
    import psycopg

    from certsync_lab.stack import DATABASE

    with psycopg.connect(stack.postgres.dsn_for(DATABASE), autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        row = cursor.fetchone() if cursor.description else None  # CHECKPOINT returns no rows
    return row[0] if row else None


def validated_run(services: Any) -> int:
    """A run through validate, as a first run goes (extract and read_recipients one after the other)."""
    from certsync import pipeline

    run_id = bench_cycle.begin_run(services, "plan bench")
    pipeline.extract(services, run_id=run_id)
    pipeline.read_recipients(services, run_id=run_id)
    pipeline.validate(services, run_id=run_id)
    return run_id


def settle(stack: Any, services: Any, between: str) -> None:
    if between == "checkpoint":
        owner_sql(stack, "CHECKPOINT")
    elif between == "restart":
        services.engine.dispose()
        stack.postgres.stop()
        stack.postgres.start()


def measure(users: int, repeat: int, between: str) -> None:
    from certsync import pipeline

    stack = bench_cycle.build(users)
    bench_cycle.start(stack, bench_cycle.BUDGET)
    try:
        services = bench_cycle.lab_services(stack, 0)
        run_id = validated_run(services)
        settle(stack, services, between)
        # After a restart PostgreSQL's processes are new: the trees are found again.
        roots = {k: v for k, v in bench_cycle.service_pids(stack).items() if k != "samba"}
        for _ in range(repeat):
            lsn = owner_sql(stack, "SELECT pg_current_wal_lsn()")
            with bench_cycle.StageSampler(roots=roots) as sampler:
                cpu = sampler.cpu_s()
                began = time.perf_counter()
                pipeline.plan(services, run_id=run_id, allow_mass_removal=True)
                seconds = time.perf_counter() - began
                used = {k: v - cpu[k] for k, v in sampler.cpu_s().items()}
            wal = float(owner_sql(stack, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)))
            print(
                f"plan {users} users ({between} between validate and the first plan) in {seconds:.2f} s;"
                f" CPU s: certsync {used['certsync']:.2f} postgres {used['postgres']:.2f};"
                f" WAL {wal / 2**20:.0f} MiB; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        services.engine.dispose()
    finally:
        stack.down()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20_000, help="the bench lab's size")
    parser.add_argument("--repeat", type=int, default=2, help="plan this many times")
    parser.add_argument("--between", choices=BETWEEN, default="none", help="after validate, before planning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    measure(args.users, args.repeat, args.between)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
