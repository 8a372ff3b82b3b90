"""`python -m bench.run`: every stack with every workload at every concurrency level.

Starts a throwaway PostgreSQL with seeded users (once: the creates grow the table through the
run) and measures what a connection costs against a pooled checkout. Then, at each
concurrency level in turn, it measures every variant: an HTTP variant on a gunicorn started
for it, which serves each of the round's workloads in turn (bench/workloads.py), each warmed up,
then loaded with wrk while the server connections and the CPU of the server and of PostgreSQL
are sampled; the database variant with pgbench. Level by level, so that the variants a ratio
compares run within minutes of each other: this machine's speed drifts by up to 30% over
minutes, and measured variant by variant (all levels of one, then the next), a slow spell fell
on one variant's whole row and moved every ratio with it.

Within a level, the HTTP variants take turns in rounds (5 by default), each round in an order
shifted by one, and within a variant's turn the workloads too, and the report judges by the
median round. With one round, a slow spell that fell on one cell decided a goal: of eleven
one-round runs, three missed pooled >= 1.5 x peer in one cell while their other cells met it by
a wide margin. The rounds of a level span several minutes, so the medians compared can be
minutes apart. pgbench, which no goal compares with, runs once per level.

Writes bench/RESULTS.md, bench/results.png and bench/results.json, and prints the goals of
issue 18 and of issue 4. Installs nothing: `make bench` installs wrk.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2

from bench import connect_time, database, host, pgbench, report, servers, wrk
from bench.backends import BackendSampler
from bench.cpu import CpuMeter
from bench.results import Cell, Run
from bench.workloads import DEFAULT as DEFAULT_WORKLOADS
from bench.workloads import WORKLOADS
from deploy.localpg import LocalPostgres

HERE = Path(__file__).resolve().parent
LEVELS = (50, 500, 5000)
# The four stacks of issue 18, then issue 4's variants, each with its one workload.
VARIANTS = (*servers.STACKS, "ceiling", "per-request", "database")
DURATION_S = 10
ROUNDS = 5
USERS = 10_000
# Enough for the per-request variant up to 1,000 requests in flight (10 times PostgreSQL's
# default), plus the pools and pgbench; beyond that PostgreSQL refuses, as a real one would.
# Not more: each backend costs a process and a few MB on a shared 24 GB machine.
MAX_CONNECTIONS = 1000
WARMUP_S = 2
WARMUP_CONNECTIONS = 50
PAUSE_S = 2.0  # between two levels: let closed sockets and exiting backends settle
DRAIN_DEADLINE_S = 30.0  # for a server to close the connections of the workload before
# What a server costs beside its workloads' load, start and stop, for the estimate of a run.
SERVER_OVERHEAD_S = 10


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        wrk.find_wrk()
        if "database" in args.stacks:
            database.pgbench_path()
    except (wrk.WrkError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    needed = host.open_files_needed(max(args.levels), args.max_connections)
    nofile = host.raise_open_files(needed)
    backlog_cap = host.somaxconn()
    if nofile < needed:
        print(f"bench: warning: the open files limit is {nofile}, {needed} are needed")
    if backlog_cap is not None and backlog_cap < max(args.levels):
        print(
            f"bench: note: net.core.somaxconn={backlog_cap} caps every listen backlog below "
            f"{max(args.levels):,}; connections beyond it wait for SYN retries"
        )

    servers.stop_everything_on_sigterm()  # the servers and PostgreSQL are stopped
    failed = []
    server = database.start(args.max_connections)
    sampler = None
    try:
        dsn = database.seed(server, args.users)
        sampler = BackendSampler(server.dsn(), database.DBNAME)
        run = _new_run(args, server)
        print("bench: timing psycopg2.connect against a pooled checkout ...", flush=True)
        run.connect_times = connect_time.measure(dsn)
        logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
        run.logs_folder = str(logs)
        print(f"bench: {_estimate(args)}", flush=True)
        for level in args.levels:
            for round_, name, workloads in turns(args.stacks, args.workloads, args.rounds):
                if name in failed:
                    continue
                try:
                    if name == "database":
                        _run_pgbench(server, sampler, args, level, run.cells)
                    else:
                        at = Turn(name, workloads, level, round_)
                        _run_http(at, dsn, server.pid, sampler, args, logs, run)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"bench: {name} failed, going on without it: {exc}", file=sys.stderr)
                    failed.append(name)
                    run.failures.append(f"{name} at {level:,}, round {round_}: {exc}")
    finally:
        if sampler is not None:
            sampler.close()
        server.stop()

    report.write(run, args.out)
    print()
    print(report.goals_table(run))
    print()
    print(report.legacy_goals_table(run))
    print(f"\nbench: wrote {args.out / 'RESULTS.md'} and {args.out / 'results.png'}")
    print(f"bench: the servers' logs are kept in {run.logs_folder}")
    if failed:
        print(f"bench: these stacks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--levels",
        type=_int_list,
        default=",".join(map(str, LEVELS)),
        help="concurrency levels, comma separated (default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=DURATION_S,
        help="seconds of load per workload, stack, level and round (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=_odd,
        default=ROUNDS,
        help="rounds of every HTTP variant per level, odd; the report takes the median round "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workloads",
        type=_workload_list,
        default=",".join(DEFAULT_WORKLOADS),
        help="comma separated, of the four stacks (default: %(default)s)",
    )
    parser.add_argument(
        "--stacks",
        type=_stack_list,
        default=",".join(VARIANTS),
        help="comma separated; ceiling (GET /healthz), per-request (GET /users/<id>) and "
        "database (pgbench) serve their one workload whatever --workloads says "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--users", type=int, default=USERS, help="users seeded (default: %(default)s)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="PostgreSQL max_connections (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder for RESULTS.md, results.png, results.json"
    )
    args = parser.parse_args(argv)
    args.command = shlex.join(
        ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
    )
    return args


@dataclass(frozen=True)
class Turn:
    """One HTTP variant's turn in one round of one level: a server started for it serves
    `workloads` in this order."""

    name: str
    workloads: tuple[str, ...]
    level: int
    round: int


def turns(
    variants: list[str], workloads: list[str], rounds: int
) -> list[tuple[int, str, tuple[str, ...]]]:
    """(round, variant, its workloads in order) as one level measures them: the HTTP variants
    round after round, each round's order starting one further along, and so the workloads
    within a turn, so that no variant and no workload always runs first on a fresh level or a
    fresh server, or always last; then pgbench once. A variant of issue 4 serves its one
    workload."""
    http = [name for name in variants if name != "database"]
    order = []
    for round_ in range(1, rounds + 1):
        for i in range(len(http)):
            name = http[(round_ - 1 + i) % len(http)]
            fixed = servers.HTTP_VARIANTS[name].workload
            ours = [fixed] if fixed else _shifted(workloads, round_ - 1)
            order.append((round_, name, tuple(ours)))
    return [*order, (1, "database", ("get",))] if "database" in variants else order


def _shifted(items: list[str], by: int) -> list[str]:
    return [items[(by + i) % len(items)] for i in range(len(items))] if items else []


def _estimate(args: argparse.Namespace) -> str:
    """How many cells, and roughly how long: each cell's warm-up, pause and load, and each
    server's start and stop."""
    per_level = turns(args.stacks, args.workloads, args.rounds)
    cells = sum(len(ours) for _, _, ours in per_level) * len(args.levels)
    servers_started = sum(name != "database" for _, name, _ in per_level) * len(args.levels)
    seconds = cells * (WARMUP_S + PAUSE_S + args.duration + 1)
    seconds += servers_started * SERVER_OVERHEAD_S
    return f"{cells} cells on {servers_started} server starts: about {seconds / 60:.0f} minutes"


def _odd(text: str) -> int:
    """An odd number of rounds has a median round; of two, which would be "the median"?"""
    if not text.isdigit() or int(text) % 2 == 0:
        raise argparse.ArgumentTypeError("give an odd whole number: 1, 3, 5, ...")
    return int(text)


def _int_list(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("give positive whole numbers, e.g. 50,500")
    return levels


def _stack_list(text: str) -> list[str]:
    """In the order of VARIANTS: the first round runs them so, later rounds shifted."""
    chosen = _names(text, VARIANTS, "stack")
    return [name for name in VARIANTS if name in chosen]


def _workload_list(text: str) -> list[str]:
    """In the order given: the first round runs them so, later rounds shifted."""
    return _names(text, DEFAULT_WORKLOADS, "workload")


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    """The names given, each once, in the order given."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown}; choose from {known}")
    return names


def _new_run(args: argparse.Namespace, server: LocalPostgres) -> Run:
    conn = psycopg2.connect(server.dsn())
    try:
        version = conn.cursor()
        version.execute("SHOW server_version")
        pg_version = version.fetchone()[0]
    finally:
        conn.close()
    variants = {
        name: servers.HTTP_VARIANTS[name].description for name in args.stacks if name != "database"
    }
    if "database" in args.stacks:
        variants["database"] = (
            f"pgbench, the same SELECT by random id, simple protocol, clients = concurrency "
            f"capped at {pgbench.MAX_CLIENTS}, {pgbench.THREADS} threads"
        )
    ran = {name for _, _, ours in turns(args.stacks, args.workloads, 1) for name in ours}
    return Run(
        command=args.command,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=host.describe(pg_version),
        settings=_settings(args, pg_version),
        variants=variants,
        workloads={name: w.description for name, w in WORKLOADS.items() if name in ran},
        planned_rounds=args.rounds,
    )


def _settings(args: argparse.Namespace, pg_version: str) -> dict[str, str]:
    pool = servers.POOL_PER_WORKER
    passed = servers.passed_through(os.environ)
    return {
        "service code": f"commit {host.revision(servers.ROOT)}",
        "servers": (
            f"gunicorn, {servers.WORKERS} workers for every stack, "
            f"WORKER_CONNECTIONS={_worker_connections(args)}, pool {pool} per worker "
            f"(DB_POOL_MAX={pool}, DB_MAX_CONNECTIONS={servers.WORKERS * pool}), "
            f"DB_POOL_TIMEOUT={servers.POOL_TIMEOUT_S} (the default 5 s would turn the wait "
            "that Little's law gives at 10,000 connections into 503s), every other setting "
            "at its default; listen backlog 16384 for the service (gunicorn.conf.py), gunicorn's "
            f"default 2048 for the others, cut to net.core.somaxconn={host.somaxconn()}; "
            "access log on, to stdout captured in a file"
        ),
        "settings passed through from the environment": (
            ", ".join(f"{k}={v}" for k, v in passed.items()) or "none"
        ),
        "peers": (
            f"peer-gthread: threads = pool size = {pool} per worker; peer-gevent: the same app, "
            "worker_connections as the service; asyncio: one event loop per uvicorn worker "
            "process, its handlers calling the pool directly; each with a fixed pool, "
            "autocommit (one round trip per request), the same SQL as the service"
        ),
        "load": (
            f"wrk -t{wrk.THREADS} -c<concurrency> -d{args.duration}s "
            f"--timeout {wrk.TIMEOUT_S}s --latency; ids uniformly random in 1..{args.users}; "
            f"level by level; at each level {args.rounds} round(s) of every HTTP variant in "
            "turn (the order shifted by one each round), then pgbench once; each HTTP round "
            "on a server started for it, which serves the round's workloads in turn (their "
            "order shifted by one each round), each after the server closed the connections "
            f"of the one before, warmed up for {WARMUP_S} s at {WARMUP_CONNECTIONS} "
            f"connections, then left {PAUSE_S:g} s to settle"
        ),
        "database": (
            f"throwaway PostgreSQL {pg_version} on 127.0.0.1, max_connections="
            f"{args.max_connections}, fsync off, SCRAM authentication; {args.users:,} users "
            "seeded once: every create adds a row, so the table grows through the run"
        ),
    }


def _worker_connections(args: argparse.Namespace) -> int:
    """Enough for every connection of the highest level to land on one worker."""
    return max(max(args.levels), 1000)


def _run_http(
    turn: Turn,
    dsn: str,
    database_pid: int,
    sampler: BackendSampler,
    args: argparse.Namespace,
    logs: Path,
    run: Run,
) -> None:
    """Start the variant's server, measure each of the turn's workloads into `run`, stop it."""
    variant = servers.HTTP_VARIANTS[turn.name]
    env = servers.environment(dsn, servers.free_port(), _worker_connections(args))
    server = servers.Server(variant, env, logs / f"{turn.name}-{turn.level}-{turn.round}.log")
    try:
        server.wait_ready()
        meter = CpuMeter(database_pid, server.pid)
        for workload in turn.workloads:
            _drain(server)
            run.cells.append(_measure(server, meter, sampler, turn, workload, args))
            _progress(run.cells[-1])
    finally:
        server.stop()
        events = run.server_logs.setdefault(turn.name, {})
        for key, count in server.log_events().items():
            events[key] = events.get(key, 0) + count
        if not sampler.wait_idle(timeout_s=30):
            print(f"bench: warning: {turn.name} left server connections behind")


def _measure(
    server: servers.Server,
    meter: CpuMeter,
    sampler: BackendSampler,
    turn: Turn,
    workload: str,
    args: argparse.Namespace,
) -> Cell:
    """A warm-up with the workload, a pause, then one measured wrk run of it."""
    load = WORKLOADS[workload]
    url = server.url + load.path
    warmup = wrk.command(url, WARMUP_CONNECTIONS, WARMUP_S, load.script, load.lua_args(args.users))
    wrk.run(warmup)
    time.sleep(PAUSE_S)
    sampler.start()
    meter.start()
    overflows = host.listen_overflows()
    try:
        cmd = wrk.command(url, turn.level, args.duration, load.script, load.lua_args(args.users))
        result, _ = wrk.run(cmd)
    finally:
        overflows = host.listen_overflows() - overflows
        cpu = meter.stop()
        peak = sampler.stop()
    return Cell.from_wrk(turn.name, turn.level, result, peak, cpu, overflows, turn.round, workload)


def _drain(server: servers.Server) -> None:
    """Wait until the server holds no client connection of the workload before (at most
    DRAIN_DEADLINE_S; then go on, and say so)."""
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while server.held_connections():
        if time.monotonic() > deadline:
            held = server.held_connections()
            print(f"bench: warning: {server.variant.name} still held {held} connections")
            return
        time.sleep(0.05)


def _run_pgbench(
    server: LocalPostgres,
    sampler: BackendSampler,
    args: argparse.Namespace,
    level: int,
    cells: list[Cell],
) -> None:
    env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(server.port),
        "PGUSER": "postgres",
        "PGPASSWORD": server.password,
        "PGDATABASE": database.DBNAME,
        "PATH": "/usr/bin:/bin",
    }
    meter = CpuMeter(server.pid)
    time.sleep(PAUSE_S)
    sampler.start()
    meter.start()
    overflows = host.listen_overflows()
    try:
        result = pgbench.run(env, level, args.duration, args.users)
    finally:
        overflows = host.listen_overflows() - overflows
        cpu = meter.stop()
        peak = sampler.stop()
    cells.append(Cell.from_pgbench(level, result, peak, cpu, overflows))
    _progress(cells[-1])


def _progress(cell: Cell) -> None:
    print(
        f"bench: {cell.variant:<12} {cell.workload:<7} {cell.concurrency:>6,} "
        f"round {cell.round}: "
        f"{cell.ok_rps:>8,.0f} ok req/s, "
        f"p50 {cell.p50_ms:8.1f} ms, p99 {cell.p99_ms:8.1f} ms, socket errors "
        f"{cell.connect_errors}/{cell.read_errors}/{cell.write_errors}/{cell.timeouts}, "
        f"non-2xx {cell.non_2xx}, conns {cell.peak_connections}, RSS {cell.rss_mb:,.0f} MB, "
        f"CPU ms/req server {cell.cpu_ms_per_request(cell.cpu.server_s):.2f} "
        f"db {cell.cpu_ms_per_request(cell.cpu.database_s):.2f}, "
        f"others {cell.cpu.other_cores:.2f} cores, listen overflows {cell.listen_overflows}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
