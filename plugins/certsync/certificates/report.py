"""Reports over verdicts for admins."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from certsync.certificates.verdict import Verdict


def expiring_soon(verdicts: Iterable[Verdict], *, at: datetime, window: timedelta) -> list[Verdict]:
    """Valid certificates whose validity ends within `window` after `at`, soonest first."""
    horizon = at + window
    soon = [v for v in verdicts if v.ok and v.not_after is not None and at <= v.not_after <= horizon]
    return sorted(soon, key=lambda v: (v.not_after, v.sha256))
