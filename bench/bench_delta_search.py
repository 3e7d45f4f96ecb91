"""The delta extract's directory searches, the two ways, on one lab: two uSNChanged range searches (in
scope with every attribute; over the domain with the show-deleted control, for tombstones and users
that left the scope) against one range search over the domain with the changed users then read by
objectGUID (certsync.directory.reader.changed_in_domain, iter_by_guid). Wall time and the Samba
process group's CPU seconds, the two alternated `--rounds` times after `--churn` of the users changed.

Usage: bench/bench_delta_search.py [--users 20000] [--churn 0.01] [--rounds 3]
Starts only the lab's Samba DC (CERTSYNC_BENCH_LABS chooses a copied lab, as for bench_cycle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cycle

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (with reaped children) of every process in the process group `pgid`: Samba's
    root process starts its workers in its own group."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += sum(int(f) for f in fields[11:15]) * TICK_S
    return total


def two_searches(reader: Any, ldap: Any, since: int, nc: str) -> int:
    from certsync.directory.settings import USER_FILTER

    scoped = list(reader._users(ldap, f"(uSNChanged>={since + 1})"))
    anywhere = list(
        reader._paged(
            ldap, nc, f"(&{USER_FILTER}(uSNChanged>={since + 1}))", ["objectGUID", "isDeleted"], deleted=True
        )
    )
    return len(scoped) + len(anywhere)


def one_search(reader: Any, ldap: Any, since: int, nc: str) -> int:
    changed, _group = reader.changed_in_domain(ldap, since=since, naming_context=nc)
    live = sorted({guid for guid, deleted in changed if not deleted})
    return len(changed) + len(list(reader.iter_by_guid(ldap, live)))


def measure(users: int, share: float, rounds: int) -> dict[str, Any]:
    from certsync.directory import DirectoryReader, DirectorySettings

    stack = bench_cycle.build(users)
    stack.samba.start()
    try:
        samba = stack.samba
        settings = DirectorySettings(
            url=samba.ldap_url, bind_dn=samba.bind_dn, password=samba.password, base_dn=samba.users_ou,
            allow_plain_bind=True, page_size=1000, time_limit_s=600,
        )  # fmt: skip
        reader = DirectoryReader(settings=settings)
        pgid = os.getpgid(samba._own_pid() or 0)  # started in its own session: its workers share the group
        figures: dict[str, Any] = {"users": users, "churn": share, "rounds": []}
        with reader.session() as ldap:
            server = reader.identity(ldap)
            figures["churned"] = bench_cycle.churn(stack, share, seed=int(time.time()))
            for _ in range(rounds):
                for name, search in (("two searches", two_searches), ("one search", one_search)):
                    cpu, began = group_cpu_s(pgid), time.perf_counter()
                    entries = search(reader, ldap, server.highest_usn, server.naming_context)
                    row = {
                        "way": name,
                        "seconds": time.perf_counter() - began,
                        "samba_cpu_s": group_cpu_s(pgid) - cpu,
                    }
                    row |= {"entries": entries, "load1": os.getloadavg()[0]}
                    figures["rounds"].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stack.samba.stop()
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    figures = measure(args.users, args.churn, args.rounds)
    (bench_cycle.lab_home(args.users) / "delta_search.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
