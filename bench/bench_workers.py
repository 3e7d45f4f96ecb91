"""The certsync DAG on the compose stack's Celery profile: one run with one worker, then the same run
with two (`docker compose --profile celery up --scale airflow-worker=2`), each on a fresh stack.

    .venv/bin/python bench/bench_workers.py --users 20000 --publish-batch-size 200

The stack runs as docker-compose.yml describes it, service by service in namespaces
(tests/compose/namespaces.py; needs root, no outer `unshare -n`). Both runs start from the same
directory and a fresh PostgreSQL, Airflow database and tenant: the DC, loaded once offline with the
population `init` would load over LDAP (far faster at thousands of users), is copied into each
stack's `samba` volume, and the PKI's trust files into its `lab` volume, so `init` finds the
directory seeded and skips loading it. A compose override (written next to each stack) sets
`publish_batch_size` in the certsync_config variable, so publish maps over several batches (up to
4 at once), and turns off the hourly schedule, so the operator's manual run is the only one.

The DAG is triggered through the REST API and followed until it ends. Reported per run: the run's
wall time (start to end as Airflow records it), each task instance's duration and the worker host
that ran it (per map index for validate and publish), the CPU seconds each service's process tree
used during the run (every worker, the scheduler, PostgreSQL...), and the load average before,
during and after. Figures are printed and written as JSON (--out), never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from bench_cycle import Periodic, tree_cpu_s  # noqa: E402

from certsync.config import DEFAULT_PUBLISH_BATCH_SIZE  # noqa: E402
from tests.compose.airflow_api import Api, task_instances, trigger, wait_for_dag, wait_for_run  # noqa: E402
from tests.compose.namespaces import NamespaceStack, compose_up, volume_dir  # noqa: E402

log = logging.getLogger("bench_workers")

COMPOSE_FILE = REPO / "docker-compose.yml"
DAG_ID = "certsync"
WORKER = "airflow-worker"
SAMBA_VOLUME_TARGET = "/var/lib/samba-dc"  # where the samba service mounts its volume
CONFIG_VARIABLE = "AIRFLOW_VAR_CERTSYNC_CONFIG"
LOAD_EVERY_S = 5.0
START_PERIOD_S = 1200


# -- the directory, built once ------------------------------------------------------------------------


def build_directory(cache: Path, *, users: int, seed: int, dc_cache: Path) -> Path:
    """A provisioned DC holding the population (loaded offline) and the lab volume's trust files,
    kept in `cache` per size, seed and day (the population's certificates are issued for today).
    The domain is restored from the tarball in `dc_cache` when there is one (provisioning takes
    minutes on a busy host)."""
    from certsync_lab.compose import mark_seeded, seed_population
    from certsync_lab.population import load_population_offline
    from certsync_lab.samba import SambaDC

    day = datetime.now(UTC).strftime("%Y%m%d")
    home = cache / f"directory-{users}-{seed}-{day}"
    lab = home / "lab"
    if (lab / "seeded.json").exists():
        log.info("reusing the directory in %s", home)
        return home
    shutil.rmtree(home, ignore_errors=True)
    began = time.monotonic()
    population, at = seed_population(lab, users=users, seed=seed)
    dc = SambaDC(home=home / "samba" / "dc", cache_dir=dc_cache)
    dc.ensure_provisioned()
    added = load_population_offline(samba=dc, ou_dn=dc.users_ou, users=population)
    mark_seeded(lab, users=users, seed=seed, at=at, added=added)
    log.info("directory of %s users built in %.0f s (not measured)", added, time.monotonic() - began)
    return home


def stage_volumes(directory: Path, workdir: Path) -> None:
    """Copy the DC into the stack's `samba` volume (its smb.conf pointed at the path the service
    mounts it on, as a restore from the DC's cache does) and the trust files into `lab`."""
    from certsync_lab.samba import ORIGIN_FILE

    dc = volume_dir(workdir, "samba") / "dc"
    shutil.copytree(directory / "samba" / "dc", dc, symlinks=True)
    origin = (dc / ORIGIN_FILE).read_text().strip()
    target = f"{SAMBA_VOLUME_TARGET}/dc"
    conf = dc / "etc" / "smb.conf"
    conf.write_text(conf.read_text().replace(origin, target))
    (dc / ORIGIN_FILE).write_text(f"{target}\n")
    shutil.copytree(directory / "lab", volume_dir(workdir, "lab"), dirs_exist_ok=True)


def override_compose(workdir: Path, *, publish_batch_size: int) -> Path:
    """docker-compose.yml with the bench's settings merged in (what `-f override.yml` would do)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    for spec in document["services"].values():
        env = spec.get("environment")
        if isinstance(env, dict) and CONFIG_VARIABLE in env:
            config = json.loads(env[CONFIG_VARIABLE]) | {"publish_batch_size": publish_batch_size}
            # Environments are shared through anchors: a new dict per service, so each is set once.
            spec["environment"] = env | {
                CONFIG_VARIABLE: json.dumps(config),
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            }
        # Start-up is not measured: on a busy shared host the API server takes longer than the
        # compose file's start period to answer its first health check.
        if spec.get("healthcheck"):
            spec["healthcheck"] = spec["healthcheck"] | {"start_period": f"{START_PERIOD_S}s"}
    path = workdir / "docker-compose.bench.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# -- one measured run ---------------------------------------------------------------------------------


class LoadSampler(Periodic):
    """The 1-minute load average every few seconds while a run goes on."""

    def __init__(self) -> None:
        super().__init__(every_s=LOAD_EVERY_S)
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2)}


def service_cpu(stack: NamespaceStack) -> dict[str, float]:
    """CPU seconds so far of each running service's whole process tree (its PID namespace)."""
    return {
        name: tree_cpu_s(stack.pid(name))
        for name, state in stack.status().items()
        if state in ("running", "healthy")
    }


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 2)


def _task_rows(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [
        {
            "task": ti["task_id"],
            "map_index": ti["map_index"],
            "state": ti["state"],
            "host": ti.get("hostname"),
            "duration_s": round(ti["duration"], 2) if ti.get("duration") is not None else None,
            "start": ti.get("start_date"),
            "end": ti.get("end_date"),
            "try": ti.get("try_number"),
        }
        for ti in instances
    ]
    return sorted(rows, key=lambda r: (r["start"] or "", r["task"], r["map_index"]))


def run_dag(stack: NamespaceStack, *, timeout: float, settle_s: float) -> dict[str, Any]:
    api = stack.in_network(Api, f"http://{stack.address('airflow-apiserver')}:8080")
    stack.in_network(wait_for_dag, api, DAG_ID)
    time.sleep(settle_s)  # let the services' start-up work (imports, DAG parsing) die down
    cpu_before, load_before = service_cpu(stack), os.getloadavg()
    began = time.monotonic()
    with LoadSampler() as load:
        # The seeded tenant holds certificates no user has any more: a first run removes more of
        # them than the default removal_threshold allows at 20,000 users, as make bench's does.
        conf = {"extract_mode": "full", "allow_mass_removal": True}
        run_id = stack.in_network(trigger, api, DAG_ID, conf=conf)
        run = stack.in_network(wait_for_run, api, DAG_ID, run_id, timeout=timeout, poll_s=1.0)
    observed = time.monotonic() - began
    cpu_after, load_after = service_cpu(stack), os.getloadavg()
    tasks = _task_rows(stack.in_network(task_instances, api, DAG_ID, run_id))
    cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 1) for name in cpu_after}
    return {
        "run_id": run_id,
        "state": run["state"],
        "wall_s": _seconds(run.get("start_date"), run.get("end_date")),
        "queued_to_end_s": _seconds(run.get("queued_at"), run.get("end_date")),
        "observed_s": round(observed, 1),
        "tasks": tasks,
        "tasks_per_host": dict(Counter(t["host"] for t in tasks)),
        "publish_batches": sum(1 for t in tasks if t["task"] == "publish"),
        "cpu_s": cpu,
        "load": {
            "before": [round(x, 2) for x in load_before],
            "during_1min": load.summary(),
            "after": [round(x, 2) for x in load_after],
        },
    }


def measure(workers: int, *, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir / f"stack-{workers}-workers"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stage_volumes(directory, workdir)
    compose_file = override_compose(workdir, publish_batch_size=args.publish_batch_size)
    env = {"AIRFLOW_EXECUTOR": "CeleryExecutor", "CERTSYNC_LAB_USERS": str(args.users)}
    began = time.monotonic()
    with compose_up(
        compose_file=compose_file,
        workdir=workdir,
        env=env,
        profiles=("celery",),
        scale={WORKER: workers},
        timeout=args.up_timeout,
    ) as stack:
        log.info("%s worker(s): stack up in %.0f s", workers, time.monotonic() - began)
        result = run_dag(stack, timeout=args.timeout, settle_s=args.settle)
        result["workers"] = stack.replicas(WORKER)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("%s worker(s): %s in %s s", workers, result["state"], result["wall_s"])
    return result


# -- report -------------------------------------------------------------------------------------------


def _worker_cpu(run: dict[str, Any]) -> str:
    return " + ".join(f"{run['cpu_s'].get(w, 0.0):.0f}" for w in run["workers"])


def render(figures: dict[str, Any]) -> str:
    runs = figures["runs"]
    lines = [
        f"{figures['users']:,} users, publish_batch_size {figures['publish_batch_size']}, "
        f"{figures['cpus']} CPUs, worker concurrency 2 each",
        "",
        "| workers | run wall s | publish batches | tasks per host | worker CPU s | scheduler CPU s "
        "| certsync-db CPU s | emulator CPU s | load 1-min before / mean / max during |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        load = run["load"]
        cpu = run["cpu_s"]
        lines.append(
            f"| {len(run['workers'])} | {run['wall_s']} | {run['publish_batches']} "
            f"| {run['tasks_per_host']} | {_worker_cpu(run)} | {cpu.get('airflow-scheduler', 0):.0f} "
            f"| {cpu.get('certsync-db', 0):.0f} | {cpu.get('emulator', 0):.0f} "
            f"| {load['before'][0]} / {load['during_1min'].get('mean')} / {load['during_1min'].get('max')} |"
        )
    lines += [
        "",
        "| task[map] | " + " | ".join(f"{len(r['workers'])} worker(s): s @ host" for r in runs) + " |",
    ]
    lines.append("|---|" + "---|" * len(runs))
    keys = [(t["task"], t["map_index"]) for t in runs[0]["tasks"]]
    keys += [
        (t["task"], t["map_index"])
        for r in runs[1:]
        for t in r["tasks"]
        if (t["task"], t["map_index"]) not in keys
    ]
    for task, index in keys:
        cells = []
        for run in runs:
            found = [t for t in run["tasks"] if (t["task"], t["map_index"]) == (task, index)]
            cells.append(f"{found[0]['duration_s']} @ {found[0]['host']}" if found else "-")
        label = task if index < 0 else f"{task}[{index}]"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--publish-batch-size", type=int, default=DEFAULT_PUBLISH_BATCH_SIZE)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure in turn")
    parser.add_argument("--workdir", type=Path, default=REPO / ".certsync" / "bench-workers")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take")
    parser.add_argument(
        "--up-timeout", type=float, default=1800.0, help="seconds the stack may take to be up"
    )
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait once the stack is up")
    parser.add_argument(
        "--dc-cache",
        type=Path,
        default=REPO / ".certsync" / "test-cache" / "samba",
        help="folder of the provisioned domain's tarball (the integration tests' cache by default)",
    )
    parser.add_argument(
        "--out", type=Path, help="figures file (default: bench/workers-USERS.json, which RESULTS.md shows)"
    )
    parser.add_argument("--keep", action="store_true", help="keep each stack's folder (logs, volumes)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    args.workdir = args.workdir.absolute()
    directory = build_directory(args.workdir, users=args.users, seed=args.seed, dc_cache=args.dc_cache)
    figures: dict[str, Any] = {
        "users": args.users,
        "publish_batch_size": args.publish_batch_size,
        "cpus": os.cpu_count(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": [measure(int(n), directory=directory, args=args) for n in args.workers.split(",")],
    }
    out = args.out or REPO / "bench" / f"workers-{args.users}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(render(figures))
    return 0 if all(run["state"] == "success" for run in figures["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
