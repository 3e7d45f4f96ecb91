"""Wall time of each stage of a full sync run against the real lab stack, then of a no-change run.

    python bench/bench_pipeline.py --users 2000
    python bench/bench_pipeline.py --users 10000 --home ../bench-10k --workers 4

Brings up embedded PostgreSQL, a Samba AD DC seeded with --users users and the Exchange Online
emulator (certsync_lab.stack.LabStack), takes its settings exactly as `certsync-lab demo` does, and runs
the pipeline's stage functions one by one: begin, extract, read_recipients, validate, plan, publish
(every batch), finish. Samba serves LDAP on the fixed port 389, so run it in a private network
namespace when anything else may hold that port:

    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/bench_pipeline.py --users 2000'

The home keeps the seeded directory, so a second invocation with the same home skips seeding but then
measures a run against an already published tenant. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from certsync import pipeline
from certsync.config import EnvSource, load_settings
from certsync.pipeline import Services
from certsync_lab.emulator.server import read_endpoint
from certsync_lab.stack import LabStack

log = logging.getLogger("bench_pipeline")
DAG_ID = "certsync-bench"
SAMPLE_EVERY_S = 0.25
# Log lines of LabStack.up() that close a seeding phase, in order: (logger prefix, message start, phase).
SEED_MARKS = (
    ("certsync_lab.samba", "Samba DC answers", "postgres + samba start"),
    ("certsync_lab.population", "generated", "generate population (PKI)"),
    ("certsync_lab.population", "loaded", "load users into AD (LDAP add)"),
    ("certsync_lab.emulator.seed", "seeded emulator", "seed emulator from AD"),
    ("certsync_lab.emulator.process", "emulator started", "start emulator"),
)


@dataclass
class Stage:
    name: str
    seconds: float
    items: int
    unit: str

    @property
    def rate(self) -> float | None:
        return self.items / self.seconds if self.items and self.seconds > 0 else None


@dataclass
class RunResult:
    label: str
    stages: list[Stage]
    summary: dict[str, Any]
    peak_rss_mb: dict[str, float]
    batches: int

    @property
    def total_s(self) -> float:
        return sum(s.seconds for s in self.stages)


@dataclass
class SeedResult:
    phases: list[tuple[str, float]]
    total_s: float
    seeded_now: bool


class _MarkRecorder(logging.Handler):
    """Keeps when each log record of the lab arrived, to split the time LabStack.up() takes."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.marks: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append((time.monotonic(), record.name, record.getMessage()))


class RssSampler:
    """Samples the resident set of each service's process tree; keeps the peak of each sum.

    Samba (single process model), the postmaster with its backends and the emulator are separate
    processes, so the process's own getrusage peak says nothing about them."""

    def __init__(self, *, roots: dict[str, int]) -> None:
        self.roots = roots
        self.peaks: dict[str, float] = dict.fromkeys(roots, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def _sample(self) -> None:
        for name, pid in self.roots.items():
            rss = _tree_rss(pid)
            if rss > self.peaks[name]:
                self.peaks[name] = rss


def _tree_rss(pid: int) -> float:
    """Resident MiB of a process and its descendants (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue  # a backend or worker that exited between listing and reading
    return total / 2**20


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def service_pids(stack: LabStack) -> dict[str, int]:
    endpoint = read_endpoint(stack.emulator.home) or {}
    candidates = {
        "postgres": _pid_from_file(stack.postgres.data_dir / "postmaster.pid"),
        "samba": _pid_from_file(stack.samba.home / "run" / "samba.pid"),
        "emulator": endpoint.get("pid"),
    }
    return {name: int(pid) for name, pid in candidates.items() if pid}


def own_peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bring_up(stack: LabStack) -> SeedResult:
    """Start the stack (seeding it on first use) and split the time by the lab's own log lines."""
    recorder = _MarkRecorder()
    lab_loggers = [logging.getLogger(name) for name in ("certsync_lab", "certsync_lab.emulator")]
    for logger in lab_loggers:
        logger.addHandler(recorder)
        logger.setLevel(logging.INFO)
    seeded_now = not (stack.home / "seeded.json").exists()
    began = time.monotonic()
    try:
        stack.up()
    finally:
        for logger in lab_loggers:
            logger.removeHandler(recorder)
    total = time.monotonic() - began
    return SeedResult(phases=_phases(recorder.marks, began), total_s=total, seeded_now=seeded_now)


def _phases(marks: list[tuple[float, str, str]], began: float) -> list[tuple[str, float]]:
    phases, last = [], began
    for prefix, start, label in SEED_MARKS:
        at = next((t for t, name, msg in marks if name.startswith(prefix) and msg.startswith(start)), None)
        if at is not None:
            phases.append((label, at - last))
            last = at
    return phases


@contextmanager
def timed(stages: list[Stage], name: str, unit: str) -> Iterator[dict[str, int]]:
    """Time the block; the block puts its item count into the yielded dict."""
    counter = {"items": 0}
    began = time.perf_counter()
    yield counter
    stages.append(Stage(name=name, seconds=time.perf_counter() - began, items=counter["items"], unit=unit))


def publish_all(services: Services, *, run_id: int, batches: list[int], workers: int) -> int:
    """Every batch, sequentially like run_all, or on threads like the DAG's mapped publish tasks."""

    def one(batch: int) -> int:
        return sum(pipeline.publish(services, run_id=run_id, batch=batch).values())

    if workers <= 1:
        return sum(one(batch) for batch in batches)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(one, batches))


def sync_run(services: Services, *, label: str, workers: int, roots: dict[str, int]) -> RunResult:
    stages: list[Stage] = []
    now = datetime.now(UTC)
    with RssSampler(roots=roots) as sampler:
        with timed(stages, "begin", "runs") as c:
            run_id = pipeline.begin(
                services,
                dag_id=DAG_ID,
                airflow_run_id=f"bench__{label}__{now.isoformat()}",
                logical_date=now,
                mode="full",
                dry_run=False,
            )
            c["items"] = 1
        with timed(stages, "extract", "users") as c:
            c["items"] = pipeline.extract(services, run_id=run_id)["users"]
        with timed(stages, "read_recipients", "recipients") as c:
            c["items"] = pipeline.read_recipients(services, run_id=run_id)["recipients"]
        with timed(stages, "validate", "values") as c:
            c["items"] = pipeline.validate(services, run_id=run_id)["validated"]
        with timed(stages, "plan", "actions") as c:
            batches = pipeline.plan(services, run_id=run_id)
        with timed(stages, "publish", "actions") as c:
            c["items"] = publish_all(services, run_id=run_id, batches=batches, workers=workers)
        with timed(stages, "finish", "runs") as c:
            summary = pipeline.finish(services, run_id=run_id)
            c["items"] = 1
    stages[4].items = sum(summary["actions"].values())
    peaks = {"bench process (getrusage)": own_peak_rss_mb(), **sampler.peaks}
    return RunResult(label=label, stages=stages, summary=summary, peak_rss_mb=peaks, batches=len(batches))


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def render_run(result: RunResult) -> str:
    lines = [
        f"{result.label}: {result.summary['users']} users, {result.batches} publish batches",
        f"  {'stage':<16} {'seconds':>9} {'items':>8} {'unit':<10} {'items/s':>9}",
    ]
    for s in result.stages:
        lines.append(f"  {s.name:<16} {s.seconds:>9.2f} {s.items:>8,} {s.unit:<10} {_rate(s.rate):>9}")
    lines.append(f"  {'total':<16} {result.total_s:>9.2f}")
    slowest = max(result.stages, key=lambda s: s.seconds)
    lines.append(f"  slowest stage: {slowest.name} ({slowest.seconds / result.total_s:.0%} of the run)")
    lines.append("  peak RSS MiB: " + ", ".join(f"{k} {v:,.0f}" for k, v in result.peak_rss_mb.items()))
    lines.append(f"  actions: {result.summary['actions']}")
    lines.append(f"  publish attempts: {result.summary['publish_attempts']}")
    return "\n".join(lines)


def render_seed(seed: SeedResult, users: int) -> str:
    head = "seeding" if seed.seeded_now else "start (already seeded, nothing loaded)"
    lines = [f"{head}: {seed.total_s:.1f} s for {users:,} users"]
    lines += [f"  {label:<32} {seconds:>8.1f} s" for label, seconds in seed.phases]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000, help="size of the seeded directory")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="lab home (default: certsync-bench-<users> in the temporary directory)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="publish batches at once (the DAG maps up to 4; 1 = run_all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--keep-up", action="store_true", help="leave the stack running afterwards")
    return parser.parse_args(argv)


def measure(stack: LabStack, *, workers: int) -> tuple[SeedResult, list[RunResult]]:
    seed = bring_up(stack)
    # Printed at once: seeding a large directory takes minutes and should not be lost to a later failure.
    print(render_seed(seed, stack.users), flush=True)
    # The same settings path as `certsync-lab demo`: the lab's AIRFLOW_CONN_*/AIRFLOW_VAR_* names.
    os.environ.update(stack.environment())
    services = Services(settings=load_settings(EnvSource()))
    roots = service_pids(stack)
    runs = [
        sync_run(services, label=label, workers=workers, roots=roots)
        for label in ("first run", "no-change run")
    ]
    services.engine.dispose()
    return seed, runs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    home = args.home or Path(tempfile.gettempdir()) / f"certsync-bench-{args.users}"
    stack = LabStack(home=home, users=args.users)
    down: Callable[[], None] = (lambda: None) if args.keep_up else stack.down
    try:
        seed, runs = measure(stack, workers=args.workers)
    finally:
        down()
    for result in runs:
        print()
        print(render_run(result))
    if args.json:
        payload = {"users": args.users, "workers": args.workers, "seed": asdict(seed)}
        payload["runs"] = [asdict(r) | {"total_s": r.total_s} for r in runs]
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
