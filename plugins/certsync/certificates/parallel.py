"""Validate many values on a process pool (the verifier holds the GIL, so threads do not help).

Only bytes and the picklable TrustSpec cross the process boundary; each worker loads the trust
configuration once and keeps one Validator, so its verified-intermediate cache is reused.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime

from certsync.certificates.trust import TrustConfigError, TrustSpec
from certsync.certificates.validate import Validator
from certsync.certificates.verdict import Verdict

log = logging.getLogger(__name__)

_worker_validator: Validator | None = None


def _init_worker(spec: TrustSpec) -> None:
    global _worker_validator
    _worker_validator = Validator(trust=spec.load())


def _check_batch(batch: Sequence[tuple[str, bytes]], at: datetime) -> list[Verdict]:
    assert _worker_validator is not None, "worker not initialised"
    check = _worker_validator.check
    return [check(attribute=attribute, value=value, at=at) for attribute, value in batch]


def validate_many(
    items: Sequence[tuple[str, bytes]],
    *,
    trust: TrustSpec,
    at: datetime,
    processes: int,
    batch_size: int = 500,
    fingerprint: str | None = None,
) -> list[Verdict]:
    """Verdicts for (attribute, value) pairs, in input order. With `fingerprint`, the trust files
    must still be the ones it was taken from: verdicts are cached under it."""
    loaded = trust.load()  # fails here, in the caller, on a bad configuration
    if fingerprint is not None and loaded.fingerprint != fingerprint:
        raise TrustConfigError("the trust files changed since the run began; start a new run")
    if processes <= 1 or len(items) <= batch_size:
        validator = Validator(trust=loaded)
        return [validator.check(attribute=a, value=v, at=at) for a, v in items]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    context = multiprocessing.get_context("spawn")  # fork would copy the caller's threads and pools
    log.info("validating %d values in %d batches on %d processes", len(items), len(batches), processes)
    with ProcessPoolExecutor(
        max_workers=processes, mp_context=context, initializer=_init_worker, initargs=(trust,)
    ) as pool:
        results = pool.map(_check_batch, batches, [at] * len(batches))
        return [verdict for batch in results for verdict in batch]
