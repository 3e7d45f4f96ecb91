"""Exceptions of the Exchange Online client (a module of their own: auth and client both raise them)."""

from __future__ import annotations


class ExchangeError(RuntimeError):
    """A call failed for good: not retryable, or out of attempts. `status` is the last HTTP status
    (None: no answer), which tells a service that is down from a refusal."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ExchangeShapeError(ExchangeError):
    """Exchange answered in a shape certsync cannot read (a certificate value, a page): the stage
    stops rather than take what it cannot read for "no certificates"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=200, code="UnreadableShape")
