"""Validate many values on a process pool (the verifier holds the GIL, so threads do not help).

Only bytes, the picklable TrustSpec and the results cross the process boundary; each worker loads
the trust configuration once and keeps one Validator, so its verified-intermediate cache is reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime
from typing import Any

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


def _check_batch(
    batch: Sequence[tuple[str, bytes]], at: datetime, encode: Encoder | None = None
) -> list[Any]:
    assert _worker_validator is not None, "worker not initialised"
    check = _worker_validator.check
    verdicts = [check(attribute=attribute, value=value, at=at) for attribute, value in batch]
    return encode(verdicts) if encode is not None else verdicts


# Turns a batch's verdicts into what the caller keeps (e.g. rows to store), in the worker: a
# module-level function, so it pickles by name; plain tuples cross the pipe far cheaper than Verdicts.
Encoder = Callable[[list[Verdict]], list[Any]]


class Checking:
    """Verdicts (or encoded verdicts) of one submitted chunk, in input order, once they are ready."""

    def __init__(self, parts: list[Future[list[Any]]] | list[Any]) -> None:
        self._parts = parts

    def result(self) -> list[Any]:
        if self._parts and isinstance(self._parts[0], Future):
            return [item for part in self._parts for item in part.result()]
        return self._parts


class ValidationPool:
    """Validators for many chunks of values: in this process for small work, else on `processes`
    spawned workers, started at the first chunk larger than one batch and kept until the end, so
    a stage can read, check and save its values a chunk at a time with bounded memory."""

    def __init__(
        self,
        *,
        trust: TrustSpec,
        at: datetime,
        processes: int,
        batch_size: int = 500,
        fingerprint: str | None = None,
    ) -> None:
        loaded = trust.load()  # fails here, in the caller, on a bad configuration
        if fingerprint is not None and loaded.fingerprint != fingerprint:
            raise TrustConfigError("the trust files changed since the run began; start a new run")
        self._spec, self._loaded, self._at = trust, loaded, at
        self._processes, self._batch_size = processes, batch_size
        self._local: Validator | None = None
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ValidationPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._pool is None:
            return
        if exc is None:
            self._pool.shutdown(wait=True)
        else:
            # Interrupted (task timeout, SIGTERM, a worker's failure): stop the workers now rather
            # than let them finish batches nobody will read.
            _stop(self._pool)

    def check(self, items: Sequence[tuple[str, bytes]]) -> list[Verdict]:
        """Verdicts for (attribute, value) pairs, in input order."""
        return self.submit(items).result()

    def submit(self, items: Sequence[tuple[str, bytes]], *, encode: Encoder | None = None) -> Checking:
        """Start checking (attribute, value) pairs and return at once, so the caller can read the
        next chunk or save the previous one meanwhile; small work is checked here, before returning."""
        if self._pool is None and (self._processes <= 1 or len(items) <= self._batch_size):
            self._local = self._local or Validator(trust=self._loaded)
            verdicts = [self._local.check(attribute=a, value=v, at=self._at) for a, v in items]
            return Checking(encode(verdicts) if encode is not None else verdicts)
        size, workers = self._batch_size, self._workers()
        with _main_not_rerun():  # workers start on the first submissions
            futures = [
                workers.submit(_check_batch, items[i : i + size], self._at, encode)
                for i in range(0, len(items), size)
            ]
        return Checking(futures)

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")  # fork would copy the caller's threads and pools
            _forget_inherited_pool_state()
            log.info("validating on %d processes", self._processes)
            self._pool = ProcessPoolExecutor(
                max_workers=self._processes,
                mp_context=context,
                initializer=_init_worker,
                initargs=(self._spec, os.getpid()),
            )
        return self._pool


def _forget_inherited_pool_state() -> None:
    """Under the Celery executor a task runs in a fork of a daemonic billiard pool process and
    inherits two things that stop multiprocessing from starting the workers: the `daemon` flag
    ("daemonic processes are not allowed to have children") and an authkey of billiard's own type,
    which the spawn start method refuses to pickle. The task process is no one's daemon (the workers
    die with it through PR_SET_PDEATHSIG and are stopped when it is interrupted): drop the flag and
    keep the key's bytes as multiprocessing's own type."""
    current = multiprocessing.current_process()
    if current.daemon:
        log.info("clearing the daemon flag inherited from the executor's pool process")
        current._config["daemon"] = False  # private: the setter refuses a process already started
    current._config["authkey"] = multiprocessing.process.AuthenticationString(bytes(current.authkey))


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """A spawned worker first re-runs the parent's __main__ script (multiprocessing's "fixup"). In an
    Airflow task that is the `airflow` command, which sets Airflow up again in every worker and
    fails there (the task process is given no database URL). The workers need only certsync's own
    modules: the script is hidden while they start."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None) if getattr(main, "__spec__", None) is None else None
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


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
    with ValidationPool(
        trust=trust, at=at, processes=processes, batch_size=batch_size, fingerprint=fingerprint
    ) as pool:
        return pool.check(items)


def _stop(pool: ProcessPoolExecutor) -> None:
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(timeout=5)
