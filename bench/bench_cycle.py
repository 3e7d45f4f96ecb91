"""The whole sync cycle at 20,000 and 100,000 users: every stage in full and delta mode, each next to
the limit of the system it talks to, measured in the same run, and a naive baseline beside it.

    make bench                                   # both sizes, then writes bench/RESULTS.md
    unshare -n bash -c 'ip link set lo up; .venv/bin/python bench/bench_cycle.py --users 20000'

Each size's lab (a Samba AD DC seeded with the population and the emulator's tenant, built by
certsync_lab.stack.LabStack) is built once and kept in .certsync/bench-<users>; building is not
measured. Every measurement starts from the tenant as it was seeded (a pristine copy is kept beside
it) and a new PostgreSQL cluster, so its first run is a real first run. Each size is measured in a
child process of its own (so the certsync process's memory is that size's alone) and its figures
are kept in .certsync/bench-<users>/figures.json; RESULTS.md is written from those files. Samba
serves LDAP on the fixed port 389: run it in a private network namespace (`make bench` does).
Figures are printed and written, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
DAG_ID = "certsync-bench"
SAMPLE_EVERY_S = 0.25
# PostgreSQL as a server for these sizes would be set up: shared buffers that hold the working set
# (the whole 100,000-user database is about 600 MB). With the default 128 MB, alternated first runs
# at 100,000 users planned in 3.56-4.50 s against 3.13-3.95 s with these (bench/README.md).
POSTGRES_SETTINGS = {"shared_buffers": "1GB"}
# The emulator's budget unless --rate, --burst and --cap say otherwise (the stage benches use it as is).
BUDGET = {"rate_per_s": 200.0, "burst": 20, "max_concurrency": 8}
log = logging.getLogger("bench_cycle")


def lab_home(users: int) -> Path:
    # CERTSYNC_BENCH_LABS: another directory of labs (a copy), so two measurements never share a DC.
    return Path(os.environ.get("CERTSYNC_BENCH_LABS", REPO / ".certsync")) / f"bench-{users}"


# -- the lab: built once, restored for every measurement ---------------------------------------------


def build(users: int):  # type: ignore[no-untyped-def]
    """Build the lab of `users` users once (directory and tenant), keep a pristine copy of the
    tenant, and return a stopped LabStack of it."""
    from certsync_lab.stack import LabStack

    home = lab_home(users)
    stack = LabStack(home=home, users=users, postgres_settings=POSTGRES_SETTINGS)
    pristine = home / "emulator.pristine"
    if not pristine.exists():
        began = time.monotonic()
        stack.up()
        stack.down()
        shutil.copytree(home / "emulator", pristine)
        (home / "built.json").write_text(json.dumps({"users": users, "build_s": time.monotonic() - began}))
        log.info("built the %d-user lab in %.0f s (kept in %s)", users, time.monotonic() - began, home)
    return stack


def restore_tenant(stack) -> None:  # type: ignore[no-untyped-def]
    """The tenant as seeded, last changed a day ago: seeding stamps every recipient with the time
    the lab was built, and a delta read within its overlap of that would read the whole tenant
    again (a lab measured right after it was built, as on a fresh clone)."""
    from certsync_lab.emulator.state import StateStore

    home = stack.home
    shutil.rmtree(home / "emulator")
    shutil.copytree(home / "emulator.pristine", home / "emulator")
    state = StateStore(home=home / "emulator")
    try:
        state.restamp(datetime.now(UTC) - timedelta(days=1))
    finally:
        state.close()


def start(stack, budget: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """A new database, the tenant as seeded and the directory as built; nothing re-seeded
    (LabStack.up would refresh the tenant from the directory)."""
    from certsync_lab.stack import DATABASE, certsync_database

    stack.down()
    shutil.rmtree(stack.home / "postgres", ignore_errors=True)
    restore_tenant(stack)
    stack.postgres.start()
    certsync_database(stack.postgres, DATABASE)
    stack.samba.start()
    start_emulator(stack, budget)


def start_emulator(stack, budget: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    stack.emulator.start()
    stack.emulator.control.set_config(**budget)


def service_pids(stack) -> dict[str, int]:  # type: ignore[no-untyped-def]
    from certsync_lab.emulator.server import read_endpoint

    def pid_in(path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    found = {
        "postgres": pid_in(stack.postgres.data_dir / "postmaster.pid"),
        "samba": pid_in(stack.samba.home / "run" / "samba.pid"),
        "emulator": (read_endpoint(stack.emulator.home) or {}).get("pid"),
    }
    return {"certsync": os.getpid(), **{k: int(v) for k, v in found.items() if v}}


# -- per-stage memory and profiles --------------------------------------------------------------------


PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").glob("*/children"))
    except OSError:
        return found  # the process exited meanwhile
    for task in tasks:
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue  # a thread that exited meanwhile
    return found


def _tree_sum(pid: int, measure: Callable[[int], float], exclude: frozenset[int]) -> float:
    """`measure` summed over a process and its descendants, read from /proc directly: psutil's
    children() walks the whole process table on every call. The subtrees of `exclude` are left
    out (the services this process started are its children too); a process that exited
    meanwhile counts nothing."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in exclude:
            continue
        try:
            total += measure(current)
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(current)
    return total


def _rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MIB


def _pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no Pss in /proc/{pid}/smaps_rollup")


def tree_rss_mib(pid: int, *, exclude: frozenset[int] = frozenset(), proportional: bool = False) -> float:
    """Resident MiB of a process and its descendants (validation workers, side-by-side stages,
    PostgreSQL backends). `proportional` counts a page shared by n processes 1/n in each (PSS), so
    a forked child and its parent do not count the pages they share twice; it is read for
    certsync's tree only, where the bench forks, as the kernel walks every mapping to compute it
    (Samba maps its whole database)."""
    return _tree_sum(pid, _pss_mib if proportional else _rss_mib, exclude)


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) * TICK_S  # utime, stime, cutime, cstime


def tree_cpu_s(pid: int, *, exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds (user and system) of a process and its descendants, with the children they
    already reaped (PostgreSQL backends that ended)."""
    return _tree_sum(pid, _cpu_s, exclude)


class Periodic:
    """Calls sample() every `every_s` seconds on a thread of its own while the block runs."""

    def __init__(self, *, every_s: float) -> None:
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError


class StageSampler(Periodic):
    """Samples each process tree's RSS; keeps the peak per (stage, process) of the current stage."""

    def __init__(self, *, roots: dict[str, int]) -> None:
        super().__init__(every_s=SAMPLE_EVERY_S)
        self.roots = roots
        self.stage = "-"
        self.peaks: dict[str, dict[str, float]] = {}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each process tree (the others' trees left out of each)."""
        return {
            name: tree_cpu_s(pid, exclude=frozenset(p for p in self.roots.values() if p != pid))
            for name, pid in self.roots.items()
        }

    def sample(self) -> None:
        peaks = self.peaks.setdefault(self.stage, {})
        for name, pid in self.roots.items():
            others = frozenset(p for p in self.roots.values() if p != pid)
            rss = tree_rss_mib(pid, exclude=others, proportional=name == "certsync")
            peaks[name] = max(peaks.get(name, 0.0), rss)


@contextmanager
def py_spy(out: Path | None, *, subprocesses: bool) -> Iterator[None]:
    """py-spy record of this process (and its children: the validation workers, but also the
    emulator this process started) while the block runs; 25 samples/s keeps its cost small."""
    if out is None:
        yield
        return
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(os.getpid())]
    cmd += ["--subprocesses"] if subprocesses else []
    cmd += ["--format", "raw", "--rate", "25", "--nonblocking", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the stage starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


class StatementStats:
    """PostgreSQL's side of a profile: pg_stat_statements, reset before each stage and read after it,
    so a stage's statements are named with their calls and execution time (py-spy sees only the
    client waiting)."""

    def __init__(self, stack: Any) -> None:
        import psycopg

        from certsync_lab.stack import DATABASE

        self._dsn = stack.postgres.dsn_for(DATABASE)
        with psycopg.connect(stack.postgres.dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")  # inside functions too
        stack.postgres.stop()
        stack.postgres.start()
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def reset(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")

    def top(self, n: int = 8) -> list[dict[str, Any]]:
        import psycopg

        with psycopg.connect(self._dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls, total_exec_time, rows"
                " FROM pg_stat_statements WHERE query !~* 'pg_stat_statements'"
                " ORDER BY total_exec_time DESC LIMIT %s",
                (n,),
            ).fetchall()
        return [{"query": q[:240], "calls": c, "total_ms": round(t, 1), "rows": r} for q, c, t, r in rows]


def _frame(text: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': samples add up per function, not per line."""
    func, _, where = text.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def summarise_profile(path: Path, top: int = 12) -> list[dict[str, Any]]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks, without the
    bench's own memory sampler thread."""
    if not path.exists():
        return []
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        # The emulator runs as the bench's child, so --subprocesses samples it too: not certsync.
        # A frame's name can hold a line break (seen once, in urllib3's urlopen): the stack's
        # pieces on either side of it are left out, not read as a count.
        if "StageSampler" in stack or "certsync_lab.emulator" in stack or not count_text.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")[1:] if not f.startswith("process ")]
        count = int(count_text)
        total += count
        if frames:
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    total = max(total, 1)
    rows: list[dict[str, Any]] = [
        {"function": f, "self": n / total, "inclusive": inclusive[f] / total} for f, n in own.most_common(top)
    ]
    return [
        *rows,
        {"total_samples": total, "top_inclusive": [(f, n / total) for f, n in inclusive.most_common(40)]},
    ]


# -- one sync run, stage by stage ------------------------------------------------------------------------


class Cycle:
    def __init__(
        self,
        *,
        services: Any,
        sampler: StageSampler,
        profile_dir: Path | None,
        workers: int,
        statements: StatementStats | None = None,
    ) -> None:
        self.services = services
        self.statements = statements
        self.sampler = sampler
        self.profile_dir = profile_dir
        self.workers = workers

    @contextmanager
    def stage(
        self, stages: list[dict[str, Any]], label: str, name: str, unit: str
    ) -> Iterator[dict[str, Any]]:
        out = self.profile_dir / f"{label}-{name}.txt" if self.profile_dir else None
        row: dict[str, Any] = {"stage": name, "unit": unit, "items": 0}
        # Every stage but begin and finish runs in a child process (validate's workers in its own).
        with py_spy(out, subprocesses=name not in ("begin", "finish")):
            if self.statements:
                self.statements.reset()
            self.sampler.stage = f"{label}:{name}"
            cpu = self.sampler.cpu_s()
            began = time.perf_counter()
            yield row
            row["seconds"] = time.perf_counter() - began
            # CPU per process tree: on a shared host, what a stage costs when its wall time cannot
            # say (py-spy, when profiling, runs as the bench process's child and counts there).
            row["cpu_s"] = {k: round(v - cpu.get(k, 0.0), 2) for k, v in self.sampler.cpu_s().items()}
            self.sampler.sample()
            self.sampler.stage = "-"
        row["load1"] = os.getloadavg()[0]
        row["peak_rss_mib"] = self.sampler.peaks.get(f"{label}:{name}", {})
        if out is not None:
            row["profile"] = summarise_profile(out)
        if self.statements:
            row["statements"] = self.statements.top()
        stages.append(row)

    def run(self, *, label: str, mode: str) -> dict[str, Any]:
        from certsync import pipeline

        stages: list[dict[str, Any]] = []
        with self.stage(stages, label, "begin", "runs") as row:
            run_id = begin_run(self.services, f"bench {label}", mode=mode)
            row["items"] = 1

        def extract(row: dict[str, Any]) -> None:
            counts = pipeline.extract(self.services, run_id=run_id)
            row["items"], row["detail"] = counts["users"], {k: counts[k] for k in ("mode", "users", "values")}

        def read_recipients(row: dict[str, Any]) -> None:
            got = pipeline.read_recipients(self.services, run_id=run_id)
            # Recipients Exchange returned (a delta read returns only the changed ones).
            row["items"], row["detail"] = got["read"], {k: got[k] for k in ("mode", "recipients")}

        # As in the DAG, where both follow begin: the directory and Exchange are read at once.
        self.side_by_side(
            stages, label, {"extract": ("users", extract), "read_recipients": ("recipients", read_recipients)}
        )

        def validate(row: dict[str, Any]) -> None:
            row["items"] = pipeline.validate(self.services, run_id=run_id)["validated"]

        def plan(row: dict[str, Any]) -> None:
            row["batches"] = pipeline.plan(self.services, run_id=run_id, allow_mass_removal=True)

        self.alone(stages, label, "validate", "values", validate)
        batches = self.alone(stages, label, "plan", "users", plan).pop("batches")

        def publish(row: dict[str, Any]) -> None:
            row["items"] = self.publish(run_id, batches)

        def carry_over(row: dict[str, Any]) -> None:
            row["detail"] = pipeline.carry_over(self.services, run_id=run_id)
            row["items"] = row["detail"]["results"]

        # As in the DAG, where both follow plan: the unchanged users' record is copied meanwhile.
        self.side_by_side(
            stages, label, {"publish": ("actions", publish), "carry_over": ("results", carry_over)}
        )
        with self.stage(stages, label, "finish", "runs") as row:
            summary = pipeline.finish(self.services, run_id=run_id)
            row["items"] = 1
        planned = next(s for s in stages if s["stage"] == "plan")
        planned["items"], planned["detail"] = self.source_users(), {"actions": summary["actions"]}
        return {
            "label": label,
            "mode": mode,
            "run_id": run_id,
            "stages": stages,
            "actions": summary["actions"],
        }

    def side_by_side(
        self,
        stages: list[dict[str, Any]],
        label: str,
        work: dict[str, tuple[str, Callable[[dict[str, Any]], None]]],
    ) -> None:
        """Stages that run at once, each in a process of its own, as the DAG's tasks do (Airflow
        forks a process for each task): a row per stage with its own wall time and items; memory,
        CPU and load are the window's, the same in each row (which names the window as
        `side_by_side`), and the window's profile is kept with its first stage."""
        rows: dict[str, dict[str, Any]] = {}
        with self.stage(stages, label, "+".join(work), "-"):
            children = {name: self._fork(name, *work[name]) for name in work}
            for name, child in children.items():
                rows[name] = self._row_of(label, name, *child)
        window = stages.pop()
        own = ("stage", "unit", "items", "seconds", "profile", "statements")
        shared = {k: v for k, v in window.items() if k not in own}
        for i, name in enumerate(work):
            once = {} if i else {k: window[k] for k in ("profile", "statements") if k in window}
            stages.append({**rows[name], **shared, **once, "side_by_side": window["stage"], "window_s": window["seconds"]})  # fmt: skip

    def alone(
        self,
        stages: list[dict[str, Any]],
        label: str,
        name: str,
        unit: str,
        run: Callable[[dict[str, Any]], None],
    ) -> dict[str, Any]:
        """One stage in a process of its own, as its task runs in the DAG (so what it leaves in
        memory does not stay in the bench's process, as it would not in a worker); returns its row."""
        with self.stage(stages, label, name, unit) as row:
            child = self._row_of(label, name, *self._fork(name, unit, run))
            row.update({k: v for k, v in child.items() if k != "seconds"})  # the window's time is kept
        return row

    def apart(self, name: str, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """`work(services)`'s answer, computed in a forked process, so that what it reads does not
        stay in the bench's process, whose tree the later runs' memory is measured in."""
        process, answer = self._fork(name, "-", lambda row: row.update(answer=work(self.services)))
        return self._row_of("between runs", name, process, answer)["answer"]  # type: ignore[no-any-return]

    @staticmethod
    def _row_of(label: str, name: str, process: Any, answer: Any) -> dict[str, Any]:
        kind, row = answer.recv()
        process.join()
        if kind == "error":
            raise RuntimeError(f"{label} {name} failed:\n{row}")
        return row  # type: ignore[no-any-return]

    def _fork(self, name: str, unit: str, run: Callable[[dict[str, Any]], None]) -> tuple[Any, Any]:
        """A forked child that runs one stage on services of its own (the parent's pooled
        connections are not its to use) and sends back its row, or the traceback it failed with."""
        import multiprocessing
        import traceback

        from certsync.pipeline import Services

        ours, theirs = multiprocessing.Pipe(duplex=False)

        def child() -> None:
            self.services.engine.dispose(close=False)
            self.services = Services(settings=self.services.settings)
            row: dict[str, Any] = {"stage": name, "unit": unit, "items": 0}
            began = time.perf_counter()
            try:
                run(row)
            except BaseException:
                theirs.send(("error", traceback.format_exc()))
                raise
            row["seconds"] = time.perf_counter() - began
            theirs.send(("row", row))

        process = multiprocessing.get_context("fork").Process(target=child, name=f"bench-{name}")
        process.start()
        theirs.close()
        return process, ours

    def publish(self, run_id: int, batches: list[int]) -> int:
        from concurrent.futures import ThreadPoolExecutor

        from certsync import pipeline

        def one(batch: int) -> int:
            counts = pipeline.publish(self.services, run_id=run_id, batch=batch)
            return counts.get("published", 0)

        if self.workers <= 1:
            return sum(one(b) for b in batches)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return sum(pool.map(one, batches))

    def source_users(self) -> int:
        import sqlalchemy as sa

        with self.services.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM certsync.source_user")).scalar_one())


# -- churn --------------------------------------------------------------------------------------------------


def churn(stack: Any, share: float, seed: int) -> dict[str, int]:
    """Change `share` of the users: one with two or more userCertificate values loses its last one
    (a change to publish, unless it was an expired renewal), any other gets a new displayName."""
    import ldap3

    conn = stack.samba.connect(receive_timeout=600)
    try:
        found = conn.extend.standard.paged_search(stack.samba.users_ou, "(&(objectClass=user)(!(objectClass=computer)))", attributes=["userCertificate"], paged_size=1000)  # fmt: skip
        entries = [(e["dn"], e["raw_attributes"].get("userCertificate", [])) for e in found if e.get("type") == "searchResEntry"]  # fmt: skip
        picked = random.Random(seed).sample(entries, max(1, int(len(entries) * share)))
        counts = {"certificate_dropped": 0, "display_name": 0}
        for dn, values in picked:
            if len(values) >= 2:
                conn.modify(dn, {"userCertificate": [(ldap3.MODIFY_REPLACE, list(values[:-1]))]})
                counts["certificate_dropped"] += 1
            else:
                conn.modify(dn, {"displayName": [(ldap3.MODIFY_REPLACE, [f"changed {seed}"])]})
                counts["display_name"] += 1
        return counts
    finally:
        conn.unbind()


# -- one size -----------------------------------------------------------------------------------------------


# The values a one-process validation is timed on (cycle_limits.one_process_check): a sample spread
# over the lab's values by their hash, a few seconds' worth.
CHECK_SAMPLE_SIZE = 20_000
# Every limit is timed this many times and the fastest is kept (each COPY on its own): on one machine
# a single parse of the same values took 4.2 s in one run and 6.0 s in the next, and the plan's COPY
# limit, timed once, 2.08 s in one run and 2.79 s in the next.
LIMIT_TRIES = 3
# A first run is timed this many times, each on a new database and the tenant as seeded, and each
# stage's fastest time is set against its limit (itself the fastest of LIMIT_TRIES): one time against
# the fastest of three would count this shared machine's noise against the stage alone (the same
# 100,000-user first plan took 2.51-4.11 s in nine first runs within an hour on one machine). The first
# publishes in full; the others for REPEAT_PUBLISH_BOX_S, as only the first's publish is set
# against the budget.
FIRST_RUNS = LIMIT_TRIES
REPEAT_PUBLISH_BOX_S = 5


def limits(stack: Any, services: Any, run_id: int, page_size: int) -> dict[str, Any]:
    import cycle_limits

    from certsync.store import runs

    pw = cycle_limits.password_file(stack.home, stack.samba.password)
    found: dict[str, Any] = {"load1_before": os.getloadavg()[0]}
    found["ldapsearch"] = cycle_limits.fastest(cycle_limits.ldapsearch, tries=LIMIT_TRIES, url=stack.samba.ldap_url, bind_dn=stack.samba.bind_dn, password_file=pw, base=stack.samba.users_ou, page_size=page_size)  # fmt: skip
    found["recipient_read"] = cycle_limits.fastest(
        cycle_limits.raw_recipient_read, services.exchange, tries=LIMIT_TRIES
    )
    with services.engine.connect() as conn:
        items = cycle_limits.distinct_values(conn)
        at = runs.run_info(conn, run_id).logical_date
    found["parse"] = cycle_limits.fastest(cycle_limits.raw_parse, items, tries=LIMIT_TRIES)
    trust = services.settings.trust.load()
    # Shown beside the limit, not as it: what the stage's ratio would be if its yardstick also
    # checked each certificate's signature, which validation cannot skip.
    signers = cycle_limits.issuer_keys(trust)
    found["parse_signed"] = cycle_limits.fastest(
        cycle_limits.raw_parse, items, tries=LIMIT_TRIES, signers=signers
    )
    found["check"] = cycle_limits.fastest(
        cycle_limits.one_process_check, items[:CHECK_SAMPLE_SIZE], tries=LIMIT_TRIES, trust=trust, at=at
    )
    del items
    dsn = stack.postgres.dsn_for("certsync")
    found["copy"] = cycle_limits.copy_limits(dsn, run_id, tries=LIMIT_TRIES)
    found["load1_after"] = os.getloadavg()[0]
    _settle(dsn)
    return found


def _settle(dsn: str) -> None:
    """Write out what the limits wrote (their COPYs load each table three times, and dump it to a
    file three times) before the next measured run, not during it. In the one run without this,
    at 100,000 users, the second full run's read_recipients took 19.4 s and the delta run after
    the churn 26.1 s, its cores idle half the time; in the next run, with it, 10.8 and 10.2 s."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    os.sync()


def lab_services(stack: Any, publish_box: int) -> Any:
    """certsync's services on the started lab, configured as a worker is: through the environment."""
    from certsync.config import EnvSource, load_settings
    from certsync.pipeline import Services

    os.environ.update(with_time_box(stack.environment(), publish_box))
    return Services(settings=load_settings(EnvSource()))


def with_time_box(env: dict[str, str], seconds: int) -> dict[str, str]:
    """The lab's settings with publish_time_box_s: a run publishes for that long and defers the
    rest to the next run (for a size whose whole first publish would not fit the time at hand)."""
    if not seconds:
        return env
    config = json.loads(env["AIRFLOW_VAR_CERTSYNC_CONFIG"])
    return {**env, "AIRFLOW_VAR_CERTSYNC_CONFIG": json.dumps({**config, "publish_time_box_s": seconds})}


def measure(users: int, args: argparse.Namespace) -> dict[str, Any]:
    import cycle_naive

    budget = {"rate_per_s": args.rate, "burst": args.burst, "max_concurrency": args.cap}
    stack = build(users)
    figures: dict[str, Any] = {"users": users, "budget": budget, "started": datetime.now(UTC).isoformat()}
    figures["publish_box_s"] = args.publish_box
    figures["build"] = json.loads((stack.home / "built.json").read_text())
    start(stack, budget)
    try:
        services = lab_services(stack, args.publish_box)
        figures["settings"] = {"validation_processes": services.settings.validation_processes, "publish_batch_size": services.settings.publish_batch_size, "exchange_max_concurrency": services.settings.exchange.max_concurrency, "ldap_page_size": services.settings.directory.page_size, "publish_workers": args.workers, "postgres": stack.postgres_settings}  # fmt: skip
        if args.first_only:  # to investigate: one first run, profiled when asked
            first = first_run(stack, services, args.workers, profile=args.profile)
            print(render_run(first), flush=True)
            print(json.dumps([s.get("statements") for s in first["stages"]], indent=1), flush=True)
            return figures
        with StageSampler(roots=service_pids(stack)) as sampler:
            cycle = Cycle(services=services, sampler=sampler, profile_dir=None, workers=args.workers)
            first = cycle.run(label="first", mode="full")
            print(render_run(first), flush=True)
            # It reads and parses every certificate: in a process of its own, as the stages run.
            page_size = services.settings.directory.page_size
            figures["limits"] = cycle.apart(
                "limits", lambda own: limits(stack, own, first["run_id"], page_size)
            )
            steady = cycle.run(label="steady", mode="full")
            print(render_run(steady), flush=True)
            # The churn reads every entry with its certificates: apart too, as the limits.
            seed = int(time.time())
            figures["churn"] = cycle.apart("churn", lambda _: churn(stack, args.churn, seed=seed))
            delta = cycle.run(label="delta", mode="delta")
            print(render_run(delta), flush=True)
            # Minutes apart, each delta read reaches back over the first run's whole publish
            # (changed_overlap_minutes, 30). Runs further apart than the overlap, as hourly runs
            # are, read only what changed since: the same churn again, with the overlap passed.
            figures["churn_later"] = cycle.apart("churn", lambda _: churn(stack, args.churn, seed=seed + 1))
            cycle.services = overlap_passed(services)
            later = cycle.run(label="delta_later", mode="delta")
            print(render_run(later), flush=True)
            cycle.services.engine.dispose()
        figures["runs"] = [first, steady, delta, later]
        stack.emulator.stop()
        restore_tenant(stack)  # the naive cycle meets the tenant as the first run did
        start_emulator(stack, budget)
        services.__dict__.pop("exchange", None)  # a client for the restarted emulator
        figures["naive"] = cycle_naive.run(services, sample=min(args.naive_sample, users))
        figures["naive"]["load1"] = os.getloadavg()[0]
        services.engine.dispose()
        figures["first_repeats"] = repeat_first_runs(stack, budget, args)
        if args.profile:
            figures["profiled"] = first_run_anew(stack, budget, args.workers, args.publish_box, profile=True)
    finally:
        stack.down()
    figures["finished"] = datetime.now(UTC).isoformat()
    return figures


def repeat_first_runs(stack: Any, budget: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The first run again, `--first-runs` - 1 times, each on a new database (see FIRST_RUNS)."""
    repeats = []
    for _ in range(args.first_runs - 1):
        repeats.append(first_run_anew(stack, budget, args.workers, REPEAT_PUBLISH_BOX_S, profile=False))
        print(render_run(repeats[-1]), flush=True)
    return repeats


def begin_run(services: Any, label: str, *, mode: str = "full") -> int:
    """pipeline.begin of a run logically now, named `label` and the time (a new name each call)."""
    from certsync import pipeline

    now = datetime.now(UTC)
    return pipeline.begin(services, dag_id=DAG_ID, airflow_run_id=f"{label} {now.isoformat()}", logical_date=now, mode=mode, dry_run=False)  # fmt: skip


def first_run_anew(
    stack: Any, budget: dict[str, Any], workers: int, publish_box: int, *, profile: bool
) -> dict[str, Any]:
    """A first run on a new database and the tenant as seeded (start), publishing for `publish_box` s."""
    start(stack, budget)
    services = lab_services(stack, publish_box)
    try:
        return first_run(stack, services, workers, profile=profile)
    finally:
        services.engine.dispose()


def first_run(stack: Any, services: Any, workers: int, *, profile: bool) -> dict[str, Any]:
    """A first run on the started stack; with `profile`, every stage recorded by py-spy and
    pg_stat_statements. The profilers slow what they watch (a 20,000-user plan took 1.56 s under
    them, 0.95-1.17 s without), so the measured runs go unprofiled and this one comes apart."""
    profile_dir = stack.home / "profiles" if profile else None
    if profile_dir:
        shutil.rmtree(profile_dir, ignore_errors=True)
        profile_dir.mkdir(parents=True)
    statements = StatementStats(stack) if profile else None
    with StageSampler(roots=service_pids(stack)) as sampler:
        cycle = Cycle(services=services, sampler=sampler, profile_dir=profile_dir, workers=workers, statements=statements)  # fmt: skip
        return cycle.run(label="first", mode="full")


def overlap_passed(services: Any) -> Any:
    """The same settings, as a run would read Exchange after more than the overlap has passed."""
    import dataclasses

    from certsync.pipeline import Services

    settings = services.settings
    exchange = dataclasses.replace(settings.exchange, changed_overlap_minutes=0)
    return Services(settings=dataclasses.replace(settings, exchange=exchange))


def render_run(run: dict[str, Any]) -> str:
    import cycle_report

    lines = [f"{run['label']} ({run['mode']}): actions {run['actions']}"]
    for s in run["stages"]:
        rate = s["items"] / s["seconds"] if s["seconds"] > 0 and s["items"] else 0
        rss = s["peak_rss_mib"].get("certsync", 0)
        cpu = " ".join(f"{k} {v:.1f}" for k, v in s.get("cpu_s", {}).items())
        lines.append(f"  {s['stage']:<16} {s['seconds']:>8.2f} s {s['items']:>8} {s['unit']:<10} {rate:>9.0f}/s  RSS {rss:>5.0f} MiB  load {s['load1']:.1f}  CPU s: {cpu}")  # fmt: skip
    lines.append(
        f"  cycle {cycle_report.cycle_s(run):.2f} s (extract beside read_recipients, publish beside carry_over)"
    )
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, action="append", help="a size to measure (repeatable; default 20,000 and 100,000)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=BUDGET["rate_per_s"], help="the emulator's budget, Set-*/Get-* requests per second")  # fmt: skip
    parser.add_argument("--burst", type=int, default=BUDGET["burst"], help="the budget's token bucket depth")
    parser.add_argument(
        "--cap", type=int, default=BUDGET["max_concurrency"], help="the emulator's per-tenant concurrency cap"
    )
    parser.add_argument("--workers", type=int, default=1, help="publish batches at once (1: as run_all)")
    parser.add_argument(
        "--churn", type=float, default=0.01, help="share of users changed before the delta run"
    )
    parser.add_argument("--naive-sample", type=int, default=5000, help="users the naive baseline's per-user steps run on")  # fmt: skip
    parser.add_argument(
        "--publish-box", type=int, default=0, help="publish_time_box_s of every run (0: none)"
    )
    parser.add_argument("--first-runs", type=int, default=FIRST_RUNS, help="first runs per size; each stage's fastest is set against its limit")  # fmt: skip
    parser.add_argument("--profile", type=int, action="append", default=[], help="py-spy every stage at this size (repeatable)")  # fmt: skip
    parser.add_argument("--build-only", action="store_true", help="build the labs and stop")
    parser.add_argument("--first-only", action="store_true", help="a first run only, printed, nothing written (to investigate)")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from the kept figures")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(users: int, args: argparse.Namespace) -> None:
    """Measure one size in a process of its own; its figures land in the lab's home."""
    cmd = [sys.executable, __file__, "--child", "--users", str(users), "--rate", str(args.rate)]
    cmd += ["--burst", str(args.burst), "--cap", str(args.cap), "--workers", str(args.workers)]
    cmd += ["--churn", str(args.churn), "--naive-sample", str(args.naive_sample)]
    cmd += ["--publish-box", str(args.publish_box), "--first-runs", str(args.first_runs)]
    cmd += [f"--profile={size}" for size in args.profile]
    cmd += ["--first-only"] if args.first_only else []
    subprocess.run(cmd, check=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("certsync_lab").setLevel(logging.INFO)
    sizes = args.users or [20_000, 100_000]
    if args.build_only:
        for users in sizes:
            build(users)
        return 0
    if args.child:
        users = sizes[0]
        args.profile = users in args.profile
        figures = measure(users, args)
        if args.first_only:
            return 0
        (lab_home(users) / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
        return 0
    if not args.report_only:
        for users in sizes:
            # Built in a process of its own: the building process keeps the population's heap
            # (a measured process that had built its lab began 270 MiB larger at 100,000 users).
            subprocess.run([sys.executable, __file__, "--build-only", "--users", str(users)], check=True)
            run_child(users, args)
    if args.first_only:
        return 0
    import cycle_report

    cycle_report.write(RESULTS, [lab_home(u) / "figures.json" for u in sizes])
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main(sys.argv[1:]))
