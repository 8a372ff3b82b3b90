"""The goals a run is judged by, from its median rounds: issue 18's and issue 4's.

Issue 18, at every level: with the mix, the service serves at least 1.5 times the ok req/s of
the best Flask peer (the faster of peer-gthread and peer-gevent at that level) and at least 0.9
times the asyncio stack's; with each route alone (get, list, create, update), at least 1.2
times the best Flask peer's. Issue 4, with GET /users/<id>: the service against a connection
per request, the gthread peer and its own /healthz, and its behaviour at 10,000 connections.

A ratio is taken between median rounds. A level where a compared stack lacks a round the run
planned counts as missed: what was not measured cannot have met the goal; a goal whose
workload or stacks the run did not include at all is "not measured". Errors count in every
round and the p99 bound of 10,000 connections must hold in the worst round: a slow spell of
this machine moves one round, not the verdict, and no round's failure is averaged away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.results import Cell, Run
from bench.servers import FLASK_PEERS
from bench.workloads import ROUTES

SERVICE = "service"
BEST_FLASK_PEER = "best Flask peer"
C10K = 10_000
LITTLE_FACTOR = 2.5


@dataclass(frozen=True)
class Goal:
    name: str
    met: bool | None  # None: not measured in this run
    detail: str
    level: int | None = None  # None: judged over every level at once


@dataclass(frozen=True)
class Target:
    """The service's ok req/s with `workload` at least `factor` times `against`'s."""

    workload: str
    against: str  # BEST_FLASK_PEER or a stack's name
    factor: float

    @property
    def name(self) -> str:
        return f"{self.workload}: service ≥ {self.factor:g} x {self.against} (ok req/s)"

    @property
    def stacks(self) -> tuple[str, ...]:
        return FLASK_PEERS if self.against == BEST_FLASK_PEER else (self.against,)


TARGETS = (
    Target("mix", BEST_FLASK_PEER, 1.5),
    Target("mix", "asyncio", 0.9),
    *(Target(route, BEST_FLASK_PEER, 1.2) for route in ROUTES),
)


# ---------------------------------------------------------------- issue 18


def goals(run: Run) -> list[Goal]:
    """Issue 18's goals: one per target and level, or one "not measured" per target."""
    found = []
    for target in TARGETS:
        theirs = [name for name in target.stacks if _measured(run, name, target.workload)]
        if not _measured(run, SERVICE, target.workload) or not theirs:
            found.append(Goal(target.name, None, "not measured"))
            continue
        found += [_target_goal(run, target, theirs, level) for level in run.levels()]
    return found


def _target_goal(run: Run, target: Target, theirs: list[str], level: int) -> Goal:
    short = _short_of_rounds(run, (SERVICE, *theirs), level, target.workload)
    if short:
        return Goal(target.name, False, short, level)
    ours = run.cell(SERVICE, level, target.workload)
    best = max((run.cell(name, level, target.workload) for name in theirs), key=_ok_rps)
    ratio = _ratio(ours.ok_rps, best.ok_rps)
    detail = (
        f"{_fmt_ratio(ratio)}: service {ours.ok_rps:,.0f} vs {best.variant} "
        f"{best.ok_rps:,.0f} ok req/s"
    )
    absent = [name for name in target.stacks if name not in theirs]
    if absent:
        detail += f" ({', '.join(absent)} not in this run)"
    met = ratio >= target.factor
    if not met:
        detail += f"; {shortfall(ratio, target.factor)}"
    return Goal(target.name, met, detail, level)


def shortfall(ratio: float, factor: float) -> str:
    """How far a missed ratio falls short, and what the service would need to meet it."""
    if not ratio:
        return "the service served none"
    return (
        f"short by {factor - ratio:.2f}x: the service needs {factor / ratio - 1:.0%} more ok req/s"
    )


def best_flask_peer(run: Run, level: int, workload: str) -> Cell | None:
    """The median round of the Flask peer that served the most at this level."""
    cells = [run.cell(name, level, workload) for name in FLASK_PEERS]
    return max((c for c in cells if c), key=_ok_rps, default=None)


def _ok_rps(cell: Cell) -> float:
    return cell.ok_rps


def _measured(run: Run, variant: str, workload: str) -> bool:
    return any((c.variant, c.workload) == (variant, workload) for c in run.cells)


def _short_of_rounds(run: Run, variants: tuple[str, ...], level: int, workload: str) -> str:
    """What is missing at one level ("" when each variant has every round the run planned):
    a round whose server failed leaves no cell behind."""
    missing = [
        f"{name}: {len(run.rounds(name, level, workload))} of {run.planned_rounds} rounds"
        for name in variants
        if len(run.rounds(name, level, workload)) < run.planned_rounds
    ]
    return f"not measured ({'; '.join(missing)})" if missing else ""


# ---------------------------------------------------------------- issue 4


def legacy_goals(run: Run) -> list[Goal]:
    """Issue 4's goals, with GET /users/<id> (the ceiling: /healthz)."""
    found = [
        _ratio_goal(run, "per-request", "get", 8.0),
        _ratio_goal(run, "peer-gthread", "get", 1.5),
        _ratio_goal(run, "ceiling", "healthz", 0.6),
    ]
    return [*found, *_c10k_goals(run)]


def _ratio_goal(run: Run, other: str, workload: str, target: float) -> Goal:
    """Between median rounds, at every level."""
    name = f"get: service ≥ {target:g} x {other} (ok req/s, at every level)"
    if not (_measured(run, SERVICE, "get") and _measured(run, other, workload)):
        return Goal(name, None, "not measured")
    met, details = True, []
    for level in run.levels():
        short = _short_of_rounds(run, (SERVICE,), level, "get") or _short_of_rounds(
            run, (other,), level, workload
        )
        if short:
            met = False
            details.append(f"{short} at {level:,}")
            continue
        ratio = _ratio(run.cell(SERVICE, level).ok_rps, run.cell(other, level, workload).ok_rps)
        met = met and ratio >= target
        rounds = _round_ratios(run, other, level, workload)
        details.append(f"{_fmt_ratio(ratio)} at {level:,}{rounds}")
    return Goal(name, met, ", ".join(details))


def _round_ratios(run: Run, other: str, level: int, workload: str) -> str:
    """Round by round, each round's service against the same round's other, shown beside the
    ratio of the median rounds so that a reader sees how far single rounds strayed. Empty for
    a run of one round."""
    theirs = {cell.round: cell for cell in run.rounds(other, level, workload)}
    pairs = [
        _ratio(cell.ok_rps, theirs[cell.round].ok_rps)
        for cell in run.rounds(SERVICE, level)
        if cell.round in theirs
    ]
    if len(pairs) < 2:
        return ""
    return f" (rounds: {', '.join(_fmt_ratio(r).removesuffix('x') for r in pairs)})"


def _c10k_goals(run: Run) -> list[Goal]:
    """Judged on every round: errors are summed over the rounds, and each round must keep
    its p99 within the bound."""
    cells = run.rounds(SERVICE, C10K)
    if not cells:
        missing = "not measured: run with concurrency 10000"
        return [Goal(f"get at {C10K:,}: {what}", None, missing) for what in _C10K_WHAT]
    short = _short_of_rounds(run, (SERVICE,), C10K, "get")
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
            f"get at {C10K:,}: {_C10K_WHAT[0]}",
            not short and socket_errors == 0,
            f"{socket_errors}{over} ({kinds}){tail}",
        ),
        Goal(
            f"get at {C10K:,}: {_C10K_WHAT[1]}",
            not short and non_2xx == 0,
            f"{non_2xx}{over}{tail}",
        ),
        _fair_wait_goal(cells, short, tail),
    ]


def _fair_wait_goal(cells: list[Cell], short: str, tail: str) -> Goal:
    """p99 within LITTLE_FACTOR times Little's mean wait in every round, shown for the round
    where it stands highest against its own bound. A round that answered nothing has no p99
    and fails."""
    worst = max(cells, key=_p99_over_little)
    ratio = _p99_over_little(worst)
    name = f"get at {C10K:,}: {_C10K_WHAT[2]}"
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


# ---------------------------------------------------------------- ratios


def ratio(ours: Cell | None, theirs: Cell | None) -> float | None:
    """Between two median rounds; None when either is missing."""
    return None if ours is None or theirs is None else _ratio(ours.ok_rps, theirs.ok_rps)


def _ratio(ours: float, theirs: float) -> float:
    """Infinite when only ours served any; 0 when ours served none, whatever theirs did."""
    if not ours:
        return 0.0
    return ours / theirs if theirs else math.inf


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else _fmt_ratio(value)


def _fmt_ratio(ratio: float) -> str:
    return "∞ (it served none)" if math.isinf(ratio) else f"{ratio:.2f}x"
