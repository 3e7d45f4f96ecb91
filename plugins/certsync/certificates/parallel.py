"""Validate many values on a process pool (the verifier holds the GIL, so threads do not help).

Only bytes and the picklable TrustSpec cross the process boundary; each worker loads the trust
configuration once and keeps one Validator, so its verified-intermediate cache is reused.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime

from certsync.certificates.trust import TrustConfigError, TrustSpec
from certsync.certificates.validate import Validator
from certsync.certificates.verdict import Verdict

log = logging.getLogger(__name__)

_worker_validator: Validator | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the process that started it dies, however it dies
    (a task killed with SIGKILL runs no cleanup of its own); elsewhere, only the pool's shutdown
    stops workers."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    # The parent may have died before prctl took effect: then nobody would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(spec: TrustSpec, parent_pid: int | None = None) -> None:
    global _worker_validator
    if parent_pid is not None:
        _die_with_parent(parent_pid)
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
    pool = ProcessPoolExecutor(
        max_workers=processes, mp_context=context, initializer=_init_worker, initargs=(trust, os.getpid())
    )
    try:
        results = list(pool.map(_check_batch, batches, [at] * len(batches)))
    except BaseException:
        # Interrupted (task timeout, SIGTERM, a worker's failure): stop the workers now rather than
        # let them finish batches nobody will read.
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return [verdict for batch in results for verdict in batch]


def _stop(pool: ProcessPoolExecutor) -> None:
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)
