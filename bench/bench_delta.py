"""The delta cycle at 1% churn, with the recipients read whole and read as a delta, in one run.

Usage: bench/bench_delta.py [--users 20000] [--churn 0.01]

Uses bench_cycle's lab (a fresh database, the tenant as seeded, no Exchange budget) and its stage
measurement: a full run that publishes everything, then three delta runs after `--churn` of the
users changed each: "recipients whole" forgets the earlier reads of Exchange (certsync.exo_read) so
that its read_recipients reads every recipient, as every run did before delta reads of Exchange;
then a delta read with the default overlap of 30 minutes, which still covers the first run's
publish minutes before (every recipient it wrote is read again); then one with an overlap of one
minute (the emulator has no read lag), as a delta run meets Exchange when the previous run is
further back than the overlap. Prints each run's stages and writes delta.json into the
lab's directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cycle

# (label, changed_overlap_minutes; None: the earlier reads forgotten, so the read is whole)
DELTAS = (
    ("recipients whole", None),
    ("recipients delta, overlap 30 min", 30),
    ("recipients delta, overlap 1 min", 1),
)


def recipients_read(services: Any, run_id: int) -> dict[str, Any]:
    import sqlalchemy as sa

    with services.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT mode, why, read, recipients FROM certsync.exo_read WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    return dict(row._mapping)


def forget_recipient_reads(services: Any) -> None:
    import sqlalchemy as sa

    with services.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM certsync.exo_read"))


def measure(users: int, share: float) -> dict[str, Any]:
    from certsync.config import EnvSource, load_settings
    from certsync.pipeline import Services

    stack = bench_cycle.build(users)
    figures: dict[str, Any] = {"users": users, "churn": share, "started": datetime.now(UTC).isoformat()}
    bench_cycle.start(stack, {})
    try:
        os.environ.update(stack.environment())
        services = Services(settings=load_settings(EnvSource()))
        with bench_cycle.StageSampler(roots=bench_cycle.service_pids(stack)) as sampler:
            cycle = bench_cycle.Cycle(services=services, sampler=sampler, profile_dir=None, workers=1)
            runs = [cycle.run(label="first", mode="full")]
            print(bench_cycle.render_run(runs[-1]), flush=True)
            for label, overlap in DELTAS:
                churned = bench_cycle.churn(stack, share, seed=int(time.time()))
                figures.setdefault("churned", []).append(churned)
                if overlap is None:
                    forget_recipient_reads(services)
                else:
                    exchange = dataclasses.replace(
                        services.settings.exchange, changed_overlap_minutes=overlap
                    )
                    services.settings = dataclasses.replace(services.settings, exchange=exchange)
                runs.append(cycle.run(label=label, mode="delta"))
                runs[-1]["recipients_read"] = recipients_read(services, runs[-1]["run_id"])
                print(
                    bench_cycle.render_run(runs[-1]),
                    f"\n  recipients read: {runs[-1]['recipients_read']}",
                    flush=True,
                )
        figures["runs"] = runs
        services.engine.dispose()
    finally:
        stack.down()
    figures["finished"] = datetime.now(UTC).isoformat()
    (stack.home / "delta.json").write_text(json.dumps(figures, indent=1, default=str))
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--churn", type=float, default=0.01)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    measure(args.users, args.churn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
