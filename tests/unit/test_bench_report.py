"""How the bench report sets each stage against its limit (bench/cycle_report.py): a stage's time at
its fastest over the repeated first runs, per item, and the target judged both ways."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def report() -> ModuleType:
    path = REPO / "bench" / "cycle_report.py"
    spec = importlib.util.spec_from_file_location("cycle_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(name: str, seconds: float, items: int, unit: str = "users") -> dict[str, Any]:
    return {"stage": name, "seconds": seconds, "items": items, "unit": unit, "cpu_s": {}}


def _figures(plan_s: float, repeats: list[tuple[float, int]]) -> dict[str, Any]:
    """A size whose plan's limit is 1 s for 100 users and whose publish is at 0.5 of its budget."""
    first = {
        "label": "first",
        "stages": [_stage("plan", plan_s, 100), _stage("publish", 10.0, 1000, "actions")],
    }
    figures: dict[str, Any] = {
        "users": 100,
        "budget": {"rate_per_s": 200.0},
        "runs": [first],
        "limits": {"copy": {"plan": {"seconds": 1.0, "tries": 3}}},
    }
    if repeats:
        # Repeated first runs publish for a few seconds only: their publish must never count.
        figures["first_repeats"] = [
            {"stages": [_stage("plan", s, n), _stage("publish", 0.5, 1000, "actions")]} for s, n in repeats
        ]
    return figures


def test_the_fastest_is_taken_per_item_for_the_first_runs_items(report: ModuleType) -> None:
    figures = _figures(2.5, [(2.2, 100), (1.8, 90)])  # the last: 0.02 s a user, a few users fewer
    plan, publish = figures["runs"][0]["stages"]
    assert report.fastest_first(figures, plan) == (pytest.approx(2.0), 3)
    assert report.fastest_first(figures, publish) == (10.0, 1)


def test_the_target_is_judged_at_the_fastest_and_in_the_first_run_alone(report: ModuleType) -> None:
    row = report.ratio_target(_figures(2.5, [(2.2, 100), (1.8, 90)]), "100")
    assert "the fastest of 3 first runs" in row
    assert "plan 0.50, publish 0.50; the first run alone: plan 0.40, publish 0.50" in row
    assert row.endswith("| yes; the first run alone: no: plan 0.40 |")


def test_figures_of_a_single_first_run_are_judged_on_it(report: ModuleType) -> None:
    figures = _figures(2.5, [])
    assert report.fastest_first(figures, figures["runs"][0]["stages"][0]) == (2.5, 1)
    assert report.ratio_target(figures, "100") == (
        "| 100 | every stage >= 0.5 of its limit | plan 0.40, publish 0.50 | no: plan 0.40 |"
    )


def _size(users: int, first_s: float, repeats: list[float]) -> dict[str, Any]:
    figures = _figures(first_s, [(s, 100) for s in repeats])
    for run in [figures["runs"][0], *figures.get("first_repeats", [])]:
        run["stages"][0]["items"] = users  # the plan's users; the publish keeps its actions
    return {**figures, "users": users}


def test_scaling_shows_each_first_run_stage_at_its_fastest_beside_the_first_run(report: ModuleType) -> None:
    # 500 users: the first run planned at 0.03 s a user, its repeats at 0.02, as the 100 users did.
    small, large = _size(100, 2.0, [2.2, 2.1]), _size(500, 15.0, [10.0, 11.0])
    rows = report.scaling_pair(small, large)
    assert "| first | plan | 2.00 | 15.00 | 100 | 500 | 1.50 |" in rows
    assert "| first, fastest of 3 and 3 | plan | 2.00 | 10.00 | 100 | 500 | 1.00 |" in rows
    # The publish is not repeated: its first run is its only measure.
    assert not [row for row in rows if row.startswith("| first, fastest") and "publish" in row]


def test_scaling_has_no_fastest_rows_without_repeated_first_runs(report: ModuleType) -> None:
    rows = report.scaling_pair(_size(100, 2.0, []), _size(500, 15.0, [10.0]))
    assert [row for row in rows if "| plan |" in row] == [
        "| first | plan | 2.00 | 15.00 | 100 | 500 | 1.50 |"
    ]
