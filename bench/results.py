"""The figures of one bench run, as measured: what the report is rendered from.

Kept as `bench/results.json` beside the report, so that every number in RESULTS.md can be
traced back to one run. A run measures each variant (a stack) with each workload at each level
in several rounds; every round is kept, and the report judges by the median round.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.backends import Peak
from bench.connect_time import ConnectTimes, Timing
from bench.cpu import CpuUse
from bench.pgbench import PgbenchResult
from bench.wrk import WrkResult


@dataclass(frozen=True)
class Cell:
    """One variant with one workload at one concurrency, in one round. For the database
    variant the "requests" are pgbench transactions, `non_2xx` counts failed transactions and
    `clients` its connections."""

    variant: str
    concurrency: int
    rps: float
    ok_rps: float
    p50_ms: float
    p99_ms: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    non_2xx: int
    peak_connections: int
    rss_mb: float
    anon_mb: float
    requests: int
    cpu: CpuUse
    listen_overflows: int  # connections the kernel dropped from full accept queues meanwhile
    clients: int | None = None
    round: int = 1  # which round of the run measured it, from 1
    workload: str = "get"  # bench/workloads.py

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def clean(self) -> bool:
        """Every request answered below 400, none lost."""
        return self.socket_errors == 0 and self.non_2xx == 0 and self.ok_rps > 0

    def cpu_ms_per_request(self, seconds: float) -> float:
        return seconds * 1000 / self.requests if self.requests else math.nan

    @classmethod
    def from_wrk(
        cls,
        variant: str,
        concurrency: int,
        wrk: WrkResult,
        peak: Peak,
        cpu: CpuUse,
        listen_overflows: int,
        round_: int = 1,
        workload: str = "get",
    ) -> Cell:
        return cls(
            variant=variant,
            concurrency=concurrency,
            rps=wrk.rps,
            ok_rps=wrk.ok_rps,
            p50_ms=wrk.p50_ms,
            p99_ms=wrk.p99_ms,
            connect_errors=wrk.connect_errors,
            read_errors=wrk.read_errors,
            write_errors=wrk.write_errors,
            timeouts=wrk.timeouts,
            non_2xx=wrk.non_2xx,
            peak_connections=peak.connections,
            rss_mb=peak.rss_mb,
            anon_mb=peak.anon_mb,
            requests=wrk.requests,
            cpu=cpu,
            listen_overflows=listen_overflows,
            round=round_,
            workload=workload,
        )

    @classmethod
    def from_pgbench(
        cls, concurrency: int, result: PgbenchResult, peak: Peak, cpu: CpuUse, listen_overflows: int
    ) -> Cell:
        ok = result.transactions - result.failed
        return cls(
            variant="database",
            concurrency=concurrency,
            rps=result.tps,
            ok_rps=result.tps * ok / result.transactions if result.transactions else 0.0,
            p50_ms=result.p50_ms,
            p99_ms=result.p99_ms,
            connect_errors=0,
            read_errors=0,
            write_errors=0,
            timeouts=0,
            non_2xx=result.failed,
            peak_connections=peak.connections,
            rss_mb=peak.rss_mb,
            anon_mb=peak.anon_mb,
            requests=result.transactions,
            cpu=cpu,
            listen_overflows=listen_overflows,
            clients=result.clients,
        )


@dataclass
class Run:
    command: str
    date: str
    machine: dict[str, str]
    settings: dict[str, str]
    variants: dict[str, str]  # name: what it is
    workloads: dict[str, str] = field(default_factory=dict)  # name: what it asks for
    connect_times: ConnectTimes | None = None
    cells: list[Cell] = field(default_factory=list)
    planned_rounds: int = 1  # of each HTTP variant at each level
    failures: list[str] = field(default_factory=list)  # what failed, where, and why
    server_logs: dict[str, dict[str, int]] = field(default_factory=dict)  # variant: counts
    logs_folder: str = ""

    def rounds(self, variant: str, concurrency: int, workload: str = "get") -> list[Cell]:
        """Every round of one variant and workload at one level, in the order they ran."""
        key = (variant, concurrency, workload)
        return [c for c in self.cells if (c.variant, c.concurrency, c.workload) == key]

    def cell(self, variant: str, concurrency: int, workload: str = "get") -> Cell | None:
        """The median round by ok req/s (the run makes an odd number of rounds; of an even
        number, left by a failure, the slower middle one). One round's figures together: its
        p99 is that round's p99, not a mix."""
        found = sorted(self.rounds(variant, concurrency, workload), key=lambda c: c.ok_rps)
        return found[(len(found) - 1) // 2] if found else None

    def levels(self) -> list[int]:
        return sorted({cell.concurrency for cell in self.cells})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(_finite(asdict(self)), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Run:
        """A run saved by `save()`, to render its report again without measuring again."""
        data = json.loads(path.read_text())
        times = data.pop("connect_times")
        cells = data.pop("cells")
        # Saved before the plan was kept: as many rounds as it holds (1 before rounds existed).
        data.setdefault("planned_rounds", max((c.get("round", 1) for c in cells), default=1))
        # Saved before issue 18: one workload per variant, and the stacks' old names.
        data["variants"] = {_RENAMED.get(k, k): v for k, v in data["variants"].items()}
        server_logs = data.get("server_logs", {})
        data["server_logs"] = {_RENAMED.get(k, k): v for k, v in server_logs.items()}
        for cell in cells:
            cell.setdefault("workload", "healthz" if cell["variant"] == "ceiling" else "get")
            cell["variant"] = _RENAMED.get(cell["variant"], cell["variant"])
        run = cls(**data)
        if times is not None:
            run.connect_times = ConnectTimes(**{k: Timing(**v) for k, v in times.items()})
        for cell in cells:
            cell["cpu"] = CpuUse(**cell["cpu"])
            if not cell["requests"]:  # no answer at all: no latency was measured
                cell["p50_ms"] = cell["p99_ms"] = None
            nan = {k: math.nan for k in ("p50_ms", "p99_ms") if cell[k] is None}
            run.cells.append(Cell(**{**cell, **nan}))
        return run


_RENAMED = {"pooled": "service", "peer": "peer-gthread"}


def _finite(value):
    """JSON has no NaN: a latency that was never measured is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
