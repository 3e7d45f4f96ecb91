"""Choose the values to publish for one recipient attribute: valid, unique, newest first, capped.

Exchange Online (like Entra ID) refuses an object with more than 15 values in these attributes, so the
cap is applied here and every dropped value is accounted for with a reason.

Unique means one value per end-entity certificate, not per byte string: the same certificate packaged
in two PKCS#7 blobs (with or without its chain, DER or BER, certs-only or signed) is two distinct
values to AD, which refuses only exact duplicates, but one certificate to a sender. A certificate is
identified by its issuer and serial number (RFC 5280 4.1.2.2: unique per issuer).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from certsync.certificates.reasons import Reason
from certsync.certificates.verdict import Verdict

MAX_VALUES = 15
_OLDEST = datetime.min.replace(tzinfo=UTC)
_FOREVER = datetime.max.replace(tzinfo=UTC)


class Selection(NamedTuple):
    kept: tuple[Verdict, ...]
    dropped: tuple[tuple[Verdict, Reason], ...]


def _newest_first(verdict: Verdict) -> tuple[datetime, datetime, bytes]:
    return (verdict.not_before or _OLDEST, verdict.not_after or _OLDEST, verdict.sha256)


def end_entity_key(verdict: Verdict) -> tuple[str, ...]:
    """The certificate a value carries: issuer and serial when it was read, else the value itself."""
    return ("cert", verdict.issuer, verdict.serial) if verdict.serial else ("value", verdict.sha256.hex())


def _best_formed(group: list[Verdict]) -> int:
    """Of the packagings of one certificate, the index of the one whose verdict holds longest (e.g.
    the blob whose chain stays valid longer), else of the first in directory order."""
    return max(range(len(group)), key=lambda i: (group[i].valid_until or _FOREVER, -i))


def select_values(verdicts: Sequence[Verdict], *, limit: int = MAX_VALUES) -> Selection:
    """Kept: valid verdicts, one per end-entity certificate (the best-formed packaging), newest
    first, at most `limit`. The other packagings are dropped as `duplicate`.

    Refused verdicts are neither kept nor dropped here: they already carry their own reason.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    if len(verdicts) == 1 and verdicts[0].ok and limit:  # most users: one value, nothing to choose
        return Selection(kept=(verdicts[0],), dropped=())
    groups: dict[tuple[str, ...], list[Verdict]] = {}
    for verdict in verdicts:
        if verdict.ok:
            groups.setdefault(end_entity_key(verdict), []).append(verdict)
    unique: list[Verdict] = []
    dropped: list[tuple[Verdict, Reason]] = []
    for group in groups.values():
        best = _best_formed(group)
        unique.append(group[best])
        dropped.extend((v, Reason.DUPLICATE) for i, v in enumerate(group) if i != best)
    unique.sort(key=_newest_first, reverse=True)
    dropped.extend((verdict, Reason.OVER_LIMIT) for verdict in unique[limit:])
    return Selection(kept=tuple(unique[:limit]), dropped=tuple(dropped))
