"""Renders a run: `bench/RESULTS.md`, `bench/results.png`, the seed's table and the goals.

`python -m bench.report [FOLDER]` renders a saved results.json again, without measuring.
Throughput is the rate of answers below 400 ("ok req/s"): a server that answers fast with
errors does not get credit for them. Little's law uses every answer, as a closed loop does.
With several rounds, a ratio is taken between the median rounds of its two variants, while
errors count in every round and the p99 bound must hold in the worst: a slow spell of this
machine moves one round, not the verdict, and no round's failure is averaged away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bench.results import Cell, Run

ORDER = ("pooled", "ceiling", "per-request", "peer", "database")
C10K = 10_000
LITTLE_FACTOR = 2.5


@dataclass(frozen=True)
class Goal:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str


# ---------------------------------------------------------------- goals


def goals(run: Run) -> list[Goal]:
    found = [
        _ratio_goal(run, "per-request", 8.0),
        _ratio_goal(run, "peer", 1.5),
        _ratio_goal(run, "ceiling", 0.6),
    ]
    return [*found, *_c10k_goals(run)]


def _ratio_goal(run: Run, other: str, target: float) -> Goal:
    """Between median rounds, at every level. A level where either variant lacks a round the
    run planned counts as missed: what was not measured cannot have met the goal."""
    name = f"pooled ≥ {target:g} x {other} (ok req/s, at every level)"
    if not any(cell.variant == other for cell in run.cells):
        return Goal(name, None, "not measured")
    met, details = True, []
    for level in run.levels():
        short = _short_of_rounds(run, ("pooled", other), level)
        if short:
            met = False
            details.append(f"{short} at {level:,}")
            continue
        ratio = _ratio(run.cell("pooled", level).ok_rps, run.cell(other, level).ok_rps)
        met = met and ratio >= target
        details.append(f"{_fmt_ratio(ratio)} at {level:,}{_round_ratios(run, other, level)}")
    return Goal(name, met, ", ".join(details))


def _short_of_rounds(run: Run, variants: tuple[str, ...], level: int) -> str:
    """What is missing at one level ("" when each variant has every round the run planned):
    a round whose server failed leaves no cell behind."""
    missing = [
        f"{name}: {len(run.rounds(name, level))} of {run.planned_rounds} rounds"
        for name in variants
        if len(run.rounds(name, level)) < run.planned_rounds
    ]
    return f"not measured ({'; '.join(missing)})" if missing else ""


def _round_ratios(run: Run, other: str, level: int) -> str:
    """Round by round, each round's pooled against the same round's other, shown beside the
    ratio of the median rounds so that a reader sees how far single rounds strayed. Empty for
    a run of one round."""
    theirs = {cell.round: cell for cell in run.rounds(other, level)}
    pairs = [
        _ratio(cell.ok_rps, theirs[cell.round].ok_rps)
        for cell in run.rounds("pooled", level)
        if cell.round in theirs
    ]
    if len(pairs) < 2:
        return ""
    return f" (rounds: {', '.join(_fmt_ratio(r).removesuffix('x') for r in pairs)})"


def _c10k_goals(run: Run) -> list[Goal]:
    """Judged on every round: errors are summed over the rounds, and each round must keep
    its p99 within the bound."""
    cells = run.rounds("pooled", C10K)
    if not cells:
        missing = "not measured: run with concurrency 10000"
        return [Goal(f"at {C10K:,}: {what}", None, missing) for what in _C10K_WHAT]
    short = _short_of_rounds(run, ("pooled",), C10K)
    over = f" over {len(cells)} rounds" if len(cells) > 1 else ""
    tail = f"; {short}" if short else ""
    errors = {
        "connect": sum(c.connect_errors for c in cells),
        "read": sum(c.read_errors for c in cells),
        "write": sum(c.write_errors for c in cells),
        "timeout": sum(c.timeouts for c in cells),
    }
    kinds = ", ".join(f"{kind} {n}" for kind, n in errors.items())
    socket_errors = sum(c.socket_errors for c in cells)
    non_2xx = sum(c.non_2xx for c in cells)
    return [
        Goal(
            f"at {C10K:,}: {_C10K_WHAT[0]}",
            not short and socket_errors == 0,
            f"{socket_errors}{over} ({kinds}){tail}",
        ),
        Goal(f"at {C10K:,}: {_C10K_WHAT[1]}", not short and non_2xx == 0, f"{non_2xx}{over}{tail}"),
        _fair_wait_goal(cells, short, tail),
    ]


def _fair_wait_goal(cells: list[Cell], short: str, tail: str) -> Goal:
    """p99 within LITTLE_FACTOR times Little's mean wait in every round, shown for the round
    where it stands highest against its own bound. A round that answered nothing has no p99
    and fails."""
    worst = max(cells, key=_p99_over_little)
    ratio = _p99_over_little(worst)
    name = f"at {C10K:,}: {_C10K_WHAT[2]}"
    which = f" (the worst of {len(cells)} rounds: round {worst.round})" if len(cells) > 1 else ""
    if math.isinf(ratio):
        return Goal(name, False, f"round {worst.round} answered nothing")
    loose = (
        f"; but {worst.listen_overflows:,} connection attempts overflowed the accept queue in "
        "that round, so fewer than 10,000 connections were in service at once and the bound "
        "is loose"
        if worst.listen_overflows
        else ""
    )
    wait = little_wait_ms(worst)
    return Goal(
        name,
        not short and ratio <= LITTLE_FACTOR,
        f"p99 {worst.p99_ms:,.0f} ms vs {LITTLE_FACTOR:g} x {wait:,.0f} ms = "
        f"{LITTLE_FACTOR * wait:,.0f} ms (ratio {ratio:.2f}){which}{loose}{tail}",
    )


def _p99_over_little(cell: Cell) -> float:
    if not cell.rps or not cell.requests or math.isnan(cell.p99_ms):
        return math.inf
    return cell.p99_ms / little_wait_ms(cell)


_C10K_WHAT = (
    "zero socket errors",
    "zero non-2xx",
    f"p99 ≤ {LITTLE_FACTOR:g} x 10,000 / req/s",
)


def little_wait_ms(cell: Cell) -> float:
    """The mean time in the system that Little's law gives a closed loop: N / throughput."""
    return cell.concurrency / cell.rps * 1000 if cell.rps else math.inf


def _ratio(ours: float, theirs: float) -> float:
    """Infinite when only ours served any; 0 when ours served none, whatever theirs did."""
    if not ours:
        return 0.0
    return ours / theirs if theirs else math.inf


def _fmt_ratio(ratio: float) -> str:
    return "∞ (it served none)" if math.isinf(ratio) else f"{ratio:.2f}x"


# ---------------------------------------------------------------- the seed's table


def before_after(run: Run) -> str:
    """The seed's "Before vs After" table with this run's numbers beside its claims."""
    t = run.connect_times
    rows = [
        (
            "Connection time per request",
            "20-100 ms",
            f"{t.connect.median_ms:.2f} ms median, {t.connect.p99_ms:.2f} ms p99 "
            "(psycopg2.connect, one at a time)"
            if t
            else "not measured",
            "~0 ms",
            f"{t.checkout.median_ms * 1000:.1f} µs median, {t.checkout.p99_ms * 1000:.1f} µs p99 "
            "(get_db() checkout and return)"
            if t
            else "not measured",
        ),
        (
            "Database part of a request (connect or checkout + SELECT)",
            "",
            f"{t.connect_and_select.median_ms:.2f} ms median" if t else "not measured",
            "",
            f"{t.checkout_and_select.median_ms:.3f} ms median" if t else "not measured",
        ),
        (
            "Max concurrent users served without errors",
            "~20",
            _most_served(run, "per-request"),
            "500+",
            _most_served(run, "pooled"),
        ),
        (
            "Server backends and their memory (peak)",
            '"high"',
            _memory(run, "per-request"),
            '"stable"',
            _memory(run, "pooled"),
        ),
    ]
    head = "| | seed: before | measured: per-request | seed: after | measured: pooled |"
    lines = [head, "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _most_served(run: Run, variant: str) -> str:
    """The highest level served in every round, with the highest p99 of its rounds."""
    levels = [level for level in run.levels() if run.rounds(variant, level)]
    if not levels:
        return "not measured"
    served = [lv for lv in levels if all(map(counts_as_served, run.rounds(variant, lv)))]
    unserved = [level for level in levels if level not in served]
    if not served:
        return f"none of the levels tried (errors or clients unanswered from {min(unserved):,})"
    best = max(served)
    p99_s = max(cell.p99_ms for cell in run.rounds(variant, best)) / 1000
    more = [level for level in unserved if level > best]
    tail = f"; errors or clients unanswered at {min(more):,}" if more else " (the most tried)"
    return f"{best:,} (p99 {p99_s:.1f} s){tail}"


def counts_as_served(cell: Cell) -> bool:
    """No error, and at least as many answers as clients (wrk does not count answers per
    connection, so this is what it can show of every client being answered). wrk counts a
    request as a timeout only after 30 s, longer than a run: clients left without an answer
    show as no error at all."""
    return cell.clean and cell.requests >= cell.concurrency


def _memory(run: Run, variant: str) -> str:
    """At each level, the round that peaked at the most backends."""
    peaks = [
        max(cells, key=lambda c: (c.peak_connections, c.rss_mb))
        for cells in (run.rounds(variant, level) for level in run.levels())
        if cells
    ]
    if not peaks:
        return "not measured"
    return "; ".join(
        f"{c.concurrency:,}: {c.peak_connections} backends, {c.rss_mb:,.0f} MB RSS "
        f"({c.anon_mb:,.0f} MB private)"
        for c in peaks
    )


# ---------------------------------------------------------------- RESULTS.md


def markdown(run: Run, image_name: str) -> str:
    parts = [
        "# Benchmark results",
        "",
        f"Measured {run.date} with `{run.command}` (from the repository root; `make bench` "
        "runs the same with every level).",
        "",
        "**The load generator (wrk or pgbench), the server under test and PostgreSQL share "
        "the same 2 cores**, so every figure is a lower bound of what the server does alone; "
        "compare the variants with each other, not with other machines.",
        _others_note(run),
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in run.machine.items()],
        "",
        "## Set-up",
        "",
        *[f"- {key}: {value}" for key, value in run.settings.items()],
        "",
        "Variants:",
        "",
        *[f"- **{name}**: {what}" for name, what in run.variants.items()],
        "",
        "## Before vs After",
        "",
        before_after(run),
        "",
        "## Goals",
        "",
        goals_table(run),
        "",
        *_failures(run),
        "## Throughput (ok req/s) by variant and concurrency",
        "",
        _rounds_note(run),
        "",
        _matrix(run),
        "",
        f"![throughput and p99 against concurrency]({image_name})",
        "",
        "## Each variant",
        "",
        "Socket errors are wrk's connect / read / write / timeout counts; non-2xx counts "
        "answers of 400 and above (for the database: failed transactions). Peak server "
        "connections and backend RSS come from sampling pg_stat_activity and /proc five "
        "times a second; RSS counts shared buffers once per backend that touched them, "
        '"private" is RssAnon. CPU ms/req is the CPU time of the server (gunicorn and its '
        "workers), of the database (postmaster and backends) and of the load generator, "
        "divided by the requests answered; others' load is the CPU that processes outside "
        "the bench used meanwhile, in cores out of 2: a cell with much of it was disturbed. "
        "Listen overflows are the connections the kernel dropped meanwhile because an accept "
        "queue was full (TcpExt ListenOverflows): the client retries its SYN 1, 3, 7 s later.",
        "",
    ]
    for name in _variants(run):
        parts += [f"### {name}", "", _variant_table(run, name), ""]
        if name in run.server_logs:
            counts = ", ".join(f"{key}: {n}" for key, n in run.server_logs[name].items())
            parts += [f"Server log over all levels and rounds: {counts}.", ""]
    return "\n".join(parts)


def _others_note(run: Run) -> str:
    if not run.cells:
        return ""
    loads = [cell.cpu.other_cores for cell in run.cells]
    return (
        f"Processes outside the bench (other people's work on this machine) used "
        f"{sum(loads) / len(loads):.2f} cores on average while the cells were measured, "
        f'{max(loads):.2f} at most (column "others\' load" below).'
    )


def _rounds_note(run: Run) -> str:
    if run.planned_rounds < 2:
        return "One round per variant and level."
    return (
        f"Each HTTP variant ran {run.planned_rounds} rounds at each level, the variants taking "
        "turns within a round (in an order that shifts by one each round), each round on a "
        "fresh server. A cell shows the median round and, in brackets, the slowest and the "
        "fastest round; the ratios of the goals are taken between median rounds, which may "
        "be different rounds of the two variants (a level's rounds span several minutes)."
    )


def _failures(run: Run) -> list[str]:
    if not run.failures:
        return []
    return [
        "## Failed",
        "",
        "A variant that failed was not run again in this run; its missing rounds count as "
        "missed goals.",
        "",
        *[f"- {failure}" for failure in run.failures],
        "",
    ]


def goals_table(run: Run) -> str:
    lines = ["| goal | result | measured |", "|---|---|---|"]
    for goal in goals(run):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[goal.met]
        lines.append(f"| {goal.name} | {verdict} | {goal.detail} |")
    return "\n".join(lines)


def _matrix(run: Run) -> str:
    levels = run.levels()
    lines = [
        "| variant | " + " | ".join(f"{level:,}" for level in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for name in _variants(run):
        row = []
        for level in levels:
            cell, rounds = run.cell(name, level), run.rounds(name, level)
            spread = sorted(c.ok_rps for c in rounds)
            text = f"{cell.ok_rps:,.0f}" if cell else ""
            if len(spread) > 1:
                text += f" ({spread[0]:,.0f} to {spread[-1]:,.0f})"
            row.append(text)
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _variant_table(run: Run, name: str) -> str:
    lines = [
        "| concurrency | round | req/s | ok req/s | p50 ms | p99 ms | socket errors c/r/w/t "
        "| non-2xx | peak server conns | backend RSS MB (private) "
        "| CPU ms/req server / db / load | others' load (cores) | listen overflows |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    cells = (c for c in run.cells if c.variant == name)
    for cell in sorted(cells, key=lambda c: (c.concurrency, c.round)):
        level = f"{cell.concurrency:,}"
        if cell.clients is not None:
            level += f" ({cell.clients} clients)"
        median = len(run.rounds(name, cell.concurrency)) > 1 and cell is run.cell(
            name, cell.concurrency
        )
        round_ = f"{cell.round} (median)" if median else f"{cell.round}"
        cpu = " / ".join(
            "-" if math.isnan(ms) else f"{ms:.2f}"
            for ms in map(
                cell.cpu_ms_per_request, (cell.cpu.server_s, cell.cpu.database_s, cell.cpu.load_s)
            )
        )
        lines.append(
            f"| {level} | {round_} | {cell.rps:,.0f} | {cell.ok_rps:,.0f} | {_ms(cell.p50_ms)} "
            f"| {_ms(cell.p99_ms)} | {cell.connect_errors}/{cell.read_errors}/"
            f"{cell.write_errors}/{cell.timeouts} | {cell.non_2xx:,} "
            f"| {cell.peak_connections} | {cell.rss_mb:,.0f} ({cell.anon_mb:,.0f}) "
            f"| {cpu} | {cell.cpu.other_cores:.2f} | {cell.listen_overflows:,} |"
        )
    return "\n".join(lines)


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _variants(run: Run) -> list[str]:
    present = {cell.variant for cell in run.cells}
    return [name for name in ORDER if name in present]


# ---------------------------------------------------------------- results.png


def write(run: Run, out: Path) -> None:
    """results.json, results.png and RESULTS.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    run.save(out / "results.json")
    plot(run, out / "results.png")
    (out / "RESULTS.md").write_text(markdown(run, "results.png"))


def plot(run: Run, path: Path) -> None:
    """Throughput and p99 against concurrency (log scale), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in _variants(run):
        levels = [level for level in run.levels() if run.cell(name, level)]
        cells = [run.cell(name, level) for level in levels]
        (line,) = left.plot(levels, [c.ok_rps for c in cells], marker="o", label=name)
        right.plot(levels, [c.p99_ms for c in cells], marker="o", label=name)
        spread = [sorted(c.ok_rps for c in run.rounds(name, level)) for level in levels]
        if any(len(rounds) > 1 for rounds in spread):
            low, high = [r[0] for r in spread], [r[-1] for r in spread]
            shown = [value > 0 for value in low]  # a log axis has no place for 0
            left.fill_between(levels, low, high, where=shown, color=line.get_color(), alpha=0.15)
    left.set(
        title="Throughput (answers < 400 per s): median round, band: all rounds",
        ylabel="ok req/s",
        yscale="log",
    )
    right.set(title="p99 latency of the median round", ylabel="ms", yscale="log")
    for axes in (left, right):
        axes.set(xscale="log", xlabel="concurrent connections")
        axes.set_xticks(run.levels(), [f"{level:,}" for level in run.levels()])
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle(
        "2 gunicorn workers, pool 10 per worker; wrk, servers and PostgreSQL on 2 cores"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":  # render a saved run again: python -m bench.report [FOLDER]
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    write(Run.load(folder / "results.json"), folder)
    print(f"bench: wrote {folder / 'RESULTS.md'} and {folder / 'results.png'}")
