"""Renders a run: `bench/RESULTS.md`, `bench/results.png`, the goals and the seed's table.

`python -m bench.report [FOLDER]` renders a saved results.json again, without measuring.
Throughput is the rate of answers below 400 ("ok req/s"): a server that answers fast with
errors does not get credit for them. Every figure of a table is the median round's (by ok
req/s), its p99 and CPU included: one round's figures together, not a mix; the spread of the
rounds is in "Every round". The goals are judged in bench/goals.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench import goals as judged
from bench.goals import best_flask_peer, fmt_ratio, ratio
from bench.results import Cell, Run
from bench.servers import STACKS

ORDER = (*STACKS, "ceiling", "per-request", "database")
WORKLOAD_ORDER = ("mix", "get", "list", "create", "update", "healthz")


# ---------------------------------------------------------------- goals


def goals_table(run: Run) -> str:
    """Issue 18's goals, a row per goal and level."""
    lines = ["| goal | connections | result | measured |", "|---|---:|---|---|"]
    for goal in judged.goals(run):
        level = "" if goal.level is None else f"{goal.level:,}"
        lines.append(f"| {goal.name} | {level} | {_verdict(goal.met)} | {goal.detail} |")
    return "\n".join(lines)


def legacy_goals_table(run: Run) -> str:
    """Issue 4's goals, a row per goal over every level."""
    lines = ["| goal | result | measured |", "|---|---|---|"]
    for goal in judged.legacy_goals(run):
        lines.append(f"| {goal.name} | {_verdict(goal.met)} | {goal.detail} |")
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


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
            _most_served(run, "service"),
        ),
        (
            "Server backends and their memory (peak)",
            '"high"',
            _memory(run, "per-request"),
            '"stable"',
            _memory(run, "service"),
        ),
    ]
    head = "| | seed: before | measured: per-request | seed: after | measured: service |"
    lines = [head, "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _most_served(run: Run, variant: str) -> str:
    """With GET /users/<id>: the highest level served in every round, with the highest p99 of
    its rounds."""
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
    """With GET /users/<id>, at each level, the round that peaked at the most backends."""
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
        "runs the same with the default of every flag).",
        "",
        "**The load generator (wrk or pgbench), the server under test and PostgreSQL share "
        "the same 2 cores**, so every figure is a lower bound of what the server does alone, "
        "and a stack that spends less CPU per request leaves more of the two cores to "
        "PostgreSQL and wrk; compare the stacks with each other, not with other machines.",
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
        *_listed("Stacks:", run.variants),
        *_listed("Workloads:", run.workloads),
        "## Goals",
        "",
        "From the median rounds, at each level. The best Flask peer is the faster of "
        "peer-gthread and peer-gevent at that level.",
        "",
        goals_table(run),
        "",
        *_failures(run),
        "## Throughput and p99 by workload",
        "",
        _rounds_note(run),
        "",
        f"![ok req/s against concurrency, a panel per workload]({image_name})",
        "",
    ]
    for workload in _workloads(run, STACKS):
        parts += [f"### {workload}", "", _workload_table(run, workload), ""]
        parts += [_errors_note(run, workload), ""]
    parts += [
        "## CPU per request",
        "",
        "Milliseconds of CPU per request answered, of the server (gunicorn and all its "
        "workers) / of PostgreSQL (postmaster and all backends), in the median round.",
        "",
    ]
    for workload in _workloads(run, STACKS):
        parts += [f"### {workload}", "", _cpu_table(run, workload), ""]
    parts += [
        "## Issue 4: GET /users/<id> against a connection per request, /healthz, pgbench",
        "",
        legacy_goals_table(run),
        "",
        before_after(run),
        "",
        "## Every round",
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
    for workload in _workloads(run, ORDER):
        parts += [f"### {workload}", "", _rounds_table(run, workload), ""]
    parts += ["## Server logs", "", "Over all levels, rounds and workloads.", ""]
    for name in _variants(run):
        if name in run.server_logs:
            counts = ", ".join(f"{key}: {n}" for key, n in run.server_logs[name].items())
            parts.append(f"- **{name}**: {counts}")
    return "\n".join(parts) + "\n"


def _listed(title: str, items: dict[str, str]) -> list[str]:
    if not items:
        return []
    return [title, "", *[f"- **{name}**: {what}" for name, what in items.items()], ""]


def _others_note(run: Run) -> str:
    if not run.cells:
        return ""
    loads = [cell.cpu.other_cores for cell in run.cells]
    return (
        f"Processes outside the bench (other people's work on this machine) used "
        f"{sum(loads) / len(loads):.2f} cores on average while the cells were measured, "
        f'{max(loads):.2f} at most (column "others\' load" in "Every round").'
    )


def _rounds_note(run: Run) -> str:
    if run.planned_rounds < 2:
        return "One round per stack, workload and level."
    return (
        f"Each stack ran {run.planned_rounds} rounds at each level, the stacks taking turns "
        "within a round (in an order that shifts by one each round), each round on a fresh "
        "server that served the workloads in turn (their order shifting too). A cell shows "
        "the median round; the ratios are taken between median rounds, which may be "
        "different rounds of the two stacks (a level's rounds span several minutes). The "
        "plot's band spans the slowest to the fastest round."
    )


def _failures(run: Run) -> list[str]:
    if not run.failures:
        return []
    return [
        "## Failed",
        "",
        "A stack that failed was not run again in this run; its missing rounds count as "
        "missed goals.",
        "",
        *[f"- {failure}" for failure in run.failures],
        "",
    ]


def _workload_table(run: Run, workload: str) -> str:
    """Rows: levels; columns: each stack's ok req/s and p99, then the service's ratios."""
    stacks = [name for name in STACKS if _has(run, name, workload)]
    head = "| connections | " + " | ".join(f"{n} req/s | {n} p99 ms" for n in stacks)
    head += " | service / best Flask peer | service / asyncio |"
    lines = [head, "|---:|" + "---:|---:|" * len(stacks) + "---:|---:|"]
    for level in run.levels():
        row = [f"{level:,}"]
        for name in stacks:
            cell = run.cell(name, level, workload)
            row += [f"{cell.ok_rps:,.0f}", _ms(cell.p99_ms)] if cell else ["", ""]
        ours = run.cell("service", level, workload)
        peer = best_flask_peer(run, level, workload)
        versus_peer = fmt_ratio(ratio(ours, peer))
        if versus_peer:
            versus_peer += f" ({peer.variant})"
        row += [versus_peer, fmt_ratio(ratio(ours, run.cell("asyncio", level, workload)))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _errors_note(run: Run, workload: str) -> str:
    """Every round of the four stacks with a socket error or an answer of 400 and above."""
    troubled = [
        c
        for c in run.cells
        if c.workload == workload and c.variant in STACKS and (c.socket_errors or c.non_2xx)
    ]
    if not troubled:
        return "No socket error and no answer of 400 or above in any round."
    listed = "; ".join(
        f"{c.variant} at {c.concurrency:,} round {c.round}: non-2xx {c.non_2xx:,}, socket "
        f"errors {c.connect_errors}/{c.read_errors}/{c.write_errors}/{c.timeouts}"
        for c in sorted(troubled, key=lambda c: (ORDER.index(c.variant), c.concurrency, c.round))
    )
    return f"Errors (socket errors c/r/w/t): {listed}."


def _cpu_table(run: Run, workload: str) -> str:
    stacks = [name for name in STACKS if _has(run, name, workload)]
    lines = [
        "| connections | " + " | ".join(f"{name} server / db" for name in stacks) + " |",
        "|---:|" + "---:|" * len(stacks),
    ]
    for level in run.levels():
        row = [f"{level:,}"]
        for name in stacks:
            cell = run.cell(name, level, workload)
            row.append(_cpu_ms(cell, (cell.cpu.server_s, cell.cpu.database_s)) if cell else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _rounds_table(run: Run, workload: str) -> str:
    lines = [
        "| stack | concurrency | round | req/s | ok req/s | p50 ms | p99 ms "
        "| socket errors c/r/w/t | non-2xx | peak server conns | backend RSS MB (private) "
        "| CPU ms/req server / db / load | others' load (cores) | listen overflows |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    cells = (c for c in run.cells if c.workload == workload)
    for cell in sorted(cells, key=lambda c: (ORDER.index(c.variant), c.concurrency, c.round)):
        level = f"{cell.concurrency:,}"
        if cell.clients is not None:
            level += f" ({cell.clients} clients)"
        rounds = run.rounds(cell.variant, cell.concurrency, workload)
        median = len(rounds) > 1 and cell is run.cell(cell.variant, cell.concurrency, workload)
        round_ = f"{cell.round} (median)" if median else f"{cell.round}"
        cpu = _cpu_ms(cell, (cell.cpu.server_s, cell.cpu.database_s, cell.cpu.load_s))
        lines.append(
            f"| {cell.variant} | {level} | {round_} | {cell.rps:,.0f} | {cell.ok_rps:,.0f} "
            f"| {_ms(cell.p50_ms)} | {_ms(cell.p99_ms)} | {cell.connect_errors}/"
            f"{cell.read_errors}/{cell.write_errors}/{cell.timeouts} | {cell.non_2xx:,} "
            f"| {cell.peak_connections} | {cell.rss_mb:,.0f} ({cell.anon_mb:,.0f}) "
            f"| {cpu} | {cell.cpu.other_cores:.2f} | {cell.listen_overflows:,} |"
        )
    return "\n".join(lines)


def _cpu_ms(cell: Cell, seconds: tuple[float, ...]) -> str:
    return " / ".join(
        "-" if math.isnan(ms) else f"{ms:.2f}" for ms in map(cell.cpu_ms_per_request, seconds)
    )


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _has(run: Run, variant: str, workload: str) -> bool:
    return any((c.variant, c.workload) == (variant, workload) for c in run.cells)


def _variants(run: Run) -> list[str]:
    present = {cell.variant for cell in run.cells}
    return [name for name in ORDER if name in present]


def _workloads(run: Run, variants: tuple[str, ...]) -> list[str]:
    """The workloads that any of `variants` ran, in the report's order."""
    present = {cell.workload for cell in run.cells if cell.variant in variants}
    return [name for name in WORKLOAD_ORDER if name in present]


# ---------------------------------------------------------------- results.png


def write(run: Run, out: Path) -> None:
    """results.json, results.png and RESULTS.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    run.save(out / "results.json")
    plot(run, out / "results.png")
    (out / "RESULTS.md").write_text(markdown(run, "results.png"))


def plot(run: Run, path: Path) -> None:
    """A panel per workload: ok req/s of the median round against concurrency (log scale),
    one line per stack, a band from its slowest to its fastest round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    workloads = _workloads(run, STACKS) or ["mix"]
    columns = min(3, len(workloads) + 1)
    rows = math.ceil((len(workloads) + 1) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    panels = list(grid.flat)
    handles = {}
    for axes, workload in zip(panels, workloads, strict=False):
        for name in STACKS:
            levels = [level for level in run.levels() if run.cell(name, level, workload)]
            if not levels:
                continue
            cells = [run.cell(name, level, workload) for level in levels]
            color = f"C{STACKS.index(name)}"  # a stack's colour is the same in every panel
            (line,) = axes.plot(
                levels, [c.ok_rps for c in cells], marker="o", color=color, label=name
            )
            handles[name] = line
            spread = [sorted(c.ok_rps for c in run.rounds(name, lv, workload)) for lv in levels]
            if any(len(rounds) > 1 for rounds in spread):
                low, high = [r[0] for r in spread], [r[-1] for r in spread]
                axes.fill_between(levels, low, high, color=color, alpha=0.15)
        axes.set(title=workload, xscale="log", xlabel="concurrent connections", ylabel="ok req/s")
        axes.set_ylim(bottom=0)
        axes.set_xticks(run.levels(), [f"{level:,}" for level in run.levels()])
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
    legend = panels[len(workloads)]
    legend.axis("off")
    shown = [name for name in STACKS if name in handles]
    legend.legend(
        [handles[name] for name in shown],
        shown,
        loc="center",
        title="stack (median round; band: all rounds)",
    )
    for axes in panels[len(workloads) + 1 :]:
        axes.axis("off")
    figure.suptitle(
        "ok req/s by workload: 2 workers, pool 10 per worker; wrk, servers and PostgreSQL "
        "share 2 cores"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":  # render a saved run again: python -m bench.report [FOLDER]
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    write(Run.load(folder / "results.json"), folder)
    print(f"bench: wrote {folder / 'RESULTS.md'} and {folder / 'results.png'}")
