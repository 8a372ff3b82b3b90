"""The database's own ceiling: pgbench running the users SELECT by random id, no HTTP at all.

A custom select-only script (like `pgbench -S`, on our table), simple query protocol as
psycopg2 sends it, autocommit, two threads. Clients are the concurrency capped at
`MAX_CLIENTS`: more server processes than that on two cores only queue inside the kernel.
Latency percentiles come from pgbench's per-transaction log, a 10% sample.
"""

from __future__ import annotations

import glob
import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import database

MAX_CLIENTS = 20
THREADS = 2
LOG_SAMPLING = 0.1
SCRIPT = (
    "\\set id random(1, {users})\nSELECT id, name, email, created_at FROM users WHERE id = :id;\n"
)


@dataclass(frozen=True)
class PgbenchResult:
    clients: int
    transactions: int
    failed: int
    duration_s: float
    tps: float
    p50_ms: float
    p99_ms: float


def clients_for(concurrency: int) -> int:
    return min(concurrency, MAX_CLIENTS)


def run(env: dict[str, str], concurrency: int, duration_s: float, users: int) -> PgbenchResult:
    """Run pgbench against the database named by env's PG* variables and read its figures."""
    clients = clients_for(concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as folder:
        script = Path(folder) / "select.sql"
        script.write_text(SCRIPT.format(users=users))
        cmd = [
            database.pgbench_path(),
            "--no-vacuum",
            "--protocol=simple",
            f"--client={clients}",
            f"--jobs={min(THREADS, clients)}",
            f"--time={int(duration_s)}",
            f"--file={script}",
            "--log",
            f"--log-prefix={Path(folder) / 'tx'}",
            f"--sampling-rate={LOG_SAMPLING}",
        ]
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}):\n{done.stderr}")
        latencies_ms = _logged_latencies_ms(glob.glob(str(Path(folder) / "tx.*")))
    return parse(done.stdout, clients, latencies_ms)


def parse(report: str, clients: int, latencies_ms: list[float]) -> PgbenchResult:
    tps = re.search(r"^tps = ([0-9.]+)", report, re.M)
    processed = re.search(r"^number of transactions actually processed: (\d+)", report, re.M)
    duration = re.search(r"^duration: (\d+) s", report, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", report, re.M)
    if not (tps and processed and duration):
        raise RuntimeError(f"not a pgbench report:\n{report}")
    if len(latencies_ms) >= 2:
        cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
    else:
        p50 = p99 = float("nan")
    return PgbenchResult(
        clients=clients,
        transactions=int(processed[1]),
        failed=int(failed[1]) if failed else 0,
        duration_s=float(duration[1]),
        tps=float(tps[1]),
        p50_ms=p50,
        p99_ms=p99,
    )


def _logged_latencies_ms(paths: list[str]) -> list[float]:
    """Column 3 of pgbench's transaction log is the latency in microseconds."""
    latencies = []
    for path in paths:
        with open(path) as log:
            for line in log:
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1000)
    return latencies
