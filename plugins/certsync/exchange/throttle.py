"""Throughput that respects the tenant: adaptive concurrency and pacing (additive increase,
multiplicative decrease), and a circuit breaker that stops a batch when Exchange Online is down.

Microsoft publishes no budget for InvokeCommand, so nothing here assumes one. The client sends
unpaced (bounded by its concurrency window) until the service first throttles; from then on it paces
at a rate that grows by about one request per second every second while answers are good and drops
by a fifth on each throttling event (one decrease per event: answers to requests sent before the last
decrease do not count again). The per-tenant concurrency message is about a count, not a rate: it
steps the concurrency window down by one (once per event) and holds it there for a while before
probing one higher, so a small cap costs one refusal per probe, not one per round trip.
Rate-Limit-Remaining at 0 holds the rate where it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from certsync.exchange.outcomes import ACCEPTED, THROTTLED, UNAVAILABLE, UNKNOWN, Outcome

log = logging.getLogger(__name__)

RATE_DECREASE = 0.8
WINDOW_HOLD_S = 30.0  # after a concurrency refusal, the window stays put this long before growing
RATE_INCREASE_PER_S = 1.0  # additive increase: requests/s gained per second of good answers
MIN_RATE = 0.2
WINDOW_S = 2.0  # span over which the achieved rate is measured
LOG_WAIT_S = 1.0  # pacing waits at least this long are logged one by one


@dataclass(frozen=True)
class Ticket:
    """One admitted request: when it was sent, to tell old answers from new ones."""

    sent_at: float


class Throttle:
    """Admission for every request of one client (thread-safe)."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        initial_concurrency: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.window = float(initial_concurrency or self.max_concurrency)
        self.rate: float | None = None  # requests/s; None until the service first throttles
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._in_flight = 0
        self._next_send = 0.0
        self._decreased_at = float("-inf")
        self._window_decreased_at = float("-inf")
        self._window_hold_until = float("-inf")
        self._sent: deque[float] = deque()
        self.waited_s = 0.0
        self.decreases = 0

    def acquire(self, what: str) -> Ticket:
        """Wait for a free slot in the window and the pacing time; returns the ticket to release."""
        with self._cond:
            started = self._clock()
            while self._in_flight >= int(self.window):
                self._cond.wait(timeout=1.0)
            self._in_flight += 1
            now = self._clock()
            send_at = max(now, self._next_send)
            if self.rate is not None:
                self._next_send = send_at + 1.0 / self.rate
        wait = send_at - now
        if wait > 0:
            self._sleep(wait)
        total = self._clock() - started
        self.waited_s += total
        if total >= LOG_WAIT_S:
            log.info(
                "%s waited %.1fs for the tenant's budget (%.1f req/s, window %d)",
                what,
                total,
                self.rate or 0.0,
                int(self.window),
            )
        sent = self._clock()
        with self._cond:
            self._sent.append(sent)
            while self._sent and self._sent[0] < sent - WINDOW_S:
                self._sent.popleft()
        return Ticket(sent_at=sent)

    def release(self, ticket: Ticket, outcome: Outcome) -> None:
        """Free the slot and adapt to what the answer said."""
        with self._cond:
            self._in_flight -= 1
            if outcome.kind == THROTTLED and outcome.code == "ConcurrencyLimit":
                if ticket.sent_at > self._window_decreased_at:
                    self._narrow(outcome)
            elif outcome.kind == THROTTLED and ticket.sent_at > self._decreased_at:
                self._decrease(outcome)
            elif outcome.kind == ACCEPTED or outcome.status in (200, 400, 404):
                self._increase(outcome)
            self._cond.notify_all()

    def _achieved(self) -> float:
        span = max(self._clock() - self._sent[0], 0.25) if self._sent else 1.0
        return len(self._sent) / span

    def _decrease(self, outcome: Outcome) -> None:
        before = self.rate
        self.rate = max(MIN_RATE, min(self.rate or float("inf"), self._achieved()) * RATE_DECREASE)
        self._decreased_at = self._clock()
        self.decreases += 1
        log.warning(
            "Exchange Online throttled (%s, Retry-After %s): pacing %s -> %.1f req/s",
            outcome.code,
            outcome.retry_after_s,
            "unpaced" if before is None else f"{before:.1f}",
            self.rate,
        )

    def _narrow(self, outcome: Outcome) -> None:
        before = self.window
        self.window = max(1.0, float(int(self.window) - 1))
        now = self._clock()
        self._window_decreased_at = now
        self._window_hold_until = now + WINDOW_HOLD_S
        self.decreases += 1
        log.warning(
            "Exchange Online refused a request over the tenant's concurrency (HTTP %s): window %d -> %d,"
            " held for %.0fs",
            outcome.status,
            int(before),
            int(self.window),
            WINDOW_HOLD_S,
        )

    def _increase(self, outcome: Outcome) -> None:
        if outcome.rate.get("Rate-Limit-Remaining") == "0":
            return  # the budget is spent: hold, do not grow into the next 429
        if self._clock() >= self._window_hold_until:
            self.window = min(float(self.max_concurrency), self.window + 1.0 / max(self.window, 1.0))
        if self.rate is not None:
            self.rate += RATE_INCREASE_PER_S / max(self.rate, 1.0)


class ExchangeDown(RuntimeError):
    """The circuit breaker opened: Exchange Online failed every recent request."""


class CircuitBreaker:
    """Opens after `threshold` requests in a row fail at the service (unavailable, no answer, 5xx),
    so a batch stops in seconds instead of trying every action five times. Any answer that shows the
    service working (accepted, or a refusal of the cmdlet) closes it again."""

    def __init__(self, *, threshold: int) -> None:
        self.threshold = max(1, threshold)
        self._lock = threading.Lock()
        self._failures = 0
        self.last: Outcome | None = None

    @property
    def open(self) -> bool:
        return self._failures >= self.threshold

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            if outcome.kind in (UNAVAILABLE, UNKNOWN) or (outcome.status or 0) >= 500:
                self._failures += 1
                self.last = outcome
                if self._failures == self.threshold:
                    log.error(
                        "Exchange Online looks down: %d requests in a row failed (last: HTTP %s %s: %s);"
                        " no more requests this batch",
                        self._failures,
                        outcome.status or "no answer",
                        outcome.code,
                        (outcome.detail or "")[:200],
                    )
            elif outcome.kind != THROTTLED:
                self._failures = 0

    def describe(self) -> str:
        last = self.last
        if last is None:
            return "Exchange Online failed every recent request"
        return (
            f"Exchange Online looks down: {self._failures} requests in a row failed"
            f" (last: HTTP {last.status or 'no answer'} {last.code}: {(last.detail or '')[:200]})"
        )
