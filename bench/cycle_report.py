"""bench/RESULTS.md from the figures bench_cycle.py keeps for each size (figures.json)."""

from __future__ import annotations

import itertools
import json
import platform
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
NOTES = Path(__file__).with_name("RESULTS-notes.md")
WORKERS = "workers-*.json"  # bench_workers.py, per size: one Celery worker against two

TARGET_FULL_S = 90.0
TARGET_DELTA_S = 15.0
TARGET_RATIO = 0.5
TARGET_RSS_MIB = 1024.0


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _fastest_of(limit: dict[str, Any]) -> str:
    """How a limit was timed, for its text: before 4 December only the parse and the check were
    timed more than once."""
    return f" (the fastest of {limit['tries']})" if limit.get("tries", 1) > 1 else ""


def stage_limit(figures: dict[str, Any], stage: dict[str, Any]) -> tuple[float | None, str]:
    """Seconds the stage's system needs for the same rows (measured in the same run), and what."""
    lim, name = figures["limits"], stage["stage"]
    copy = lim["copy"].get(name, {}).get("seconds")
    copied = f"COPY {copy:.1f} s{_fastest_of(lim['copy'].get(name, {}))}" if copy is not None else ""
    if name == "extract":
        raw = lim["ldapsearch"]["seconds"]
        text = f"ldapsearch {raw:.1f} s{_fastest_of(lim['ldapsearch'])}, {copied} (overlapped: the larger)"
        return max(raw, copy), text
    if name == "read_recipients":
        raw = lim["recipient_read"]["seconds"]
        return max(raw, copy), f"raw paged Get-* {raw:.1f} s{_fastest_of(lim['recipient_read'])}, {copied}"
    if name == "validate":
        parse = lim["parse"]
        per_value = parse["seconds"] / max(1, parse["items"])
        rate = parse["items"] / parse["seconds"]
        text = f"parse and field read of the values' certificates (PKCS#7 by cryptography's loader), 1 process, {rate:,.0f}/s"
        text += _fastest_of(parse)
        limit = per_value * stage["items"]
        if check := lim.get("check"):  # runs before it had no one-process validation
            checked = check["items"] / check["seconds"]
            text += (
                f"; one validation process {checked:,.0f}/s, so 2 can reach {2 * checked / rate:.2f} at most"
            )
            # The check's own CPU for the stage's values, with nothing around it, stands in for
            # certsync's: the bound says what the check costs, whatever the pool adds.
            per_check = check.get("cpu_s", check["seconds"]) / max(1, check["items"])
            used = per_check * stage["items"] + _cpu_of(stage, "postgres")
            text += _cpu_bound(limit, used, "the check alone and PostgreSQL")
        if signed := lim.get("parse_signed"):  # runs before it did not time it
            with_signatures = signed["seconds"] / max(1, signed["items"]) * stage["items"]
            text += (
                f"; the same parse with each certificate's signature checked by its configured issuer's"
                f" key took {with_signatures:.2f} s{_fastest_of(signed)}: against that, {with_signatures / stage['seconds']:.2f}"
            )
            # What the stage could reach if every rule but the signature cost nothing (rules in
            # native code): the signed parse, one process's CPU, and PostgreSQL's share.
            used = with_signatures + _cpu_of(stage, "postgres")
            text += _cpu_bound(limit, used, "that signed parse and PostgreSQL")
        return limit, text
    if name == "plan":
        used = _cpu_of(stage, "certsync") + _cpu_of(stage, "postgres")
        text = "COPY out of the rows read + COPY in of the rows written" + _fastest_of(lim["copy"][name])
        return copy, text + _cpu_bound(copy, used, "certsync and PostgreSQL")
    if name == "publish":
        rate = figures["budget"]["rate_per_s"]
        return stage["items"] / rate, f"budget {rate:.0f} requests/s"
    return None, ""


# Stages whose work is the same in every first run of a size; publish is not, as the repeated first
# runs publish for a few seconds only (bench_cycle.FIRST_RUNS).
REPEATED = ("extract", "read_recipients", "validate", "plan")


def first_runs(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The size's first runs: the measured one, then its repeats (none in figures kept before them)."""
    return [_run(figures, "first"), *(figures.get("first_repeats") or [])]


def fastest_first(figures: dict[str, Any], stage: dict[str, Any]) -> tuple[float, int]:
    """The first run's `stage` at its fastest over the size's first runs, per item and for the first
    run's items (the delta runs' churn stays in the directory, so a later first run has a few values
    fewer), and how many runs that was taken over (1: the stage's own time)."""
    runs = first_runs(figures)
    if stage["stage"] not in REPEATED or len(runs) == 1 or not stage["items"]:
        return stage["seconds"], 1
    same = [s for run in runs for s in run["stages"] if s["stage"] == stage["stage"] and s["items"]]
    return min(s["seconds"] / s["items"] for s in same) * stage["items"], len(runs)


def first_ratios(figures: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Each first-run stage with a limit: its name, its ratio in the first run, and its ratio at its
    fastest over the first runs."""
    found = []
    for s in _run(figures, "first")["stages"]:
        limit, _ = stage_limit(figures, s)
        if limit is not None and s["seconds"] > 0:
            found.append((s["stage"], limit / s["seconds"], limit / fastest_first(figures, s)[0]))
    return found


def _cpu_of(stage: dict[str, Any], tree: str) -> float:
    return stage.get("cpu_s", {}).get(tree, 0.0)


def _cpu_bound(limit: float | None, used: float, who: str) -> str:
    """The best ratio `used` CPU seconds (`who`'s) allow: spread perfectly over the machine's
    cores, they take at least their sum over the cores."""
    if not limit or used <= 0:
        return ""
    cores = psutil.cpu_count() or 1
    return (
        f"; {who} used {used:.1f} CPU s, at least {used / cores:.2f} s on"
        f" {cores} cores, so {limit * cores / used:.2f} at most"
    )


def _rss(stage: dict[str, Any]) -> float:
    return stage["peak_rss_mib"].get("certsync", 0.0)


def _cpu(stage: dict[str, Any]) -> str:
    """CPU seconds of certsync's, PostgreSQL's and the lab's (Samba, emulator) process trees, and
    the cores they kept busy on average: a stage near the machine's cores is bound by its CPU."""
    mine, db = _cpu_of(stage, "certsync"), _cpu_of(stage, "postgres")
    lab = _cpu_of(stage, "samba") + _cpu_of(stage, "emulator")
    span = stage["window_s"] if "side_by_side" in stage else stage["seconds"]
    busy = (mine + db + lab) / span if span > 0 else None
    return f"{mine:.1f}, {db:.1f}, {lab:.1f} | {_n(busy, 2)}"


def run_table(figures: dict[str, Any], run: dict[str, Any], *, with_limits: bool) -> list[str]:
    head = "| stage | s | items | items/s | certsync peak PSS MiB | load1 | CPU s: certsync, PostgreSQL, lab | cores busy |"
    sep = "|---|---|---|---|---|---|---|---|"
    if with_limits:
        head += " limit s | ratio | fastest of the first runs s (ratio) | limit measured as |"
        sep += "---|---|---|---|"
    lines = [head, sep]
    for s in run["stages"]:
        rate = s["items"] / s["seconds"] if s["items"] and s["seconds"] > 0 else None
        name = f"{s['stage']} (side by side)" if "side_by_side" in s else s["stage"]
        row = f"| {name} | {s['seconds']:.2f} | {s['items']:,} {s['unit']} | {_n(rate)} | {_rss(s):.0f} | {s['load1']:.1f} | {_cpu(s)} |"
        if with_limits:
            limit, what = stage_limit(figures, s)
            ratio = limit / s["seconds"] if limit is not None and s["seconds"] > 0 else None
            fastest, runs = fastest_first(figures, s)
            best = f"{fastest:.2f} of {runs} ({limit / fastest:.2f})" if runs > 1 and limit else "-"
            row += f" {_n(limit, 2)} | {_n(ratio, 2)} | {best} | {what} |"
        lines.append(row)
    lines.append(
        f"| **cycle** | **{cycle_s(run):.2f}** | | | {max(_rss(s) for s in run['stages']):.0f} | | | |"
    )
    return lines


def cycle_s(run: dict[str, Any]) -> float:
    """The run's time: its stages one after another, stages side by side counted once by their
    window (the time py-spy takes to attach, between stages, is left out)."""
    stages = run["stages"]
    windows = {s["side_by_side"]: s["window_s"] for s in stages if "side_by_side" in s}
    return sum(s["seconds"] for s in stages if "side_by_side" not in s) + sum(windows.values())


def _run(figures: dict[str, Any], label: str) -> dict[str, Any]:
    return next(r for r in figures["runs"] if r["label"] == label)


def without_publish(run: dict[str, Any]) -> float:
    """The run's time without its publish: a carry_over beside it still counts (it must run)."""
    publish = next(s for s in run["stages"] if s["stage"] == "publish")
    if "side_by_side" not in publish:  # figures of runs before carry_over ran beside publish
        return cycle_s(run) - publish["seconds"]
    beside = [
        s["seconds"]
        for s in run["stages"]
        if s.get("side_by_side") == publish["side_by_side"] and s is not publish
    ]
    return cycle_s(run) - publish["window_s"] + max(beside, default=0.0)


def totals(figures: dict[str, Any]) -> dict[str, float]:
    total = {run["label"]: cycle_s(run) for run in figures["runs"]}
    total["first_without_publish"] = without_publish(_run(figures, "first"))
    total["steady_without_publish"] = without_publish(_run(figures, "steady"))
    return total


def size_section(figures: dict[str, Any]) -> list[str]:
    users, budget, t = figures["users"], figures["budget"], totals(figures)
    first = _run(figures, "first")
    lines = [f"## {users:,} users", ""]
    lines.append(
        f"Started {figures['started']}; settings {json.dumps(figures['settings'])}; emulator budget {json.dumps(budget)}; 1% churn before the delta run: {json.dumps(figures['churn'])}."
    )
    if "churn_later" in figures:
        lines[-1] += (
            f" Before the second delta run, 1% churn more ({json.dumps(figures['churn_later'])}) and"
            " `changed_overlap_minutes` 0: its read of Exchange starts where the last read's newest"
            " change was, as a run more than the overlap (30 minutes) after the last write does; the"
            " first delta run, minutes after the first run's publish, reads that publish again."
        )
    if figures.get("publish_box_s"):
        lines[-1] += (
            f" Every run published for at most {figures['publish_box_s']} s (`--publish-box`) and deferred the"
            " rest, which the next run publishes first: the second full and the delta run's publish"
            " rows hold those deferred actions."
        )
    lines += [
        "",
        f"### First run (full read, empty database, tenant as seeded); actions {json.dumps(first['actions'])}",
        "",
    ]
    lines += run_table(figures, first, with_limits=True)
    for label, title in (
        ("steady", "Second full run (nothing changed)"),
        ("delta", "Delta run after 1% churn, minutes after the first run's publish"),
        ("delta_later", "Delta run after 1% churn more, with the overlap passed (as runs an hour apart)"),
    ):
        if label not in t:
            continue  # figures kept before the bench measured it
        run = _run(figures, label)
        lines += ["", f"### {title}; actions {json.dumps(run['actions'])}", ""]
        lines += run_table(figures, run, with_limits=False)
    lines += ["", "### Naive baseline", "", *naive_lines(figures, t)]
    return lines


def naive_lines(figures: dict[str, Any], t: dict[str, float]) -> list[str]:
    naive = figures["naive"]
    delta_later = f" ({t['delta_later']:.1f} with the overlap passed)" if "delta_later" in t else ""
    ext, counts = naive["extrapolated_s"], naive["sample_counts"]
    lines = [
        f"Full read of all {naive['users']:,} users measured ({naive['read_s']:.1f} s); validation, Get-Recipient per recipient and Set-* per change measured on {naive['sample']:,} users ({counts}) and extrapolated x{naive['scale']:.1f}. Load {naive['load1']:.1f}.",
        "",
        "| | read s | validate s | one Get per recipient s | one Set per change s | cycle s | certsync first run s | certsync delta s |",
        "|---|---|---|---|---|---|---|---|",
        f"| naive (every cycle) | {naive['read_s']:.1f} | {ext['validate']:.1f} | {ext['get']:.1f} | {ext['set']:.1f} | {naive['total_s']:.1f} | {t['first']:.1f} | {t['delta']:.1f}{delta_later} |",
    ]
    return lines


def targets(all_figures: list[dict[str, Any]]) -> list[str]:
    lines = ["| users | target | measured | met |", "|---|---|---|---|"]
    for f in all_figures:
        t, users = totals(f), f"{f['users']:,}"
        lines.append(
            f"| {users} | full cycle without the Exchange budget <= {TARGET_FULL_S:.0f} s | first run {t['first_without_publish']:.1f} s, second full run {t['steady_without_publish']:.1f} s | {'yes' if t['first_without_publish'] <= TARGET_FULL_S else 'no'} |"
        )
        lines.append(delta_target(f, t, users))
        lines.append(ratio_target(f, users))
        peak = max(_rss(s) for r in f["runs"] for s in r["stages"])
        lines.append(
            f"| {users} | certsync peak memory (PSS) < 1 GiB | {peak:.0f} MiB | {'yes' if peak < TARGET_RSS_MIB else 'no'} |"
        )
    return lines


def ratio_target(figures: dict[str, Any], users: str) -> str:
    """Every stage against its limit: at its fastest over the first runs, as each limit is the
    fastest of its tries, and in the first run alone."""
    ratios, runs = first_ratios(figures), len(first_runs(figures))

    def listed(which: int) -> str:
        return ", ".join(f"{r[0]} {r[which]:.2f}" for r in ratios)

    def met(which: int) -> str:
        low = [f"{r[0]} {r[which]:.2f}" for r in ratios if r[which] < TARGET_RATIO]
        return "yes" if not low else "no: " + ", ".join(low)

    if runs == 1:
        return f"| {users} | every stage >= {TARGET_RATIO} of its limit | {listed(1)} | {met(1)} |"
    return (
        f"| {users} | every stage >= {TARGET_RATIO} of its limit | the fastest of {runs} first runs (each limit"
        f" is the fastest of its tries): {listed(2)}; the first run alone: {listed(1)} | {met(2)};"
        f" the first run alone: {met(1)} |"
    )


def delta_target(figures: dict[str, Any], t: dict[str, float], users: str) -> str:
    delta = t["delta"]
    if not figures.get("publish_box_s"):
        if "delta_later" not in t:
            return f"| {users} | delta at 1% churn <= {TARGET_DELTA_S:.0f} s | {delta:.1f} s (publish included) | {'yes' if delta <= TARGET_DELTA_S else 'no'} |"
        later = t["delta_later"]
        return (
            f"| {users} | delta at 1% churn <= {TARGET_DELTA_S:.0f} s | {later:.1f} s with the overlap passed;"
            f" {delta:.1f} s minutes after the first run's publish, which its read takes again (publish included) |"
            f" {'yes' if later <= TARGET_DELTA_S else 'no'}; {'yes' if delta <= TARGET_DELTA_S else 'no'} right after the first run |"
        )
    # A time box leaves the first run's backlog to the next runs: the delta run's publish holds it,
    # so the churn's own cost is the run without publish.
    without = without_publish(_run(figures, "delta"))
    return f"| {users} | delta at 1% churn <= {TARGET_DELTA_S:.0f} s | {without:.1f} s without publish ({delta:.1f} s with the publish of actions the time box deferred) | {'yes' if without <= TARGET_DELTA_S else 'no'} |"


def scaling(all_figures: list[dict[str, Any]]) -> list[str]:
    if len(all_figures) < 2:
        return ["Only one size measured."]
    lines: list[str] = []
    for small, large in itertools.pairwise(all_figures):
        lines += [*scaling_pair(small, large), ""]
    return lines[:-1]


def scaling_pair(small: dict[str, Any], large: dict[str, Any]) -> list[str]:
    lines = [
        f"Per-item cost at {large['users']:,} over per-item cost at {small['users']:,} (1.00 = linear).",
        "",
    ]
    lines += [
        "| run | stage | s small | s large | items small | items large | cost ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {r["label"] for r in small["runs"]} & {r["label"] for r in large["runs"]}
    for label in (x for x in ("first", "steady", "delta", "delta_later") if x in labels):
        for a, b in zip(_run(small, label)["stages"], _run(large, label)["stages"], strict=True):
            lines.append(_scaling_row(label, a, b, a["seconds"], b["seconds"]))
    # One first run is one sample of a host whose speed moves by the hour; at their fastest the
    # repeated first runs say how the stage grows, as they say how near it comes to its limit.
    pairs = zip(_run(small, "first")["stages"], _run(large, "first")["stages"], strict=True)
    for a, b in pairs:
        (a_s, a_runs), (b_s, b_runs) = fastest_first(small, a), fastest_first(large, b)
        if a_runs > 1 and b_runs > 1:
            lines.append(_scaling_row(f"first, fastest of {a_runs} and {b_runs}", a, b, a_s, b_s))
    return lines


def _scaling_row(label: str, a: dict[str, Any], b: dict[str, Any], a_s: float, b_s: float) -> str:
    ratio = (b_s / b["items"]) / (a_s / a["items"]) if a["items"] and b["items"] and a_s > 0 else None
    return f"| {label} | {a['stage']} | {a_s:.2f} | {b_s:.2f} | {a['items']:,} | {b['items']:,} | {_n(ratio, 2)} |"


def profiles(all_figures: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for f in all_figures:
        run = f.get("profiled") or {"stages": []}
        for s in run["stages"]:
            prof = s.get("profile")
            if not prof or s["seconds"] < 1.0:
                continue
            lines += [
                "",
                f"{f['users']:,} users, a first run apart from the measured ones, **{s.get('side_by_side', s['stage'])}** ({s['seconds']:.1f} s under the profilers, {prof[-1]['total_samples']} samples): self time",
            ]
            lines += [f"- {p['self']:.0%} {p['function']}" for p in prof[:-1][:8]]
            lines += [
                "  inclusive: "
                + "; ".join(f"{fn} {share:.0%}" for fn, share in prof[-1]["top_inclusive"][:8])
            ]
            lines += statement_lines(s.get("statements") or [])
    return lines or ["No size was profiled (`--profile SIZE`)."]


def statement_lines(statements: list[dict[str, Any]]) -> list[str]:
    """PostgreSQL's side of the stage: the statements that took the most execution time."""
    if not statements:
        return []
    lines = ["  PostgreSQL (pg_stat_statements), most execution time first:"]
    for st in statements[:5]:
        query = st["query"][:150].replace("|", "\\|")
        lines.append(
            f"  - {st['total_ms'] / 1000:.1f} s, {st['calls']:,} calls, {st['rows']:,} rows: `{query}`"
        )
    return lines


def workers_section(figures: dict[str, Any]) -> list[str]:
    """The same DAG run on the compose profile with one Celery worker and with two (bench_workers.py)."""
    lines = [
        f"## One Celery worker against two, {figures['users']:,} users (`bench_workers.py`)",
        "",
        f"The DAG triggered through the REST API on the compose profile in namespaces, {figures['users']:,} users,"
        f" `publish_batch_size` {figures['publish_batch_size']}, {figures['cpus']} cores, measured"
        f" {figures['measured_at']}; each Celery worker runs 2 tasks at once. What it says: bench/README.md.",
        "",
        "| workers | wall s | publish batches | tasks per worker | worker CPU s | certsync PostgreSQL CPU s | load1 mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in figures["runs"]:
        hosts, cpu = run["workers"], run["cpu_s"]
        lines.append(
            f"| {len(hosts)} | {run['wall_s']:.1f} | {run['publish_batches']} |"
            f" {' / '.join(str(run['tasks_per_host'].get(h, 0)) for h in hosts)} |"
            f" {' + '.join(format(cpu.get(h, 0), '.1f') for h in hosts)} |"
            f" {run['cpu_s'].get('certsync-db', 0):.1f} | {run['load']['during_1min']['mean']:.1f} |"
        )
    return lines


def write(path: Path, figure_files: list[Path]) -> None:
    all_figures = [json.loads(p.read_text()) for p in figure_files if p.exists()]
    missing = [p.parent.name for p in figure_files if not p.exists()]
    all_figures.sort(key=lambda f: f["users"])
    lines = [
        "# Benchmark results (`make bench`)",
        "",
        f"Written by bench/bench_cycle.py. Machine: {platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}.",
        "Other work shared this machine: every figure carries the 1-minute load average when it was taken (`load1`), and each ratio compares two figures of the same run. Memory is the proportional set size (PSS) of certsync's process tree, which forks the side-by-side stages. What the columns mean and what the figures say: bench/README.md, section *Whole cycle*.",
        "",
        *(f"Not measured: {name} (no figures; its lab was never built and measured)." for name in missing),
        "",
        "## Targets",
        "",
        *targets(all_figures),
        "",
    ]
    for f in all_figures:
        lines += [*size_section(f), ""]
    lines += ["## Scaling", "", *scaling(all_figures), "", "## Profiles (py-spy)", *profiles(all_figures), ""]
    workers = [json.loads(p.read_text()) for p in Path(__file__).parent.glob(WORKERS)]
    for figures in sorted(workers, key=lambda f: f["users"]):
        lines += [*workers_section(figures), ""]
    if NOTES.exists():  # figures measured apart from make bench, kept across regenerations
        lines += [NOTES.read_text()]
    # Profiles name processes by their command lines: paths shown relative to the checkout.
    path.write_text("\n".join(lines).replace(f"{REPO}/", ""))
