"""Runtime knobs tests turn: throttle budget, concurrency cap, latency and fault injection.

Microsoft publishes no budget for InvokeCommand, so every limit here is settable while the
emulator runs; clients must cope with whatever budget they meet.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# The fault-rule name that targets the token endpoint instead of a cmdlet.
AUTH_ENDPOINT_TARGET = "token"
# How certificate values come back on read (unknown for the real service; each is plausible):
# base64 text, {"Data": base64}, {"Data": [int, ...]}, or the .NET type name instead of bytes.
READ_VALUE_SHAPES = ("base64", "data_base64", "data_ints", "type_name")
# What a Get-* does with -Filter (OPATH) on WhenChanged/WhenChangedUTC: Microsoft documents both as
# filterable, but nothing was tried on a live tenant, so a refusal (ParameterBindingException, 400)
# and a filter accepted but not applied (every recipient returned) are modelled too.
FILTER_MODES = ("honoured", "refused", "ignored")
# How WhenChanged/WhenChangedUTC come back (unknown over REST): ISO 8601 with an offset or a "Z",
# the .NET JSON date "/Date(ms)/", or left out of the answer.
WHEN_CHANGED_SHAPES = ("iso", "iso_z", "date_ms", "absent")


@dataclass(kw_only=True)
class FaultRule:
    """Answer the next ``count`` requests for ``cmdlet`` ("*" = any) with a failure."""

    cmdlet: str
    count: int
    status: int = 503
    exception_type: str | None = None
    text: str | None = None
    retry_after: int | None = None

    def matches(self, cmdlet: str) -> bool:
        # "*" means any cmdlet; the token endpoint is only faulted when named explicitly.
        wildcard = self.cmdlet == "*" and cmdlet != AUTH_ENDPOINT_TARGET
        return self.count > 0 and (wildcard or self.cmdlet == cmdlet)


@dataclass(kw_only=True)
class HoldRule:
    """Hold the next ``count`` requests for ``cmdlet`` ("*" = any): ``before_ms`` before the cmdlet
    runs (a fault answered then leaves nothing applied) and ``after_ms`` after it ran, i.e. applied
    but not yet answered: the window in which a client times out or dies without knowing.
    ``then_status`` refuses the held request itself after ``before_ms`` (nothing applied): a separate
    fault rule would go to whichever concurrent request reaches it first, not the held one."""

    cmdlet: str
    count: int
    before_ms: float = 0.0
    after_ms: float = 0.0
    then_status: int | None = None

    def matches(self, cmdlet: str) -> bool:
        return self.count > 0 and self.cmdlet in ("*", cmdlet)


@dataclass(kw_only=True)
class EmulatorConfig:
    rate_per_s: float | None = None
    burst: int = 10
    max_concurrency: int | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    require_anchor_mailbox: bool = True
    faults: list[FaultRule] = field(default_factory=list)
    holds: list[HoldRule] = field(default_factory=list)
    # Refuse request shapes the ExchangeOnlineManagement module never sends (bare base64 strings for
    # a byte[][] parameter, a collection without its "@odata.type" annotation).
    strict: bool = True
    # The switchable unknowns: value shape on read, the status of the per-tenant concurrency
    # message, whether Get-Recipient returns the certificate properties at all.
    read_value_shape: str = "base64"
    concurrency_status: int = 429
    get_recipient_certificates: bool = True
    # Some failures come back as 200 with @adminapi.errors (a Set-* refused for its parameters or scope).
    adminapi_errors_on_200: bool = False
    # Reads show a recipient as it was before a write for this long (eventual consistency).
    read_lag_s: float = 0.0
    # Values one certificate property may hold (None: no cap; Entra ID's is 15).
    max_values: int | None = None
    # Cmdlets outside the app's role: 403 with a gzip-declared body of NUL bytes, as captured.
    denied_cmdlets: list[str] = field(default_factory=list)
    # Rate-Limit-Limit as the service announces it (informational).
    rate_limit_limit: int = 30000
    # -Filter on WhenChanged (FILTER_MODES), the shape of WhenChanged on read (WHEN_CHANGED_SHAPES),
    # the service's clock against this host's (every stamp shown and compared `clock_offset_s` off), and the precision
    # of the stamps (truncated to whole multiples of this many seconds).
    filter_mode: str = "honoured"
    when_changed_shape: str = "iso"
    clock_offset_s: float = 0.0
    when_changed_precision_s: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class RateDecision:
    allowed: bool
    remaining: int
    retry_after_s: int
    reset_s: int

    def headers(self, *, limit: int) -> dict[str, str]:
        """Rate headers as the service sends them: Rate-Limit-Reset is an ISO timestamp."""
        reset_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.reset_s)
        return {
            "Rate-Limit-Limit": str(limit),
            "Rate-Limit-Remaining": str(self.remaining),
            "Rate-Limit-Reset": reset_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }


class TokenBucket:
    def __init__(self, *, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def take(self) -> RateDecision:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        allowed = self._tokens >= 1.0
        if allowed:
            self._tokens -= 1.0
        missing = max(0.0, 1.0 - self._tokens)
        return RateDecision(
            allowed=allowed,
            remaining=int(self._tokens),
            retry_after_s=max(1, math.ceil(missing / self.rate_per_s)) if not allowed else 0,
            reset_s=math.ceil((self.burst - self._tokens) / self.rate_per_s),
        )


class Controls:
    """The live configuration plus the state it needs (bucket, in-flight count, fault budget)."""

    def __init__(self, *, config: EmulatorConfig | None = None) -> None:
        self._lock = threading.Lock()
        self.config = config or EmulatorConfig()
        self._bucket = self._new_bucket()
        self._in_flight: dict[str, int] = {}

    def _new_bucket(self) -> TokenBucket | None:
        if self.config.rate_per_s is None:
            return None
        return TokenBucket(rate_per_s=self.config.rate_per_s, burst=self.config.burst)

    def update(self, changes: dict[str, Any]) -> EmulatorConfig:
        """Apply a partial update; unknown keys or bad values raise ValueError."""
        with self._lock:
            merged = {**self.config.as_dict(), **changes}
            unknown = set(changes) - set(EmulatorConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
            merged["faults"] = [FaultRule(**rule) for rule in merged.get("faults") or []]
            merged["holds"] = [HoldRule(**rule) for rule in merged.get("holds") or []]
            config = EmulatorConfig(**merged)
            _validate(config)
            self.config = config
            self._bucket = self._new_bucket()
            return config

    def take_rate(self) -> RateDecision | None:
        with self._lock:
            return None if self._bucket is None else self._bucket.take()

    def enter(self, tenant: str) -> bool:
        """Count a request in flight; False when the per-tenant cap is already reached."""
        with self._lock:
            current = self._in_flight.get(tenant, 0)
            cap = self.config.max_concurrency
            if cap is not None and current >= cap:
                return False
            self._in_flight[tenant] = current + 1
            return True

    def leave(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] = max(0, self._in_flight.get(tenant, 0) - 1)

    def take_fault(self, cmdlet: str) -> FaultRule | None:
        with self._lock:
            for rule in self.config.faults:
                if rule.matches(cmdlet):
                    rule.count -= 1
                    return FaultRule(**asdict(rule))
            return None

    def take_hold(self, cmdlet: str) -> HoldRule | None:
        with self._lock:
            for rule in self.config.holds:
                if rule.matches(cmdlet):
                    rule.count -= 1
                    return HoldRule(**asdict(rule))
            return None

    def latency_s(self) -> float:
        config = self.config
        jitter = random.uniform(0.0, config.jitter_ms) if config.jitter_ms > 0 else 0.0
        return max(0.0, config.latency_ms + jitter) / 1000.0


def _validate(config: EmulatorConfig) -> None:
    if config.rate_per_s is not None and config.rate_per_s <= 0:
        raise ValueError("rate_per_s must be positive (or null for no limit)")
    if config.burst < 1:
        raise ValueError("burst must be at least 1")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1 (or null for no cap)")
    if config.read_value_shape not in READ_VALUE_SHAPES:
        raise ValueError(f"read_value_shape must be one of {', '.join(READ_VALUE_SHAPES)}")
    if not 200 <= config.concurrency_status <= 599:
        raise ValueError("concurrency_status must be an HTTP status")
    if config.read_lag_s < 0 or (config.max_values is not None and config.max_values < 1):
        raise ValueError("read_lag_s must not be negative and max_values must be at least 1")
    if config.latency_ms < 0 or config.jitter_ms < 0:
        raise ValueError("latency_ms and jitter_ms must not be negative")
    if config.filter_mode not in FILTER_MODES:
        raise ValueError(f"filter_mode must be one of {', '.join(FILTER_MODES)}")
    if config.when_changed_shape not in WHEN_CHANGED_SHAPES:
        raise ValueError(f"when_changed_shape must be one of {', '.join(WHEN_CHANGED_SHAPES)}")
    if config.when_changed_precision_s < 1:
        raise ValueError("when_changed_precision_s must be at least 1")
    for rule in config.faults:
        if not 400 <= rule.status <= 599:
            raise ValueError(f"fault status must be an HTTP error status, got {rule.status}")
        if rule.count < 0:
            raise ValueError("fault count must not be negative")
    for hold in config.holds:
        if hold.count < 0 or hold.before_ms < 0 or hold.after_ms < 0:
            raise ValueError("hold count, before_ms and after_ms must not be negative")
        if hold.then_status is not None and not 400 <= hold.then_status <= 599:
            raise ValueError(f"hold then_status must be an HTTP error status, got {hold.then_status}")
