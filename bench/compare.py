"""`python -m bench.compare --a DIR --b DIR`: two checkouts of the service, side by side.

Both checkouts run their production command (`gunicorn -c gunicorn.conf.py`, from their own
folder) at once, on loopback, against one throwaway PostgreSQL with a database each, so that
one's writes never grow the other's table. Each database is migrated by its gunicorn's master
and seeded with the same users. wrk then sends a workload of bench/workloads.py: by default the
mix of `bench/mix.lua` (reads, a list, creates, renames), or one route alone (`--workload`).

At each concurrency level, rounds alternate the order (A then B, B then A, ...), so that a
slow spell of the machine or a growing table does not always fall on the same checkout; the
verdict is the median of the per-round ratios. Every round starts both servers afresh: one
gunicorn instance can run several percent faster or slower than another of the same code for
its whole life (docs/performance.md), and with one pair of instances for the whole comparison
that luck would be in every round. Each measured run follows a discarded 2 s warm-up at the
same level, and starts only once neither server holds a client connection of the previous
run, so no run pays for another's hang-ups. Non-2xx answers and socket errors, warm-ups
included, are always listed.

Besides req/s and p99, each measured run reports its server's CPU per answered request (the
gunicorn master and its workers, from /proc, bench/cpu.py): a second view of the same change,
on a machine whose cores wrk and PostgreSQL share.

Everything started is stopped on exit, on Ctrl-C, on SIGTERM and on error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from bench import database, wrk
from bench import servers as bench_servers
from bench.cpu import CpuMeter
from bench.workloads import WORKLOADS
from deploy.localpg import LocalPostgres

WARMUP_S = 2
DRAIN_DEADLINE_S = 30.0
POLL_S = 0.05
MIN_WORKER_CONNECTIONS = 6000
MIN_MAX_CONNECTIONS = 200
LABELS = ("A", "B")
_STATUS = re.compile(r'"status": ?(\d{3})')
_METHOD_ROUTE = re.compile(r'"method": ?"([A-Z]+)".*?"route": ?("[^"]*"|null)')


class Server(bench_servers.Server):
    """One checkout's gunicorn on 127.0.0.1 (bench/servers.py), with its database; each start
    writes a log of its own in `logs` (A-1.log, A-2.log, ...)."""

    def __init__(self, label: str, root: Path, dsn: str, env: dict[str, str], logs: Path):
        self.label = label
        self.dsn = dsn
        self.logs = logs
        self.log_paths = [logs / f"{label}-1.log"]
        variant = bench_servers.HttpVariant(label, str(root), root / "gunicorn.conf.py", "")
        super().__init__(variant, env, self.log_paths[0], root)

    def restart(self) -> None:
        """Stop this gunicorn and start a new one on the same port, with a log of its own: a
        fresh master and workers, ready once `/readyz` answers."""
        self.stop()
        self.log_path = self.logs / f"{self.label}-{len(self.log_paths) + 1}.log"
        self.log_paths.append(self.log_path)
        self.start()
        self.wait_ready(("/healthz", "/readyz"))


@dataclass
class Round:
    """One round of one level: each checkout's measured run, and its discarded warm-up."""

    number: int
    order: tuple[str, ...]
    results: dict[str, wrk.WrkResult] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # server CPU per ok request
    warmups: dict[str, wrk.WrkResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; 0 when every run completed, 1 on a failure, 2 on bad usage."""
    args = _parse(argv)
    try:
        wrk.find_wrk()
        for root in (args.a, args.b):
            if not (root / "gunicorn.conf.py").exists():
                raise RuntimeError(f"{root} has no gunicorn.conf.py: not a checkout")
    except RuntimeError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    _raise_open_files(max(args.levels))
    bench_servers.stop_everything_on_sigterm()  # the servers and PostgreSQL are stopped
    logs = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    print(f"bench.compare: servers' logs in {logs}", flush=True)
    try:
        sections = _run(args, logs)
    except (RuntimeError, subprocess.TimeoutExpired, psycopg2.Error) as exc:
        print(f"bench.compare: failed: {exc}", file=sys.stderr)
        return 1
    text = "\n\n".join([_header(args, logs), *sections]) + "\n"
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"bench.compare: wrote {args.out}")
    return 0


def _run(args: argparse.Namespace, logs: Path) -> list[str]:
    """Start PostgreSQL and both servers, measure every level, stop everything; return the
    report's sections: one per level, then what the servers' logs tell."""
    budget = 2 * args.workers * args.pool_max
    pg = LocalPostgres(settings={"max_connections": str(max(MIN_MAX_CONNECTIONS, budget + 20))})
    servers: list[Server] = []
    sink = _Sink(logs) if args.b_traced else None
    try:
        pg.start()
        for label, root in zip(LABELS, (args.a, args.b), strict=True):
            extra = sink.environment() if sink is not None and label == "B" else {}
            server = _new_server(label, root, pg, args, logs, extra)
            servers.append(server)  # started: whatever happens next, it is stopped
            server.wait_ready(("/healthz", "/readyz"))
            database.seed_users(server.dsn, args.users)
            print(f"bench.compare: {label} ready on {server.url} ({root})", flush=True)
        sections = [
            _table(level, _measure_level(servers, pg.pid, level, args)) for level in args.levels
        ]
    finally:
        for server in servers:
            server.stop()
        pg.stop()
        counts = sink.stop() if sink is not None else None
    tracing = [_sink_section(counts, servers[1])] if counts is not None else []
    return [*sections, *tracing, _log_section(servers)]


class _Sink:
    """bench/otlp_sink.py in a process of its own, for `--b-traced`; `stop()` returns its
    counts."""

    def __init__(self, logs: Path) -> None:
        self.port = bench_servers.free_port()
        self.counts = logs / "otlp-sink.json"
        command = ["-m", "bench.otlp_sink", "--port", str(self.port), "--counts", str(self.counts)]
        self._proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=bench_servers.ROOT,
        )
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError("the OTLP sink did not start listening in 10 s")
            time.sleep(POLL_S)

    def environment(self) -> dict[str, str]:
        """What makes a server export a span of each request and statement to the sink."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_TRACES_SAMPLER": "always_on",
            "OTEL_SERVICE_NAME": "bench-b",
        }

    def stop(self) -> dict | None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        try:
            return json.loads(self.counts.read_text())
        except (OSError, ValueError):
            return None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _sink_section(counts: dict, traced: Server) -> str:
    """What B exported, against the requests its logs show it answered (warm-ups included)."""
    answered = 0
    for path in traced.log_paths:
        with open(path, errors="replace") as log:
            answered += sum(1 for line in log if _STATUS.search(line))
    per_request = counts["spans"] / answered if answered else float("nan")
    return "\n".join(
        [
            "### Tracing on B",
            "",
            f"- B exported every span (OTEL_TRACES_SAMPLER=always_on) over OTLP/HTTP to "
            "bench/otlp_sink.py, a process of its own on the same cores that decodes and counts "
            f"each export: {counts['exports']:,} exports, {counts['spans']:,} spans, "
            f"{counts['bytes']:,} bytes, for {answered:,} requests B answered "
            f"({per_request:.2f} spans per request)",
        ]
    )


def _new_server(
    label: str,
    root: Path,
    pg: LocalPostgres,
    args: argparse.Namespace,
    logs: Path,
    extra: dict[str, str],
) -> Server:
    """A server for `root` with a database of its own and a free port on loopback, with `extra`
    in its environment."""
    dsn = pg.create_database(f"bench_{label.lower()}")
    port = bench_servers.free_port()
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        DATABASE_URL=dsn,
        WEB_CONCURRENCY=str(args.workers),
        DB_POOL_MAX=str(args.pool_max),
        WORKER_CONNECTIONS=str(max(MIN_WORKER_CONNECTIONS, max(args.levels))),
        PORT=str(port),
        GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}",
        **extra,
    )
    return Server(label, root, dsn, env, logs)


def _measure_level(
    servers: list[Server], database_pid: int, level: int, args: argparse.Namespace
) -> list[Round]:
    """Every round of one level, the order of the checkouts alternating round by round, each
    round on servers started afresh."""
    rounds = []
    for number in range(1, args.rounds + 1):
        ordered = servers if number % 2 else servers[::-1]
        round_ = Round(number, tuple(server.label for server in ordered))
        for server in ordered:
            server.restart()
        for server in ordered:
            _measure(server, servers, database_pid, level, args, round_)
        rounds.append(round_)
    return rounds


def _measure(
    server: Server,
    servers: list[Server],
    database_pid: int,
    level: int,
    args: argparse.Namespace,
    round_: Round,
) -> None:
    """A discarded warm-up, then the measured run, each after both servers are drained."""
    workload = WORKLOADS[args.workload]

    def run(duration: int) -> wrk.WrkResult:
        lua_args = workload.lua_args(args.users)  # a new tag per wrk run: emails never repeat
        result, _ = wrk.run(wrk.command(server.url, level, duration, workload.script, lua_args))
        return result

    round_.notes += _drain(servers)
    round_.warmups[server.label] = run(WARMUP_S)
    round_.notes += _drain(servers)
    meter = CpuMeter(database_pid, server.pid)
    meter.start()
    result = round_.results[server.label] = run(args.duration)
    used = meter.stop()
    ok = result.requests - result.non_2xx
    round_.cpu_ms[server.label] = 1000 * used.server_s / ok if ok else float("nan")
    print(
        f"bench.compare: {level:>6,} round {round_.number} {server.label}: "
        f"{result.rps:>9,.0f} req/s, p99 {result.p99_ms:8.1f} ms, "
        f"server CPU {round_.cpu_ms[server.label]:.3f} ms/req, "
        f"non-2xx {result.non_2xx}, socket errors {result.socket_errors}",
        flush=True,
    )


def _drain(servers: list[Server]) -> list[str]:
    """Wait until no server holds a client connection; return a note for each one that still
    does after DRAIN_DEADLINE_S (the run then goes ahead, and the note is reported)."""
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while time.monotonic() < deadline:
        if not any(server.held_connections() for server in servers):
            return []
        time.sleep(POLL_S)
    return [
        f"{server.label} still held {held} client connections after {DRAIN_DEADLINE_S:g} s"
        for server in servers
        if (held := server.held_connections())
    ]


def _table(level: int, rounds: list[Round]) -> str:
    """One level's Markdown: each round, the medians, then every error and note."""
    lines = [
        f"### {level:,} connections",
        "",
        "| round | order | A req/s | A p99 ms | B req/s | B p99 ms | B/A req/s | B/A p99 "
        "| A CPU ms/req | B CPU ms/req | B/A CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rounds:
        a, b = r.results["A"], r.results["B"]
        ca, cb = r.cpu_ms["A"], r.cpu_ms["B"]
        cells = [a.rps, a.p99_ms, b.rps, b.p99_ms, _ratio(b.rps, a.rps), _ratio(b.p99_ms, a.p99_ms)]
        cells += [ca, cb, _ratio(cb, ca)]
        lines.append(f"| {r.number} | {', '.join(r.order)} | " + _cells(cells) + " |")
    lines.append("| **median** | | " + _cells(_medians(rounds)) + " |")
    return "\n".join([*lines, "", *_errors(rounds)])


def _medians(rounds: list[Round]) -> list[float]:
    """Median req/s and p99 of each checkout, then the medians of the per-round ratios; then
    the same for server CPU per request."""

    def median(values: list[float]) -> float:
        known = [v for v in values if v == v]  # NaN: a run with no answer has no latency
        return statistics.median(known) if known else float("nan")

    a = [r.results["A"] for r in rounds]
    b = [r.results["B"] for r in rounds]
    return [
        median([x.rps for x in a]),
        median([x.p99_ms for x in a]),
        median([x.rps for x in b]),
        median([x.p99_ms for x in b]),
        median([_ratio(y.rps, x.rps) for x, y in zip(a, b, strict=True)]),
        median([_ratio(y.p99_ms, x.p99_ms) for x, y in zip(a, b, strict=True)]),
        median([r.cpu_ms["A"] for r in rounds]),
        median([r.cpu_ms["B"] for r in rounds]),
        median([_ratio(r.cpu_ms["B"], r.cpu_ms["A"]) for r in rounds]),
    ]


def _cells(values: list[float]) -> str:
    """req/s, p99 (A), req/s, p99 (B), two ratios, CPU ms/req (A, B) and its ratio."""
    formats = ["{:,.0f}", "{:.1f}", "{:,.0f}", "{:.1f}"] + ["{:.3f}"] * 5
    return " | ".join(
        "n/a" if v != v else f.format(v) for f, v in zip(formats, values, strict=True)
    )


def _ratio(b: float, a: float) -> float:
    return b / a if a else float("nan")


def _errors(rounds: list[Round]) -> list[str]:
    """A line per run (warm-ups included) with non-2xx answers or socket errors, and every
    drain note; a single line saying so when there were none."""
    lines = []
    for r in rounds:
        for kind, results in (("warm-up", r.warmups), ("measured", r.results)):
            for label, x in sorted(results.items()):
                if x.non_2xx or x.socket_errors:
                    lines.append(
                        f"- round {r.number} {label} ({kind}): {x.non_2xx} non-2xx of "
                        f"{x.requests}; socket errors connect {x.connect_errors}, read "
                        f"{x.read_errors}, write {x.write_errors}, timeout {x.timeouts}"
                    )
        lines += [f"- round {r.number}: {note}" for note in r.notes]
    return lines or ["No non-2xx answers and no socket errors, warm-ups included."]


def _log_section(servers: list[Server]) -> str:
    """What each server's log tells: answers of 400 and up by route, and signs of trouble."""
    lines = ["### Server logs", ""]
    for server in servers:
        statuses: Counter = Counter()
        events: Counter = Counter()
        for path in server.log_paths:
            found_in = _scan_log(path)
            statuses += found_in[0]
            events.update(found_in[1])
        found = [f"{n} x {key}" for key, n in sorted(statuses.items())]
        found += [f"{n} {name}" for name, n in events.items() if n and name != "workers booted"]
        summary = "; ".join(found) or "no answer of 400 or more, no traceback"
        lines.append(
            f"- {server.label} ({server.logs}/{server.label}-*.log): {summary}; "
            f"{events['workers booted']} workers booted in {len(server.log_paths)} starts"
        )
    return "\n".join(lines)


def _scan_log(path: Path) -> tuple[Counter, Counter]:
    """Access lines of status 400 and up counted by status, method and route; LOG_EVENTS
    counted by name. Reads line by line: the log holds one line per request."""
    statuses: Counter = Counter()
    events: Counter = Counter(dict.fromkeys(bench_servers.LOG_EVENTS, 0))
    with open(path, errors="replace") as log:
        for line in log:
            status = _STATUS.search(line)
            if status and int(status[1]) >= 400:
                where = _METHOD_ROUTE.search(line)
                route = f"{where[1]} {where[2].strip(chr(34))}" if where else "?"
                statuses[f"{status[1]} {route}"] += 1
            for name, marker in bench_servers.LOG_EVENTS.items():
                if marker in line:
                    events[name] += 1
    return statuses, events


def _header(args: argparse.Namespace, logs: Path) -> str:
    """The command, the date, the machine and what exactly was compared."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench.compare " + shlex.join(args.argv)
    return "\n".join(
        [
            f"## A/B comparison: {WORKLOADS[args.workload].description}",
            "",
            f"- command: `{command}`",
            f"- date: {now}; nproc: {len(os.sched_getaffinity(0))}",
            f"- A: {_revision(args.a)}",
            f"- B: {_revision(args.b)}",
            f"- each: WEB_CONCURRENCY={args.workers}, DB_POOL_MAX={args.pool_max}, "
            f"{args.users:,} users seeded in a database of its own; wrk -t2 for "
            f"{args.duration} s after a {WARMUP_S} s warm-up; rounds: {args.rounds}, order "
            "alternating; ratios are B/A",
            f"- servers' logs: {logs}",
            *(["- B traced: every span exported to bench/otlp_sink.py"] if args.b_traced else []),
        ]
    )


def _revision(root: Path) -> str:
    """`root` at its short commit, and whether `git status --porcelain` lists anything."""
    commit = _git(root, "rev-parse", "--short", "HEAD").strip() or "unknown commit"
    status = _git(root, "status", "--porcelain").splitlines()
    if not status:
        return f"{root} at {commit}, no uncommitted changes"
    untracked = sum(line.startswith("??") for line in status)
    return (
        f"{root} at {commit}, uncommitted changes: {len(status) - untracked} changed, "
        f"{untracked} untracked paths"
    )


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _raise_open_files(level: int) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, inherited by wrk and both gunicorns."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < level + 1024:
        print(f"bench.compare: warning: open files limited to {target}", file=sys.stderr)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--a", type=_checkout, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=_checkout, required=True, help="checkout B")
    parser.add_argument("--levels", type=_levels, default=[50, 500], help="e.g. 50,500")
    parser.add_argument("--duration", type=_positive, default=10, help="seconds per run")
    parser.add_argument("--rounds", type=_positive, default=5)
    parser.add_argument("--workers", type=_positive, default=2, help="WEB_CONCURRENCY")
    parser.add_argument("--pool-max", type=_positive, default=10, help="DB_POOL_MAX")
    parser.add_argument("--users", type=_positive, default=10_000, help="users seeded")
    parser.add_argument(
        "--workload",
        choices=[name for name, w in WORKLOADS.items() if w.script],
        default="mix",
        help="what wrk sends (bench/workloads.py)",
    )
    parser.add_argument(
        "--b-traced",
        action="store_true",
        help="B exports a span of every request and statement (OTEL_TRACES_SAMPLER=always_on) "
        "to an OTLP/HTTP sink this run starts (bench/otlp_sink.py)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def _checkout(text: str) -> Path:
    path = Path(text).resolve()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of 1 or more")
    return value


def _levels(text: str) -> list[int]:
    levels = [_positive(part) for part in text.split(",") if part.strip()]
    if not levels:
        raise argparse.ArgumentTypeError("give at least one level, e.g. 50,500")
    return levels


if __name__ == "__main__":
    sys.exit(main())
