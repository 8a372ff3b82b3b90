"""`python -m bench.hostile`: the hostile-client attacks of docs/reliability.md, measured.

Each attack opens its connections to 127.0.0.1 at once, each one a greenlet that sends its
opening bytes, then (trickling) one byte every `every` seconds, and notes when the server
closed the connection; a fresh client meanwhile sends `GET /healthz` and `GET /users/1` (and,
beside stalled bodies, a `POST /users`) in turn and times each answer. Everything is bounded:
an attacker gives up after `limit_s`, the probes after the attack's own limit.

The CLI starts a throwaway PostgreSQL and the service through its production command at its
defaults (2 workers, WORKER_CONNECTIONS 1000, pool 10 per worker, the default deadlines), runs
the three attacks of issue 16 one after the other, and prints one Markdown table. tests/
test_hostile_clients.py runs the same attacks at test sizes and asserts coarse bounds.

The functions need a gevent-patched process (the tests are; the CLI patches itself).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

HOST = "127.0.0.1"


@dataclass
class Attacker:
    """One attacking connection: when it connected, and when it saw the server close it."""

    connected: float = 0.0
    closed: float | None = None
    error: str | None = None  # it could not connect, or ended otherwise than by a close

    @property
    def held_s(self) -> float | None:
        return None if self.closed is None else self.closed - self.connected


@dataclass
class Probe:
    """One request of the fresh client: how long it took, and its status (0: no answer)."""

    path: str
    seconds: float
    status: int
    error: str = ""


@dataclass
class Attack:
    attackers: list[Attacker]
    probes: list[Probe] = field(default_factory=list)

    def held(self) -> list[float]:
        return sorted(a.held_s for a in self.attackers if a.held_s is not None)

    def still_open(self) -> int:
        return sum(a.closed is None for a in self.attackers)


def hold_connection(
    port: int, opening: bytes, trickle: bytes, every: float, limit_s: float
) -> Attacker:
    """One attacking connection: send `opening`, then a byte of `trickle` every `every` s
    (nothing more when it is empty), until the server closes it or `limit_s` passes."""
    attacker = Attacker()
    try:
        sock = socket.create_connection((HOST, port), timeout=limit_s)
    except OSError as exc:
        attacker.error = f"connect: {exc}"
        return attacker
    attacker.connected = time.monotonic()
    end = attacker.connected + limit_s
    sent = 0
    try:
        if opening:
            sock.sendall(opening)
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(min(every, left) if trickle else left)
            try:
                if not sock.recv(65536):
                    attacker.closed = time.monotonic()
                    return attacker
            except TimeoutError:
                if trickle:
                    sock.send(trickle[sent % len(trickle) : sent % len(trickle) + 1])
                    sent += 1
    except OSError:  # reset, or a send after the server's close
        attacker.closed = time.monotonic()
    finally:
        sock.close()
    return attacker


def attack(
    port: int,
    n: int,
    opening: bytes = b"",
    trickle: bytes = b"",
    every: float = 2.0,
    limit_s: float = 60.0,
    probe: Callable[[], list[Probe]] | None = None,
    probe_every: float = 0.5,
) -> Attack:
    """Open `n` attacking connections at once; while they last, call `probe()` every
    `probe_every` s (its requests are timed by it). Returns when every attacker has ended."""
    workers = [
        gevent.spawn(hold_connection, port, opening, trickle, every, limit_s) for _ in range(n)
    ]
    probes: list[Probe] = []
    if probe is not None:
        # Wait until every attacker has connected (or failed), then probe while they last.
        started = time.monotonic()
        while time.monotonic() - started < limit_s and not all(w.ready() for w in workers):
            probes += probe()
            gevent.sleep(probe_every)
    gevent.joinall(workers, timeout=limit_s + 30)
    return Attack([w.value if w.ready() else Attacker(error="hung") for w in workers], probes)


def timed(port: int, method: str, path: str, body: dict | None = None) -> Probe:
    """One request on a new connection, timed from connect to the last byte (timeout 10 s)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        response = conn.getresponse()
        response.read()
        return Probe(f"{method} {path}", time.monotonic() - started, response.status)
    except OSError as exc:
        return Probe(f"{method} {path}", time.monotonic() - started, 0, str(exc))
    finally:
        conn.close()


def fresh_client(port: int, user_id: int = 1, create: bool = False) -> Callable[[], list[Probe]]:
    """The fresh client's round: GET /healthz, GET /users/<id>, and with `create` a POST."""
    counter = iter(range(1_000_000))

    def round_() -> list[Probe]:
        probes = [timed(port, "GET", "/healthz"), timed(port, "GET", f"/users/{user_id}")]
        if create:
            n = next(counter)
            user = {"name": f"fresh {n}", "email": f"fresh-{time.time_ns()}-{n}@example.com"}
            probes.append(timed(port, "POST", "/users", user))
        return probes

    return round_


TRICKLE_OPENING = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
TRICKLE = b"X-Slow: " + b"a" * 64


def stalled_body(email: str) -> bytes:
    """A POST /users whose head promises 100 body bytes, followed by a complete-looking JSON
    object of fewer: a server that took what came would store it."""
    body = json.dumps({"name": "stalled", "email": email}).encode()
    assert len(body) < 100
    return (
        b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + body
    )


def summary(name: str, result: Attack) -> str:
    held = result.held()
    by_path: dict[str, list[Probe]] = {}
    for p in result.probes:
        by_path.setdefault(p.path, []).append(p)
    answers = "; ".join(
        f"{path}: {len(ps)} sent, {sum(p.status // 100 == 2 for p in ps)} 2xx, "
        f"median {statistics.median(p.seconds for p in ps) * 1000:.0f} ms, "
        f"max {max(p.seconds for p in ps) * 1000:.0f} ms"
        for path, ps in by_path.items()
    )
    closes = (
        f"{len(held)} of {len(result.attackers)} closed; held min {held[0]:.1f} s, median "
        f"{statistics.median(held):.1f} s, max {held[-1]:.1f} s"
        if held
        else "none closed"
    )
    errors = sum(a.error is not None for a in result.attackers)
    return f"| {name} | {answers} | {closes}; {errors} could not connect |"


def main() -> None:
    from gevent import monkey

    monkey.patch_all()

    import argparse
    import os
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    from bench import database
    from bench.servers import ROOT, gunicorn_command

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2100, help="trickling or silent")
    parser.add_argument("--bodies", type=int, default=200, help="stalled bodies")
    parser.add_argument("--limit", type=float, default=70.0, help="seconds an attacker lasts")
    args = parser.parse_args()

    pg = database.start(max_connections=100)
    log_path = Path(tempfile.mkdtemp(prefix="hostile-")) / "gunicorn.log"
    proc = None
    try:
        dsn = database.seed(pg, 1000)
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("HTTP_", "DB_", "WORKER_", "WEB_"))
        }
        env |= {"DATABASE_URL": dsn, "PORT": str(port), "WEB_CONCURRENCY": "2"}
        env["GUNICORN_CMD_ARGS"] = f"--bind={HOST}:{port}"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                gunicorn_command(ROOT / "gunicorn.conf.py"),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while timed(port, "GET", "/users/1").status != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start:\n{log_path.read_text()[-3000:]}")
            gevent.sleep(0.2)
        print(
            f"2 workers, WORKER_CONNECTIONS 1000, pool 10 per worker, default deadlines; "
            f"{os.cpu_count()} CPUs shared by the attackers, the service and PostgreSQL\n"
        )
        print("| attack | the fresh client's answers | the attacking connections |")
        print("|---|---|---|")
        n = args.connections
        limit = args.limit
        result = attack(port, n, TRICKLE_OPENING, TRICKLE, 2.0, limit, fresh_client(port))
        print(summary(f"{n} trickling heads, a byte every 2 s", result), flush=True)
        result = attack(port, n, limit_s=limit, probe=fresh_client(port))
        print(summary(f"{n} silent connections", result), flush=True)
        bodies = [
            gevent.spawn(
                hold_connection, port, stalled_body(f"stalled-{i}@example.com"), b"", 2.0, limit
            )
            for i in range(args.bodies)
        ]
        probes: list[Probe] = []
        round_ = fresh_client(port, create=True)
        while not all(b.ready() for b in bodies):
            probes += round_()
            gevent.sleep(0.5)
        result = Attack([b.value for b in bodies], probes)
        print(summary(f"{args.bodies} stalled bodies", result), flush=True)
        import psycopg2

        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM users WHERE email LIKE 'stalled-%%'")
            print(f"\nstalled bodies stored: {cur.fetchone()[0]}")
        conn.close()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(40)
        pg.stop()
    closes = [line for line in log_path.read_text().splitlines() if "closed by the server" in line]
    print(f"{len(closes)} log lines about closed connections, e.g.: {closes[:1]}")


if __name__ == "__main__":
    main()
