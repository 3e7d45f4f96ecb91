"""Publishing throughput against a tenant budget: N Set-* actions (one per recipient) sent by the
certsync Exchange client, as the publish stage sends them (a pool of --client-concurrency workers,
the client's adaptive window and pacing, Retry-After honoured, up to max_attempts per action),
against the emulator with a rate budget of --rate requests/s (token bucket, --burst), a per-tenant
concurrency cap --cap, and latency --latency-ms plus up to --jitter-ms.

    .venv/bin/python bench/bench_publish.py                       # 10,000 actions, R=50/s, C=8
    .venv/bin/python bench/bench_publish.py --actions 2000 --rate 20 --cap 4

Prints: achieved throughput / budget (accepted Set-* per second over the publishing wall time,
divided by R), the share of 429 answers (rate and concurrency refusals over all InvokeCommand
requests, from the emulator's own request log), and requests per changed recipient (Set-* requests
over actions). Postgres and the write-ahead audit are not in the loop: this measures the client and
its throttle against the service's budget. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from certsync.config import ExchangeSettings
from certsync.directory import DirectoryUser
from certsync.exchange.client import ExchangeClient
from certsync.exchange.outcomes import backoff_s
from certsync.exchange.recipients import Recipient
from certsync_lab.emulator.process import EmulatorProcess
from certsync_lab.emulator.seed import Shares, seed_from_directory
from certsync_lab.emulator.state import register_client

log = logging.getLogger("bench_publish")
CLIENT_ID = "44444444-aaaa-4bbb-8ccc-000000000001"
SECRET = "bench-secret-not-real"  # noqa: S105 - the emulator's lab client


def _users(count: int) -> list[DirectoryUser]:
    import uuid

    return [
        DirectoryUser(
            object_guid=uuid.uuid5(uuid.NAMESPACE_DNS, f"bench{i}.example.test"),
            dn=f"CN=bench{i},OU=People,DC=example,DC=test",
            sam_account_name=f"bench{i}",
            mail=f"bench{i}@example.test",
            proxy_addresses=(f"SMTP:bench{i}@example.test",),
            user_certificate=(),
            user_smime_certificate=(),
            user_account_control=512,
            usn_changed=1000 + i,
            display_name=f"Bench {i}",
        )
        for i in range(count)
    ]


def _seed(home: Path, count: int) -> None:
    if (home / "seeded").exists():
        return
    register_client(home, CLIENT_ID, secret=SECRET)
    shares = Shares(mailbox=0.7, mailuser=0.2, contact=0.1, missing=0, dirsynced=0)
    seed_from_directory(home=home, users=_users(count), shares=shares, seed=11)
    (home / "seeded").write_text(str(count))


def _publish_one(client: ExchangeClient, recipient: Recipient, value: bytes, counts: Counter) -> str:
    """One action as the publish stage sends it: attempts until a final answer."""
    for attempt in range(1, client.settings.max_attempts + 1):
        outcome = client.set_certificates(
            cmdlet=recipient.cmdlet or "Set-Mailbox",
            identity=recipient.recipient_id,
            user_certificate=[value],
            user_smime_certificate=[],
        )
        counts["set_requests"] += 1
        if not outcome.retryable:
            return outcome.kind
        time.sleep(backoff_s(outcome, attempt))
    return "out_of_attempts"


def run(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(args.home or tempfile.mkdtemp(prefix="bench-publish-"))
    _seed(home, args.actions)
    with EmulatorProcess(home=home) as emulator:
        settings = ExchangeSettings(
            base_url=emulator.url,
            tenant_id=emulator.tenant_id,
            client_id=CLIENT_ID,
            authority_host=emulator.url,
            client_secret=SECRET,
            ca_file=str(emulator.ca_file),
            max_concurrency=args.client_concurrency,
            max_attempts=8,
        )
        client = ExchangeClient.connect(settings)
        emulator.control.reset_config()
        recipients = [Recipient.from_exchange(obj) for obj in client.recipients()][: args.actions]
        emulator.control.set_config(
            rate_per_s=args.rate,
            burst=args.burst or max(1, int(args.rate)),
            max_concurrency=args.cap,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
        )
        emulator.control.clear_requests()
        counts: Counter = Counter()
        stamp = os.urandom(4)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.client_concurrency) as pool:
            kinds = pool.map(
                lambda r: _publish_one(client, r, b"\x30\x82" + stamp + r.recipient_id.encode(), counts),
                recipients,
            )
            outcomes = Counter(kinds)
        wall = time.monotonic() - started
        log_entries = [e for e in emulator.control.requests() if e["endpoint"] == "InvokeCommand"]
    statuses = Counter(e["status"] for e in log_entries)
    refused = sum(1 for e in log_entries if e["status"] == 429 or e["outcome"] == "ConcurrencyLimit")
    return {
        "actions": len(recipients),
        "rate_budget": args.rate,
        "concurrency_cap": args.cap,
        "latency_ms": f"{args.latency_ms}+{args.jitter_ms}",
        "client_concurrency": args.client_concurrency,
        "wall_s": round(wall, 1),
        "accepted": outcomes["accepted"],
        "outcomes": dict(outcomes),
        "throughput_per_s": round(outcomes["accepted"] / wall, 2),
        "throughput_over_budget": round(outcomes["accepted"] / wall / args.rate, 3),
        "requests": len(log_entries),
        "statuses": dict(statuses),
        "share_429": round(refused / max(1, len(log_entries)), 4),
        "requests_per_changed_recipient": round(counts["set_requests"] / max(1, outcomes["accepted"]), 3),
        "pacing_decreases": client.throttle.decreases,
        "final_pace_per_s": round(client.throttle.rate or 0.0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=50.0, help="emulator budget R, requests/s")
    parser.add_argument("--burst", type=int, default=0, help="token bucket size (default: R)")
    parser.add_argument("--cap", type=int, default=8, help="emulator per-tenant concurrency cap C")
    parser.add_argument("--latency-ms", type=float, default=120.0)
    parser.add_argument("--jitter-ms", type=float, default=80.0)
    parser.add_argument("--client-concurrency", type=int, default=8)
    parser.add_argument("--home", help="emulator home (kept: a second run skips seeding)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
