"""`python -m bench.run`: every variant at every concurrency level, level by level.

Starts a throwaway PostgreSQL with seeded users and measures what a connection costs against a
pooled checkout. Then, at each concurrency level in turn, it measures every variant: an HTTP
variant on a gunicorn started for it, warmed up, then loaded with wrk while the server
connections are sampled; the database variant with pgbench. Level by level, so that the
variants a ratio compares run within minutes of each other: this machine's speed drifts
by up to 30% over minutes, and measured variant by variant (all levels of one, then the next),
a slow spell fell on one variant's whole row and moved every ratio with it.

Within a level, the HTTP variants take turns in rounds (5 by default), each round in an order
shifted by one, and the report judges by the median round. With one round, a slow spell that
fell on one cell decided a goal: of eleven one-round runs, three missed pooled >= 1.5 x peer in
one cell while their other cells met it by a wide margin. The rounds of a level span several
minutes, so the medians compared can be minutes apart; the report lists each round's own
ratio beside them. pgbench, which no goal compares with, runs once per level.

Writes bench/RESULTS.md, bench/results.png and bench/results.json, and prints the seed's
"Before vs After" table and the goals. Installs nothing: `make bench` installs wrk.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2

from bench import connect_time, database, host, pgbench, report, servers, wrk
from bench.backends import BackendSampler
from bench.cpu import CpuMeter
from bench.results import Cell, Run
from deploy.localpg import LocalPostgres

HERE = Path(__file__).resolve().parent
LEVELS = (50, 500, 5000, 10_000)
VARIANTS = ("pooled", "ceiling", "per-request", "peer", "database")
DURATION_S = 15
ROUNDS = 5
USERS = 10_000
# Enough for the per-request variant up to 1,000 requests in flight (10 times PostgreSQL's
# default), plus the pools and pgbench; beyond that PostgreSQL refuses, as a real one would.
# Not more: each backend costs a process and a few MB on a shared 24 GB machine.
MAX_CONNECTIONS = 1000
WARMUP_S = 2
WARMUP_CONNECTIONS = 50
PAUSE_S = 2.0  # between two levels: let closed sockets and exiting backends settle


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        wrk.find_wrk()
        if "database" in args.variants:
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

    # SIGTERM unwinds like Ctrl-C, so that the servers and PostgreSQL are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
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
        for level in args.levels:
            for round_, name in turns(args.variants, args.rounds):
                if name in failed:
                    continue
                try:
                    if name == "database":
                        _run_pgbench(server, sampler, args, level, run.cells)
                    else:
                        _run_http(name, level, round_, dsn, server.pid, sampler, args, logs, run)
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
    print(report.before_after(run))
    print()
    print(report.goals_table(run))
    print(f"\nbench: wrote {args.out / 'RESULTS.md'} and {args.out / 'results.png'}")
    print(f"bench: the servers' logs are kept in {run.logs_folder}")
    if failed:
        print(f"bench: these variants failed: {', '.join(failed)}", file=sys.stderr)
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
        "--duration", type=int, default=DURATION_S, help="seconds per round (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=_odd,
        default=ROUNDS,
        help="rounds of every HTTP variant per level, odd; the report takes the median round "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--variants",
        type=_variant_list,
        default=",".join(VARIANTS),
        help="comma separated (default: %(default)s)",
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


def turns(variants: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, variant) in the order one level measures them: the HTTP variants round after
    round, each round's order starting one further along, so that no variant always runs first
    on a fresh level, or always last; then pgbench once."""
    http = [name for name in variants if name != "database"]
    order = [
        (round_, http[(round_ - 1 + i) % len(http)])
        for round_ in range(1, rounds + 1)
        for i in range(len(http))
    ]
    return [*order, (1, "database")] if "database" in variants else order


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


def _variant_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    return [name for name in VARIANTS if name in names]


def _new_run(args: argparse.Namespace, server: LocalPostgres) -> Run:
    conn = psycopg2.connect(server.dsn())
    try:
        version = conn.cursor()
        version.execute("SHOW server_version")
        pg_version = version.fetchone()[0]
    finally:
        conn.close()
    variants = {
        name: servers.HTTP_VARIANTS[name].description
        for name in args.variants
        if name != "database"
    }
    if "database" in args.variants:
        variants["database"] = (
            f"pgbench, the same SELECT by random id, simple protocol, clients = concurrency "
            f"capped at {pgbench.MAX_CLIENTS}, {pgbench.THREADS} threads"
        )
    return Run(
        command=args.command,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=host.describe(pg_version),
        settings=_settings(args, pg_version),
        variants=variants,
        planned_rounds=args.rounds,
    )


def _settings(args: argparse.Namespace, pg_version: str) -> dict[str, str]:
    pool = servers.POOL_PER_WORKER
    passed = servers.passed_through(os.environ)
    return {
        "service code": f"commit {host.revision(servers.ROOT)}",
        "servers": (
            f"gunicorn, {servers.WORKERS} workers (gunicorn's gevent worker for pooled, "
            "ceiling and per-request), "
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
        "peer": f"gthread, threads = pool size = {pool} per worker",
        "load": (
            f"wrk -t{wrk.THREADS} -c<concurrency> -d{args.duration}s "
            f"--timeout {wrk.TIMEOUT_S}s --latency; users.lua asks for a uniformly random id "
            f"in 1..{args.users}; level by level; at each level {args.rounds} round(s) of "
            "every HTTP variant in turn (the order shifted by one each round), then pgbench "
            f"once; each HTTP round on a server started for it, warmed up for {WARMUP_S} s "
            f"at {WARMUP_CONNECTIONS} connections, then left {PAUSE_S:g} s to settle"
        ),
        "database": (
            f"throwaway PostgreSQL {pg_version} on 127.0.0.1, max_connections="
            f"{args.max_connections}, fsync off, SCRAM authentication; {args.users:,} users"
        ),
    }


def _worker_connections(args: argparse.Namespace) -> int:
    """Enough for every connection of the highest level to land on one worker."""
    return max(max(args.levels), 1000)


def _run_http(
    name: str,
    level: int,
    round_: int,
    dsn: str,
    database_pid: int,
    sampler: BackendSampler,
    args: argparse.Namespace,
    logs: Path,
    run: Run,
) -> None:
    """Start the variant's server, warm it up, measure one round of one level into `run`,
    stop it."""
    variant = servers.HTTP_VARIANTS[name]
    env = servers.environment(dsn, _free_port(), _worker_connections(args))
    server = servers.Server(variant, env, logs / f"{name}-{level}-{round_}.log")
    lua_args = [str(args.users)] if variant.lua else []
    try:
        server.wait_ready()
        meter = CpuMeter(database_pid, server.pid)
        wrk.run(wrk.command(server.url, WARMUP_CONNECTIONS, WARMUP_S, variant.lua, lua_args))
        time.sleep(PAUSE_S)
        sampler.start()
        meter.start()
        overflows = host.listen_overflows()
        try:
            result, _ = wrk.run(
                wrk.command(server.url, level, args.duration, variant.lua, lua_args)
            )
        finally:
            overflows = host.listen_overflows() - overflows
            cpu = meter.stop()
            peak = sampler.stop()
        run.cells.append(Cell.from_wrk(name, level, result, peak, cpu, overflows, round_))
        _progress(run.cells[-1])
    finally:
        server.stop()
        events = run.server_logs.setdefault(name, {})
        for key, count in server.log_events().items():
            events[key] = events.get(key, 0) + count
        if not sampler.wait_idle(timeout_s=30):
            print(f"bench: warning: {name} left server connections behind")


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
        f"bench: {cell.variant:<12} {cell.concurrency:>6,} round {cell.round}: "
        f"{cell.ok_rps:>8,.0f} ok req/s, "
        f"p50 {cell.p50_ms:8.1f} ms, p99 {cell.p99_ms:8.1f} ms, socket errors "
        f"{cell.connect_errors}/{cell.read_errors}/{cell.write_errors}/{cell.timeouts}, "
        f"non-2xx {cell.non_2xx}, conns {cell.peak_connections}, RSS {cell.rss_mb:,.0f} MB, "
        f"CPU ms/req server {cell.cpu_ms_per_request(cell.cpu.server_s):.2f} "
        f"db {cell.cpu_ms_per_request(cell.cpu.database_s):.2f}, "
        f"others {cell.cpu.other_cores:.2f} cores, listen overflows {cell.listen_overflows}",
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
