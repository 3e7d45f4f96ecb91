"""An in-memory log of the requests the emulator answered, for tests and benchmarks to read."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_ENTRIES = 100_000


@dataclass(frozen=True, kw_only=True)
class RequestEntry:
    timestamp: str
    endpoint: str
    status: int
    client_request_id: str | None
    cmdlet: str | None = None
    identity: str | None = None
    client_id: str | None = None
    outcome: str | None = None
    duration_ms: float = 0.0


class RequestLog:
    def __init__(self, *, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: deque[RequestEntry] = deque(maxlen=max_entries)
        self._lock = threading.Lock()

    def append(self, entry: RequestEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(entry) for entry in self._entries]

    def clear(self) -> int:
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count
