"""WhenChanged as Exchange may write it, the changed-since filter certsync sends, and the
emulator's reading of that filter (the two must agree, or the integration tests prove nothing)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from certsync.exchange.changes import when_changed
from certsync.exchange.wire import changed_filter
from certsync_lab.emulator import filters
from certsync_lab.emulator.errors import CmdletError

MOMENT = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    "obj",
    [
        {"WhenChangedUTC": "2026-12-02T03:04:05Z"},
        {"WhenChangedUTC": "2026-12-02T03:04:05+00:00"},
        {"WhenChangedUTC": "2026-12-02T03:04:05"},  # UTC by its name
        {"WhenChangedUTC": "/Date(1796180645000)/"},
        {"WhenChangedUTC": "/Date(1796180645000+0100)/"},  # the offset is a display hint
        {"WhenChanged": "2026-12-02T04:04:05+01:00"},
        {"WhenChangedUTC": "garbage", "WhenChanged": "2026-12-02T03:04:05Z"},
    ],
)
def test_when_changed_reads_each_plausible_shape(obj: dict) -> None:
    assert when_changed(obj) == MOMENT


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"WhenChanged": "2026-12-02T03:04:05"},
        {"WhenChangedUTC": "System.DateTime"},
        {"WhenChangedUTC": 5},
    ],
)
def test_when_changed_without_a_zone_or_value_is_unknown(obj: dict) -> None:
    # WhenChanged without an offset is in the server's zone, unknown here: never guessed.
    assert when_changed(obj) is None


def test_filter_is_iso_utc_to_the_second_down() -> None:
    since = datetime(2026, 12, 2, 4, 4, 5, 900_000, tzinfo=timezone(timedelta(hours=1)))
    assert changed_filter(since) == "WhenChangedUTC -ge '2026-12-02T03:04:05'"


def test_emulator_reads_the_filter_certsync_sends() -> None:
    parsed = filters.parse(changed_filter(MOMENT))
    assert parsed.at == MOMENT and not parsed.strict
    assert parsed.matches(MOMENT) and not parsed.matches(MOMENT - timedelta(seconds=1))
    assert filters.parse("(WhenChanged -gt '12/02/2026 03:04:05')").strict


@pytest.mark.parametrize("raw", ["Name -eq 'x'", "WhenChangedUTC -ge 'yesterday'", 42, ""])
def test_emulator_refuses_other_filters_as_exchange_does(raw: object) -> None:
    with pytest.raises(CmdletError) as refused:
        filters.parse(raw)
    assert refused.value.status == 400 and "ParameterBindingException" in refused.value.exception_type


def test_emulator_clock_offset_moves_shown_stamps_and_bounds_alike() -> None:
    stored = MOMENT.isoformat()
    shown = filters.shown(stored, shape="iso_z", offset_s=-7200)
    assert shown == "2026-12-02T01:04:05Z"
    bound = filters.stored_bound(filters.parse(changed_filter(MOMENT - timedelta(hours=2))), offset_s=-7200)
    assert bound.matches(MOMENT) and not bound.matches(MOMENT - timedelta(seconds=1))
    assert filters.shown(stored, shape="date_ms", offset_s=0) == "/Date(1796180645000)/"
    assert filters.shown(stored, shape="absent", offset_s=0) is None
