"""Reading a source on a thread of its own, a few items ahead of the code that uses them: the
directory's next page is read while the previous one is copied into PostgreSQL, and Exchange
Online builds its next page of recipients while this process decodes the current one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, Self, TypeVar

T = TypeVar("T")
_DONE = object()


class ReadAhead(Generic[T]):
    """The items of `items`, in order, read by a thread from the moment this is made, at most
    `ahead` of the consumer (so memory stays bounded). An exception of the source is raised to the
    consumer where the item would have come. Close it (or use it as a context manager) to stop
    the thread when the consumer stops early."""

    def __init__(self, items: Iterator[T], *, ahead: int = 2, name: str = "read-ahead") -> None:
        self._handoff: queue.Queue[object] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        while (item := self._handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _offer(self, item: object) -> bool:
        while not self._stop.is_set():  # the consumer may have stopped (its COPY failed)
            try:
                self._handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._offer(item):
                    return
            self._offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._offer(exc)
