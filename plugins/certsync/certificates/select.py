"""Choose the values to publish for one recipient attribute: valid, unique, newest first, capped.

Exchange Online (like Entra ID) refuses an object with more than 15 values in these attributes, so the
cap is applied here and every dropped value is accounted for with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from certsync.certificates.reasons import Reason
from certsync.certificates.verdict import Verdict

MAX_VALUES = 15
_OLDEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Selection:
    kept: tuple[Verdict, ...]
    dropped: tuple[tuple[Verdict, Reason], ...]


def _newest_first(verdict: Verdict) -> tuple[datetime, datetime, bytes]:
    return (verdict.not_before or _OLDEST, verdict.not_after or _OLDEST, verdict.sha256)


def select_values(verdicts: Sequence[Verdict], *, limit: int = MAX_VALUES) -> Selection:
    """Kept: valid verdicts, one per sha256, newest first, at most `limit`.

    Refused verdicts are neither kept nor dropped here: they already carry their own reason.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    seen: set[bytes] = set()
    unique: list[Verdict] = []
    dropped: list[tuple[Verdict, Reason]] = []
    for verdict in verdicts:
        if not verdict.ok:
            continue
        if verdict.sha256 in seen:
            dropped.append((verdict, Reason.DUPLICATE))
            continue
        seen.add(verdict.sha256)
        unique.append(verdict)
    unique.sort(key=_newest_first, reverse=True)
    dropped.extend((verdict, Reason.OVER_LIMIT) for verdict in unique[limit:])
    return Selection(kept=tuple(unique[:limit]), dropped=tuple(dropped))
