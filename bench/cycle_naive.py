"""The naive baseline of bench_cycle.py: what a straightforward script would do every cycle.

A full directory read; every value validated again (no verdict cache), one process; one Get-Recipient
request per recipient (no paged bulk read); compare; one Set-* per changed recipient, sequentially,
without the write-ahead audit. The read is measured whole; the per-user steps on a sample of users,
extrapolated linearly to the whole population (their cost per user does not depend on its size)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from certsync.certificates.validate import Validator
from certsync.directory import DirectoryUser
from certsync.exchange import wire
from certsync.exchange.client import CERTIFICATE_FIELDS, certificates_of
from certsync.exchange.errors import ExchangeError
from certsync.exchange.recipients import CMDLET_BY_TYPE, hashes


def _valid(validator: Validator, user: DirectoryUser, at: datetime) -> tuple[list[bytes], list[bytes]]:
    def keep(attribute: str, values: tuple[bytes, ...]) -> list[bytes]:
        return [v for v in values if validator.check(attribute=attribute, value=v, at=at).ok]

    return keep("userCertificate", user.user_certificate), keep(
        "userSMIMECertificate", user.user_smime_certificate
    )


def _get(exchange: Any, identity: str) -> dict | None:
    url = exchange._url + wire.select_query((*CERTIFICATE_FIELDS, "RecipientTypeDetails"))
    try:
        found = exchange.call("Get-Recipient", {"Identity": identity}, url=url).body
    except ExchangeError:
        return None
    value = (found or {}).get("value") or []
    return value[0] if value else None


def run(services: Any, *, sample: int) -> dict[str, Any]:
    """The naive cycle; per-step seconds for the sample and extrapolated to every user."""
    at = datetime.now(UTC)
    began = time.perf_counter()
    users = list(services.directory().iter_users())
    read_s = time.perf_counter() - began
    picked = [u for u in users if u.mail][:sample]
    validator = Validator(trust=services.settings.trust.load())
    steps = {"validate": 0.0, "get": 0.0, "set": 0.0}
    counts = {"values": 0, "gets": 0, "sets": 0}
    for user in picked:
        began = time.perf_counter()
        wanted = _valid(validator, user, at)
        steps["validate"] += time.perf_counter() - began
        counts["values"] += len(user.user_certificate) + len(user.user_smime_certificate)
        began = time.perf_counter()
        found = _get(services.exchange, user.mail)
        steps["get"] += time.perf_counter() - began
        counts["gets"] += 1
        cmdlet = CMDLET_BY_TYPE.get(str((found or {}).get("RecipientTypeDetails")))
        if found is None or cmdlet is None:
            continue
        held = certificates_of(found, who=user.mail)
        if [sorted(hashes(v)) for v in held] == [sorted(hashes(v)) for v in wanted]:
            continue
        began = time.perf_counter()
        services.exchange.set_certificates(
            cmdlet=cmdlet, identity=user.mail, user_certificate=wanted[0], user_smime_certificate=wanted[1]
        )
        steps["set"] += time.perf_counter() - began
        counts["sets"] += 1
    scale = len(users) / max(1, len(picked))
    extrapolated = {k: v * scale for k, v in steps.items()}
    return {
        "users": len(users),
        "sample": len(picked),
        "scale": scale,
        "read_s": read_s,
        "sample_s": steps,
        "sample_counts": counts,
        "extrapolated_s": extrapolated,
        "total_s": read_s + sum(extrapolated.values()),
    }
