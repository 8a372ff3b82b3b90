"""Where a loaded worker's CPU goes: py-spy on one worker of each stack, route by route.

    python -m bench.profile [--stacks service,asyncio] [--workloads mix,get] [--out DIR]

Each stack starts as `make bench` starts it (bench/servers.py: 2 workers, a pool of 10 per
worker), on a throwaway PostgreSQL seeded with 10,000 users. Per workload: a warm-up, then wrk
at `--connections` for `--duration` seconds, and, 2 s in, `py-spy record` of one worker for
`--duration` - 5 s at 200 Hz. The samples go to DIR/<stack>-<workload>.raw; the printed
Markdown gives, side by side, the share of the worker's samples in each part of the stack
(`part()`), the server's CPU per request (bench/cpu.py) and, for the service, its batch sizes
from /metrics. Throughput is not printed: py-spy pauses the worker it samples 200 times a
second, so only shares are results (docs/performance.md, issue 28).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import database, servers, wrk
from bench.cpu import CpuMeter
from bench.workloads import DEFAULT, WORKLOADS

USERS = 10_000
WARMUP_S = 3
SAMPLE_DELAY_S = 2
# Stacks with threads that wait outside the GIL (uvicorn's supervisor pipe, gthread's idle
# threads, psycopg_pool's workers), which py-spy would count: only samples holding the GIL.
GIL_ONLY = frozenset({"asyncio", "peer-gthread"})

# The parts of a stack, by the files of their frames; the first that matches wins, in order.
PARTS = (
    ("logging (access line, request id)", ("logging/", "gunicorn/glogging.py")),
    ("logging (access line, request id)", ("service/observability/logs.py", "uvicorn/logging")),
    ("metrics (prometheus_client)", ("prometheus_client/", "service/observability/metrics")),
    ("JSON", ("json/", "flask/json/", "service/api/json_provider.py")),
    ("pool checkout / get_db", ("service/db/pool.py", "service/db/__init__.py")),
    ("pool checkout / get_db", ("service/db/replicas.py", "psycopg_pool/", "asyncpg/pool.py")),
    ("driver", ("psycopg2/", "psycopg/", "asyncpg/", "psycogreen/")),
    ("batch loader", ("service/db/batch.py", "service/db/semaphore.py")),
    ("routing", ("werkzeug/routing/", "starlette/routing.py")),
    ("Flask, werkzeug or Starlette request + response", ("flask/", "werkzeug/", "blinker/")),
    ("Flask, werkzeug or Starlette request + response", ("starlette/",)),
    ("WSGI environ + response (gunicorn)", ("gunicorn/http/wsgi.py",)),
    ("HTTP parsing", ("gunicorn/http/", "gunicorn/config.py", "uvicorn/", "httptools/")),
    ("server loop (worker, keep-alive)", ("gunicorn/", "service/server/", "gevent/baseserver")),
    ("app code (views, hooks, validation)", ("service/", "config/", "bench/variants/")),
)
# Frames that count in whichever part called them: gevent's, asyncio's, the standard
# library's but for logging and json (its modules have no folder, its packages these).
PASSED_THROUGH = ("gevent/", "asyncio/", "uvloop/", "<frozen", "re/", "collections/")
PASSED_THROUGH += ("concurrent/", "urllib/", "encodings/", "http/", "email/", "multiprocessing/")
# Where a sample's first frame of a part calls into C, the C work it names.
SOCKET_CALLS = {
    ("ClientSocket._send", "service/server/connections.py"),
    ("ClientSocket._read", "service/server/connections.py"),
    ("write", "gunicorn/util.py"),
    ("SocketUnreader.chunk", "gunicorn/http/unreader.py"),
}
DRIVER_CALL = re.compile(r"\.(execute|fetchall|fetchone|fetchrow|fetch)\(")
EVENT_LOOP = "event loop / gevent hub"
ROWS = (  # the parts in the order of a request's way through a stack
    "HTTP parsing",
    "WSGI environ + response (gunicorn)",
    "socket send/recv",
    "server loop (worker, keep-alive)",
    "Flask, werkzeug or Starlette request + response",
    "routing",
    "app code (views, hooks, validation)",
    "batch loader",
    "pool checkout / get_db",
    "driver",
    "JSON",
    "logging (access line, request id)",
    "metrics (prometheus_client)",
    EVENT_LOOP,
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")
_COUNTERS = {
    "reads by id per query": ("db_lookups_total", "db_lookup_queries_total"),
    "pages per query": ("db_pages_total", "db_page_queries_total"),
    "creates per statement": (
        'db_batched_writes_total{kind="create"}',
        'db_batch_statements_total{kind="create"}',
    ),
    "updates per statement": (
        'db_batched_writes_total{kind="update"}',
        'db_batch_statements_total{kind="update"}',
    ),
}


def part(stack: str, source_line: Callable[[str, int], str]) -> str:
    """The part of the stack a sample (py-spy's raw format: frames root first, `;` between)
    counts in: that of its innermost frame in a known part. Frames of the standard library,
    gevent and asyncio count in the part that called them; where that frame calls C (a socket
    send, a statement, a write to uvloop's transport), the sample counts as that C work.
    `source_line(path, line)` reads a frame's line of code, "" when it cannot."""
    first = True
    for frame in reversed(stack.split(";")):
        found = _FRAME.match(frame)
        if found is None:
            continue
        func, path, line = found["func"], found["path"], int(found["line"])
        if path.startswith(PASSED_THROUGH) or "/" not in path:
            continue
        if first:
            first = False
            if (func, path) in SOCKET_CALLS:
                return "socket send/recv"
            if path.startswith("uvicorn/") and func == "asyncio_run":
                return EVENT_LOOP
            code = source_line(path, line)
            if path.startswith("uvicorn/") and "transport.write" in code:
                return "socket send/recv"
            if path.startswith(("service/", "bench/")):
                if "orjson" in code:
                    return "JSON"
                if DRIVER_CALL.search(code):
                    return "driver"
        for name, prefixes in PARTS:
            if path.startswith(prefixes):
                return name
    return EVENT_LOOP


def shares(raw: str, source_line: Callable[[str, int], str]) -> tuple[dict[str, float], int]:
    """Each part's share of the samples of a py-spy raw profile, and how many samples."""
    counts: Counter[str] = Counter()
    for row in raw.splitlines():
        stack, _, count = row.rpartition(" ")
        if stack:
            counts[part(stack, source_line)] += int(count)
    total = sum(counts.values())
    return {name: n / total for name, n in counts.items()} if total else {}, total


def source_reader(roots: list[Path]) -> Callable[[str, int], str]:
    """`source_line` for `part()`: a frame's path is relative to the first of `roots` (the
    checkout, then each entry of sys.path) that holds the file."""
    cache: dict[str, list[str]] = {}

    def source_line(path: str, line: int) -> str:
        if path not in cache:
            found = next((root / path for root in roots if (root / path).is_file()), None)
            cache[path] = found.read_text(errors="replace").splitlines() if found else []
        lines = cache[path]
        return lines[line - 1] if 0 < line <= len(lines) else ""

    return source_line


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Requests per statement between two readings of the service's /metrics counters."""
    sizes = {}
    for name, (requests, statements) in _COUNTERS.items():
        sent = after.get(statements, 0.0) - before.get(statements, 0.0)
        if sent:
            sizes[name] = (after.get(requests, 0.0) - before.get(requests, 0.0)) / sent
    return sizes


def parse_counters(text: str) -> dict[str, float]:
    """The batch counters of a /metrics page, by name and labels as printed."""
    wanted = {name for pair in _COUNTERS.values() for name in pair}
    found = {}
    for row in text.splitlines():
        name, _, value = row.rpartition(" ")
        if name in wanted:
            found[name] = float(value)
    return found


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    servers.stop_everything_on_sigterm()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args.out.mkdir(parents=True, exist_ok=True)
    source_line = source_reader([servers.ROOT, *(Path(p) for p in sys.path if p)])
    results: dict[tuple[str, str], tuple[dict[str, float], int, float, dict]] = {}
    pg = database.start(100)
    try:
        dsn = database.seed(pg, USERS)
        for stack in args.stacks:
            for workload, result in _profile(stack, dsn, pg.pid, spy, args):
                raw = (args.out / f"{stack}-{workload}.raw").read_text()
                results[stack, workload] = (*shares(raw, source_line), *result)
    finally:
        pg.stop()
    print(_markdown(results, args))


def _profile(stack: str, dsn: str, database_pid: int, spy: str, args: argparse.Namespace):
    """Load `stack` with each workload in turn, sampling one worker; yield each workload's
    server CPU per request and batch sizes once its samples are written."""
    variant = servers.HTTP_VARIANTS[stack]
    env = servers.environment(dsn, servers.free_port(), max(args.connections, 1000))
    server = servers.Server(variant, env, args.out / f"{stack}.log")
    try:
        server.wait_ready()
        worker = _a_worker(server.pid)
        for name in args.workloads:
            load = WORKLOADS[name]
            url = server.url + load.path
            warmup = wrk.command(url, args.connections, WARMUP_S, load.script, load.lua_args(USERS))
            wrk.run(warmup)
            before = _counters(server.url)
            meter = CpuMeter(database_pid, server.pid)
            meter.start()
            cmd = wrk.command(
                url, args.connections, args.duration, load.script, load.lua_args(USERS)
            )
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as loaded:
                time.sleep(SAMPLE_DELAY_S)
                record = [spy, "record", "-p", str(worker), "-r", "200", "--format", "raw"]
                record += [
                    "-d",
                    str(args.duration - 5),
                    "-o",
                    str(args.out / f"{stack}-{name}.raw"),
                ]
                if stack in GIL_ONLY:
                    record.append("--gil")
                subprocess.run(record, check=True, capture_output=True)
                report, _ = loaded.communicate()
            used = meter.stop()
            requests = wrk.parse(report).requests
            yield (
                name,
                (used.server_s / requests * 1000, batch_sizes(before, _counters(server.url))),
            )
    finally:
        server.stop()


def _a_worker(master: int) -> int:
    """One worker of the server whose master is `master` (not a helper such as
    multiprocessing's resource tracker)."""
    deadline = time.monotonic() + servers.READY_DEADLINE_S
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        for pid in children:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"resource_tracker" not in command:
                return int(pid)
        time.sleep(0.1)
    raise RuntimeError(f"no worker of process {master} in time")


def _counters(url: str) -> dict[str, float]:
    """The service's batch counters; nothing from a stack without /metrics."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
            return parse_counters(answer.read().decode())
    except OSError:
        return {}


def _markdown(results: dict, args: argparse.Namespace) -> str:
    out = []
    for workload in args.workloads:
        stacks = [s for s in args.stacks if (s, workload) in results]
        out += [f"\n**{workload}**, share of one worker's samples\n"]
        out += ["| part | " + " | ".join(stacks) + " |", "|---|" + "---:|" * len(stacks)]
        for name in ROWS:
            cells = [results[s, workload][0].get(name, 0.0) for s in stacks]
            if any(cells):
                shown = (f"{100 * c:.1f}%" if c else "-" for c in cells)
                out.append(f"| {name} | " + " | ".join(shown) + " |")
        out.append("| samples | " + " | ".join(str(results[s, workload][1]) for s in stacks) + " |")
        cpu = " | ".join(f"{results[s, workload][2]:.2f}" for s in stacks)
        out.append(f"| server CPU ms per request | {cpu} |")
        for s in stacks:
            sizes = results[s, workload][3]
            if sizes:
                shown = ", ".join(f"{size:.1f} {name}" for name, size in sizes.items())
                out.append(f"\n{s}: {shown}")
    return "\n".join(out)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--stacks", default=",".join(servers.STACKS))
    parser.add_argument("--workloads", default=",".join(DEFAULT))
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=int, default=20, help="seconds of wrk (>= 10)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="profile-")))
    args = parser.parse_args(argv)
    args.stacks = args.stacks.split(",")
    args.workloads = args.workloads.split(",")
    if args.duration < 10:
        parser.error(
            "--duration must be at least 10 s: the samples start 2 s in and stop 3 s early"
        )
    return args


if __name__ == "__main__":
    main()
