"""`python -m bench.replicas`: reads on streaming replicas, measured against issue 26's targets.

Starts a throwaway primary that commits synchronously (as `deploy.localpg --replicas` does)
with two streaming replicas, seeds users, and runs two instances of the service through its
production command, two workers each, with DATABASE_REPLICA_URLS naming both replicas. Then
the scenarios chosen with `--scenarios` (all by default), in this order:

- `stale`: token-carrying clients write on one instance (a create or a rename) and read the
  user at once on the other, presenting the write's token, under an apply delay set on both
  replicas; every read must show the write. A sample of reads without the token shows what
  the delay does to a client that does not carry it.
- `mix`: bench/mix.lua's mix (70% reads by id, 10% pages, 10% creates, 10% renames) sent by
  token-carrying clients to both instances, no delay: where the reads ran, and where the reads
  sent right after the client's own write ran.
- `kill`: the same mix while one replica is killed (`halt("immediate")`) and launched again:
  failed requests, how soon every worker took it out of rotation and back, and the
  connections the workers open to it when it returns.
- `spike`: the same mix through an apply delay of REPLICA_LAG_SPIKE_S on both replicas: stale
  reads, and the primary's share of the reads beside the bound docs/scaling.md states.
- `routing`: what routing costs, wrk's mix (no tokens) on one instance with one replica
  configured against one with none, same commit, servers afresh every run, rounds alternating.
- `commits`: the mix with no replica before and after the commit that brought replicas,
  `python -m bench.compare --a A --b B` run as it is, on two checkouts given with --a and --b.

In the mix, a rename renames one of the client's own users and the read after a write reads
that user, so that every read of a client's own write can be checked (mix.lua renames random
users). Reads are attributed to a server by the service's access lines and tokens
(bench/clients.py). Every load loop is bounded in requests and in time; traffic goes to
127.0.0.1 only. The report (`--out`, bench/REPLICAS.md by default; `--quick` prints it unless
`--out` is given) holds every figure with its target; everything started is stopped on exit,
on Ctrl-C, on SIGTERM and on error.
"""

from __future__ import annotations

# Patch first: the clients are greenlets, so sockets (http.client), subprocesses (wrk,
# PostgreSQL), sleeps and psycopg2's waits (psycogreen) must yield to each other, from the
# first socket this process opens.
from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import argparse  # noqa: E402
import bisect  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import quote  # noqa: E402

import gevent  # noqa: E402
import psycopg2  # noqa: E402
from gevent.event import Event  # noqa: E402

from bench import clients, compare, cpu, database, host, servers, wrk  # noqa: E402
from bench.clients import PRIMARY, REPLICA, Client, Sent  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from config.settings import Settings  # noqa: E402
from deploy.localpg import LocalPostgres, LocalReplica  # noqa: E402
from service.db.lsn import format_lsn  # noqa: E402

HERE = Path(__file__).resolve().parent
SCENARIOS = ("stale", "mix", "kill", "spike", "routing", "commits")
INSTANCES = 2
WORKER_CONNECTIONS = 1000
READY_DEADLINE_S = 60.0
STOP_DEADLINE_S = 60.0  # for the clients to finish what they sent once told to stop
BARE_SHARE = 0.1  # stale: the cycles, drawn at random, that also read without the token
AFTER_WRITE_S = 0.010  # mix: a read sent this soon after its client's write was answered
REPLICA_LAG_SPIKE_S = 5.0
READYZ_EVERY_S = 0.02  # kill: each instance's /readyz, on a connection of its own each time
BACKENDS_EVERY_S = 0.1  # kill: the killed replica's backends, from pg_stat_activity
REPLAY_EVERY_S = 0.02  # spike: each replica's replay position
# spike: how old a worker's word of a replica's replay may be when it routes a read: a poll
# interval (REPLICA_POLL_INTERVAL_S's default, with its 10% jitter) and the poll's round trip.
WORD_AGE_S = 1.1 * Settings.model_fields["replica_poll_interval_s"].default + 0.005
MAX_REQUESTS_PER_CLIENT = 1_000_000  # a bound besides time; no run comes near it
_BACKENDS = (
    "SELECT pid, application_name FROM pg_stat_activity"
    " WHERE datname = %s AND backend_type = 'client backend'"
)

# The issue's targets.
STALE_READS = 0
READS_ON_REPLICAS = 0.90
AFTER_WRITE_ON_REPLICAS = 0.80
FAILED_REQUESTS = 0
OUT_OF_ROTATION_S = 1.0
BACK_IN_ROTATION_S = 5.0


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run: the full run, or `--quick`'s smoke run."""

    users: int = 10_000
    stale_delays_s: tuple[float, ...] = (0.0, 0.05, 0.5, 2.0)
    stale_cycles: int = 10_000
    stale_clients: int = 20
    stale_deadline_s: float = 150.0
    mix_clients: int = 50
    mix_s: float = 20.0
    kill_before_s: float = 5.0
    kill_down_s: float = 3.0
    kill_after_s: float = 10.0
    spike_before_s: float = 5.0
    spike_hold_s: float = 10.0
    spike_after_s: float = 8.0
    routing_levels: tuple[int, ...] = (50, 500)
    routing_rounds: int = 5
    routing_s: int = 10
    commits_levels: str = "50,500"
    commits_rounds: int = 5
    commits_s: int = 10


FULL = Plan()
QUICK = Plan(
    users=1000,
    stale_cycles=300,
    stale_clients=10,
    stale_deadline_s=30.0,
    mix_clients=10,
    mix_s=4.0,
    kill_before_s=2.0,
    kill_down_s=2.0,
    kill_after_s=5.0,
    spike_before_s=2.0,
    spike_hold_s=6.0,
    spike_after_s=3.0,
    routing_levels=(50,),
    routing_rounds=1,
    routing_s=3,
    commits_levels="50",
    commits_rounds=1,
    commits_s=3,
)


@dataclass
class Section:
    """One scenario's part of the report: its targets and measured values, then its text."""

    title: str
    checks: list[tuple[str, str, str, bool | None]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def check(self, what: str, target: str, measured: str, met: bool | None) -> None:
        self.checks.append((what, target, measured, met))


class Cluster:
    """The throwaway primary (synchronous_commit=on), its two streaming replicas, and the
    bench database seeded with `users` users that both have replayed. `stop()` removes all."""

    def __init__(self, users: int):
        self.users = users
        self.primary = LocalPostgres(settings={"synchronous_commit": "on"})
        self.replicas: list[LocalReplica] = []
        self.dsn = ""

    def start(self) -> Cluster:
        self.primary.start()
        for _ in range(2):
            self.replicas.append(self.primary.start_replica())
        self.dsn = database.seed(self.primary, self.users)
        self.catch_up()
        return self

    def version(self) -> str:
        conn = psycopg2.connect(self.dsn, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return f"PostgreSQL {cur.fetchone()[0]}"
        finally:
            conn.close()

    def url(self, replica: LocalReplica) -> str:
        return replica.dsn(database.DBNAME)

    def members(self, replicas: list[LocalReplica]) -> list[tuple[str, str]]:
        """`replicas` as the service names them and as DATABASE_REPLICA_URLS gives them."""
        return [(label(r), self.url(r)) for r in replicas]

    def primary_as_replica(self) -> tuple[str, str]:
        """The primary, as a replica that has replayed everything it wrote: a URL whose
        search_path puts `primary_as_replica` before pg_catalog, where pg_is_in_recovery()
        answers true and the replay and receive positions are the primary's insert position.
        The service then routes reads to the primary through a replica's pool, monitor and
        positions: the routing's cost alone (issue 26), with no second server on the cores."""
        conn = psycopg2.connect(self.dsn, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(PRIMARY_AS_REPLICA_SQL)
        finally:
            conn.close()
        options = quote(f"-c search_path={SHIM_SCHEMA},pg_catalog,public")
        return f"127.0.0.1:{self.primary.port}", f"{self.dsn}?options={options}"

    def set_apply_delay(self, seconds: float) -> None:
        for replica in self.replicas:
            replica.set_apply_delay(seconds)

    def catch_up(self) -> None:
        for replica in self.replicas:
            replica.catch_up()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.primary.stop()


SHIM_SCHEMA = "primary_as_replica"
PRIMARY_AS_REPLICA_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {SHIM_SCHEMA};
CREATE OR REPLACE FUNCTION {SHIM_SCHEMA}.pg_is_in_recovery() RETURNS boolean
    LANGUAGE sql STABLE AS 'SELECT true';
CREATE OR REPLACE FUNCTION {SHIM_SCHEMA}.pg_last_wal_replay_lsn() RETURNS pg_lsn
    LANGUAGE sql VOLATILE AS 'SELECT pg_catalog.pg_current_wal_insert_lsn()';
CREATE OR REPLACE FUNCTION {SHIM_SCHEMA}.pg_last_wal_receive_lsn() RETURNS pg_lsn
    LANGUAGE sql VOLATILE AS 'SELECT pg_catalog.pg_current_wal_insert_lsn()';
"""


def label(replica: LocalReplica) -> str:
    """A replica's name in the service's /readyz, /metrics and access lines."""
    return f"127.0.0.1:{replica.port}"


def start_service(
    name: str, cluster: Cluster, logs: Path, replicas: list[tuple[str, str]], instances: int
) -> compare.Server:
    """One instance through its production command, 2 workers, on a free port of 127.0.0.1,
    with `replicas` (label, URL) in DATABASE_REPLICA_URLS; returned once every worker has seen
    every replica up. Raises RuntimeError, the instance stopped, when that takes over
    READY_DEADLINE_S."""
    port = servers.free_port()
    env = {
        key: value
        for key, value in servers.environment(cluster.dsn, port, WORKER_CONNECTIONS).items()
        if key not in {"PROMETHEUS_MULTIPROC_DIR", "DATABASE_REPLICA_URLS"}
    }
    env.update(GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{port}", APP_INSTANCES=str(instances))
    if replicas:
        env["DATABASE_REPLICA_URLS"] = " ".join(url for _, url in replicas)
    server = compare.Server(name, servers.ROOT, cluster.dsn, env, logs)
    server.wait_ready(("/healthz", "/readyz"))
    deadline = time.monotonic() + READY_DEADLINE_S
    while not _every_worker_sees_up(server, {name for name, _ in replicas}):
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name}: the replicas were not up on every worker in time")
        gevent.sleep(0.05)
    return server


def _every_worker_sees_up(server: compare.Server, labels: set[str]) -> bool:
    """Whether each worker has logged every replica of `labels` up (service/db/replicas.py
    logs each change of a replica's state)."""
    if not labels:
        return True
    seen: dict[int, set[str]] = defaultdict(set)
    with open(server.log_path, errors="replace") as log:
        for text in log:
            if '"message": "replica ' in text:
                line = json.loads(text)
                name, _, state = line["message"].removeprefix("replica ").rpartition(": ")
                if state == "up":
                    seen[line["pid"]].add(name)
    return sum(labels <= names for names in seen.values()) >= servers.WORKERS


def settle(cluster: Cluster, instances: list[compare.Server]) -> None:
    """Every replica caught up with the primary, with no apply delay, and seen up by every
    instance: 10 answers of /readyz in a row each, on connections of their own (so from any
    worker). Raises RuntimeError after READY_DEADLINE_S."""
    cluster.set_apply_delay(0)
    cluster.catch_up()
    deadline = time.monotonic() + READY_DEADLINE_S
    for server in instances:
        in_a_row = 0
        while in_a_row < 10:
            status, body = clients.get(server.port, "/readyz")
            states = {r["state"] for r in (body or {}).get("replicas", {}).values()}
            in_a_row = in_a_row + 1 if status == 200 and states == {"up"} else 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not up on {server.url}: {body}")
            gevent.sleep(0.01)


def metrics(instances: list[compare.Server]) -> dict[tuple[str, frozenset], float]:
    """/metrics of every instance, added up."""
    return clients.added(*(clients.scrape(server.port) for server in instances))


def log_paths(instances: list[compare.Server]) -> list[Path]:
    return [path for server in instances for path in server.log_paths]


# The clients' load.


def _stale(sent: Sent, body: dict | None, name: str) -> bool:
    """A read of a user the client created or renamed to `name` that does not show it."""
    return sent.status == 404 or (sent.status == 200 and (body or {}).get("name") != name)


class Finding:
    """What a scenario found wrong: stale reads and failed requests, with what reproduces
    them. `stop` is set at the first one when the scenario stops there."""

    def __init__(self, stop_at_first: bool):
        self.notes: list[str] = []
        self.stop = Event()
        self._stop_at_first = stop_at_first

    def add(self, what: str, sent: Sent, **details) -> None:
        facts = ", ".join(f"{key} {value}" for key, value in details.items())
        self.notes.append(
            f"{what}: request {sent.request_id} ({sent.kind} on instance "
            f"{'AB'[sent.instance]}), status {sent.status}, error {sent.error}, "
            f"token presented {_lsn(sent.token_sent)}, token got {_lsn(sent.token_got)}"
            + (f", {facts}" if facts else "")
        )
        if self._stop_at_first:
            self.stop.set()


def _lsn(position: int) -> str:
    return format_lsn(position) if position else "none"


def stale_cycles(
    phase: str, ports: list[int], plan: Plan, finding: Finding
) -> tuple[list[Sent], float]:
    """`plan.stale_cycles` write-then-read cycles, or as many as `plan.stale_deadline_s`
    allows, by `plan.stale_clients` clients: each record and the time taken."""
    log: list[Sent] = []
    numbers = itertools.count()
    deadline = time.monotonic() + plan.stale_deadline_s

    def client(n: int) -> None:
        user = Client(f"{phase}-c{n}", ports, log)
        own: dict[int, str] = {}
        try:
            for cycle in range(1, plan.stale_cycles + 1):
                if finding.stop.is_set() or time.monotonic() > deadline:
                    return
                if next(numbers) >= plan.stale_cycles:
                    return
                _stale_cycle(user, cycle, own, finding)
        finally:
            user.close()

    started = time.monotonic()
    greenlets = [gevent.spawn(client, n) for n in range(plan.stale_clients)]
    gevent.joinall(greenlets, timeout=plan.stale_deadline_s + STOP_DEADLINE_S, raise_error=True)
    return log, time.monotonic() - started


def _write(user: Client, instance: int, name: str, rename_one_of: dict | None, rng):
    """A client's write on `instance`: a create of a user called `name`, or, given the client's
    own users, a rename of one of them (drawn with `rng`) to `name`."""
    if rename_one_of is None:
        body = {"name": name, "email": f"{name}@example.com"}
        return user.send("create", instance, "POST", "/users", body, write=True)
    uid = rng.choice(list(rename_one_of))
    return user.send("rename", instance, "PATCH", f"/users/{uid}", {"name": name}, write=True)


def _stale_cycle(user: Client, cycle: int, own: dict[int, str], finding: Finding) -> None:
    """Create a user (or rename one of `own`) on one instance, read it on the other with the
    write's token; in BARE_SHARE of the cycles, first read it there without. The writer goes
    A, B, B, A, ..., so that creates and renames each run on both."""
    writer = (cycle // 2) % 2
    reader = 1 - writer
    name = f"{user.name}-{cycle}"
    sent, answer = _write(user, writer, name, None if not own or cycle % 2 else own, random)
    if sent.status not in (200, 201):
        finding.add("a write failed", sent)
        return
    uid = answer["id"]
    own[uid] = name
    if random.random() < BARE_SHARE:
        bare, shown = user.send("bare", reader, "GET", f"/users/{uid}", carry=False)
        bare.stale = _stale(bare, shown, name)
    read, shown = user.send("read", reader, "GET", f"/users/{uid}")
    read.stale = _stale(read, shown, name)
    if read.stale:
        finding.add("STALE READ", read, user=uid, expected=repr(name), got=shown)
    elif read.status != 200:
        finding.add("a read failed", read, user=uid)


class Mix:
    """`count` token-carrying clients sending the mix (module docstring) to every instance,
    from `start()` until `stop()` or `deadline_s`, at most MAX_REQUESTS_PER_CLIENT each. With
    `bare_pages`, they ask for pages without their token (and leave the page's token aside),
    as a client that does not care for read-your-writes on a list would."""

    def __init__(
        self,
        phase: str,
        ports: list[int],
        count: int,
        users: int,
        deadline_s: float,
        finding: Finding,
        bare_pages: bool = False,
    ):
        self.phase = phase
        self._bare_pages = bare_pages
        self.log: list[Sent] = []
        self._ports = ports
        self._count = count
        self._users = users
        self._deadline_s = deadline_s
        self._finding = finding
        self._greenlets: list[gevent.Greenlet] = []
        self.started = self.ended = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self._greenlets = [gevent.spawn(self._client, n) for n in range(self._count)]

    def stop(self) -> None:
        """Tell the clients to stop and wait until each has its last answer."""
        self._finding.stop.set()
        gevent.joinall(self._greenlets, timeout=STOP_DEADLINE_S, raise_error=True)
        self.ended = time.monotonic()

    def run_for(self, seconds: float) -> None:
        """Start, let the clients run `seconds` (or until a finding stops them), stop."""
        self.start()
        self._finding.stop.wait(seconds)
        self.stop()

    def _client(self, n: int) -> None:
        user = Client(f"{self.phase}-c{n}", self._ports, self.log)
        rng = random.Random()
        own: dict[int, str] = {}
        written: int | None = None  # the user its last request wrote, if it was a write
        deadline = self.started + self._deadline_s
        try:
            for count in range(MAX_REQUESTS_PER_CLIENT):
                if self._finding.stop.is_set() or time.monotonic() > deadline:
                    return
                written = self._request(user, rng, own, written, count)
        finally:
            user.close()

    def _request(
        self, user: Client, rng: random.Random, own: dict[int, str], written: int | None, n: int
    ) -> int | None:
        """One request of the mix; the user it wrote, if it wrote one."""
        instance = rng.randrange(len(self._ports))
        pick = rng.randint(1, 100)
        if pick <= 70 and written is not None:
            sent, shown = user.send("read", instance, "GET", f"/users/{written}")
            sent.stale = _stale(sent, shown, own[written])
            if sent.stale:
                self._finding.add("STALE READ", sent, user=written, expected=repr(own[written]))
            elif sent.status != 200:
                self._finding.add("a read failed", sent)
            return None
        if pick <= 70:
            sent, _ = user.send("get", instance, "GET", f"/users/{rng.randint(1, self._users)}")
            if sent.status != 200:
                self._finding.add("a read failed", sent)
            return None
        if pick <= 80:
            carry = not self._bare_pages
            sent, _ = user.send("page", instance, "GET", "/users?limit=20", carry=carry)
            if sent.status != 200:
                self._finding.add("a page failed", sent)
            return None
        name = f"{user.name}-{n}"
        sent, answer = _write(user, instance, name, None if pick <= 90 or not own else own, rng)
        if sent.status not in (200, 201):
            self._finding.add("a write failed", sent)
            return None
        own[answer["id"]] = name
        return answer["id"]


def _reads(log: list[Sent], kinds: tuple[str, ...] = ("read", "get", "page")) -> list[Sent]:
    return [sent for sent in log if sent.kind in kinds and sent.status == 200]


def _shares(servers_of: dict[str, str | None], reads: list[Sent]) -> tuple[int, int, int]:
    """Reads on replicas, on the primary, and on a server not known."""
    kinds = Counter(servers_of.get(read.request_id) for read in reads)
    return kinds[REPLICA], kinds[PRIMARY], kinds[None]


def _share(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


def _metric_lines(grown: dict[tuple[str, frozenset], float]) -> list[str]:
    """What /metrics says about the reads, between two scrapes."""
    reads = clients.by_label(grown, "db_reads_total", "server")
    on_primary = reads.pop(PRIMARY, 0.0)
    on_replicas = sum(reads.values())
    fallbacks = clients.by_label(grown, "db_read_fallbacks_total", "reason")
    waits = clients.by_label(grown, "db_read_catch_up_wait_seconds_count", "caught_up")
    waited = clients.by_label(grown, "db_read_catch_up_wait_seconds_sum", "caught_up")
    retries = sum(clients.by_label(grown, "db_read_retries_total", "").values())
    lookups = sum(clients.by_label(grown, "db_lookups_total", "").values())
    queries = sum(clients.by_label(grown, "db_lookup_queries_total", "").values())
    mean_wait = {k: waited.get(k, 0.0) / n for k, n in waits.items() if n}
    return [
        f"- /metrics, read blocks (a batch's statement is one block, however many requests "
        f"it answers): {on_replicas:,.0f} on replicas, {on_primary:,.0f} on the primary "
        f"({_pct(_share(on_replicas, on_replicas + on_primary))} on replicas); "
        f"lookups per lookup query {lookups / queries if queries else 0:.2f}",
        "- /metrics, fallbacks to the primary by reason: "
        + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(fallbacks.items()) if v) or "none")
        + f"; retries {retries:,.0f}; catch-up waits: "
        + (
            ", ".join(
                f"caught up {k}: {waits[k]:,.0f} (mean {1000 * mean_wait.get(k, 0):.1f} ms)"
                for k in sorted(waits)
                if waits[k]
            )
            or "none"
        ),
    ]


def _failures(log: list[Sent]) -> Counter:
    return Counter(sent.error or str(sent.status) for sent in log if sent.failed)


# The scenarios.


def scenario_stale(
    plan: Plan, cluster: Cluster, instances: list[compare.Server]
) -> tuple[Section, bool]:
    """Scenario 1; and whether it found a bug (it stops at the first)."""
    section = Section(
        "1. Stale reads: token-carrying clients, write on one instance, read on the other"
    )
    ports = [server.port for server in instances]
    finding = Finding(stop_at_first=True)
    rows = []
    for delay in plan.stale_delays_s:
        settle(cluster, instances)
        cluster.set_apply_delay(delay)
        before, busy, began = metrics(instances), cpu.busy(os.getpid()), time.time()
        phase = f"stale{round(delay * 1000)}ms"
        try:
            log, took = stale_cycles(phase, ports, plan, finding)
        finally:
            cluster.set_apply_delay(0)
        grown = clients.delta(metrics(instances), before)
        others = cpu.busy(os.getpid()).others_cores(busy)
        row = _stale_row(delay, log, took, grown, others, instances, phase)
        row["metrics"].append(_changes_line(state_changes(instances, began, time.time())))
        rows.append(row)
        print(
            f"bench.replicas: stale, delay {delay:g} s: {rows[-1]['cycles']:,} cycles in "
            f"{took:.1f} s, {rows[-1]['stale']} stale",
            flush=True,
        )
        if finding.stop.is_set():
            break
    stale = sum(row["stale"] for row in rows)
    done = [row["cycles"] for row in rows]
    section.check(
        "stale reads with the token (all delays)",
        f"{STALE_READS}",
        f"{stale} in {sum(done):,} cycles",
        stale == STALE_READS,
    )
    section.lines += [
        f"{plan.stale_clients} clients (greenlets of this script, a keep-alive connection to "
        f"each instance each), up to {plan.stale_cycles:,} cycles per delay or "
        f"{plan.stale_deadline_s:g} s. A cycle: create a user (odd cycles, or when the client has "
        "none) or rename one of the client's own (even cycles) on instance A or B (A, B, B, A, "
        "..., so that each kind runs on each), then GET it on the other instance presenting the "
        "write's token; it is stale when it is 404 or shows another name. "
        f"{_pct(BARE_SHARE)} of the cycles, drawn at random, first read it there without the "
        'token ("bare"): a bare read that joins a batch of token reads is read at their '
        "position, so this undercounts what a client without the token would see. The apply "
        "delay (recovery_min_apply_delay) is set on both replicas.",
        "",
        "| apply delay | cycles done | time s | stale reads with token (target 0) | bare reads "
        "stale | token reads on replicas | on primary | server unknown | token read p50 / p99 "
        "ms | failed requests | others' load, cores |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        section.lines.append(
            f"| {row['delay']:g} s | {row['cycles']:,} | {row['took']:.1f} | {row['stale']} | "
            f"{row['bare_stale']} of {row['bare']} "
            f"({_pct(_share(row['bare_stale'], row['bare']))}) | "
            f"{_pct(row['replica'])} | {_pct(row['primary'])} | {row['unknown']:,} | "
            f"{row['p50']} / {row['p99']} | {row['failed']} | {row['others']:.2f} |"
        )
    section.lines.append("")
    for row in rows:
        section.lines += [f"Apply delay {row['delay']:g} s:", "", *row["metrics"], ""]
    if finding.notes:
        section.lines += ["", "**Found (the scenario stopped at the first):**", ""]
        section.lines += [f"- {note}" for note in finding.notes[:20]]
    return section, bool(finding.notes)


def _stale_row(
    delay: float,
    log: list[Sent],
    took: float,
    grown: dict,
    others: float,
    instances: list[compare.Server],
    phase: str,
) -> dict:
    reads = [sent for sent in log if sent.kind == "read"]
    bare = [sent for sent in log if sent.kind == "bare" and sent.status in (200, 404)]
    lines = clients.access_lines(log_paths(instances), phase)
    attributed = clients.servers_of(_reads(log, ("read", "bare")), lines)
    ok = [read for read in reads if read.status == 200]
    on_replicas, on_primary, unknown = _shares(attributed, ok)
    known = on_replicas + on_primary
    return {
        "delay": delay,
        "cycles": len(reads),
        "took": took,
        "stale": sum(read.stale for read in reads),
        "bare": len(bare),
        "bare_stale": sum(sent.stale for sent in bare),
        "replica": _share(on_replicas, known),
        "primary": _share(on_primary, known),
        "unknown": unknown,
        "p50": _ms([r.ended - r.started for r in ok], 0.50),
        "p99": _ms([r.ended - r.started for r in ok], 0.99),
        "failed": sum(_failures(log).values()),
        "others": others,
        "metrics": [_named_line(ok, lines, "token reads"), *_metric_lines(grown)],
    }


def _named_line(reads: list[Sent], lines: dict[str, dict], what: str) -> str:
    """How many of `reads` had their server named in their own access line."""
    named = sum(bool(lines.get(read.request_id, {}).get("db_server")) for read in reads)
    return (
        f"- {what} whose access line names their server (the request that sent its batch's "
        f"statement): {named:,} of {len(reads):,}; the others were attributed by their token"
    )


def scenario_mix(
    plan: Plan, cluster: Cluster, instances: list[compare.Server]
) -> tuple[Section, bool]:
    """Scenario 2; and whether it found a bug (it stops at the first)."""
    section = Section("2. Reads on replicas under the mix, no delay")
    settle(cluster, instances)
    finding = Finding(stop_at_first=True)
    mix = Mix(
        "mix", [s.port for s in instances], plan.mix_clients, cluster.users, plan.mix_s, finding
    )
    before, busy, began = metrics(instances), cpu.busy(os.getpid()), time.time()
    mix.run_for(plan.mix_s)
    grown = clients.delta(metrics(instances), before)
    others = cpu.busy(os.getpid()).others_cores(busy)
    changes = state_changes(instances, began, time.time())
    reads = _reads(mix.log)
    lines = clients.access_lines(log_paths(instances), "mix")
    attributed = clients.servers_of(reads, lines)
    on_replicas, on_primary, unknown = _shares(attributed, reads)
    soon = [r for r in reads if r.after_write_s is not None and r.after_write_s <= AFTER_WRITE_S]
    soon_replicas, soon_primary, soon_unknown = _shares(attributed, soon)
    share = _share(on_replicas, on_replicas + on_primary)
    soon_share = _share(soon_replicas, soon_replicas + soon_primary)
    stale = sum(sent.stale for sent in mix.log)
    failed = _failures(mix.log)
    took = mix.ended - mix.started
    soon_ids = {r.request_id for r in soon}
    soon_s = [r.ended - r.started for r in soon]
    other_s = [r.ended - r.started for r in reads if r.request_id not in soon_ids]
    section.check(
        "share of reads on replicas",
        f">= {_pct(READS_ON_REPLICAS)}",
        _pct(share),
        share >= READS_ON_REPLICAS,
    )
    section.check(
        f"share of reads sent within {AFTER_WRITE_S * 1000:g} ms of the client's own write "
        "that ran on a replica",
        f">= {_pct(AFTER_WRITE_ON_REPLICAS)}",
        f"{_pct(soon_share)} of {soon_replicas + soon_primary:,}",
        soon_share >= AFTER_WRITE_ON_REPLICAS,
    )
    section.check("stale reads of the clients' own writes", "0", str(stale), stale == 0)
    section.check(
        "failed requests (5xx, socket errors)", "0", str(sum(failed.values())), not failed
    )
    section.lines += [
        f"{plan.mix_clients} token-carrying clients for {took:.1f} s, each request to instance A "
        f"or B at random: {len(mix.log):,} requests ({len(mix.log) / took:,.0f}/s), "
        f"{len(reads):,} reads (by id and pages) answered 200, "
        f"{sum(r.kind == 'read' for r in reads):,} of them reads of the client's own write "
        "right after it (checked). Others' load: "
        f"{others:.2f} cores.",
        "",
        f"- reads by server: {on_replicas:,} on replicas, {on_primary:,} on the primary, "
        f"{unknown:,} not known (the access line names no server and the token is ambiguous)",
        f"- reads sent within {AFTER_WRITE_S * 1000:g} ms of the client's write: "
        f"{len(soon):,}: {soon_replicas:,} on replicas, {soon_primary:,} on the primary, "
        f"{soon_unknown:,} not known",
        f"- latency of those reads p50 / p99: {_ms(soon_s, 0.5)} / {_ms(soon_s, 0.99)} ms; "
        f"of the other reads: {_ms(other_s, 0.5)} / {_ms(other_s, 0.99)} ms",
        f"- failed: {dict(failed) or 'none'}",
        _named_line(reads, lines, "reads"),
        *_metric_lines(grown),
        _changes_line(changes),
    ]
    if finding.notes:
        section.lines += ["", "**Found (the scenario stopped at the first):**", ""]
        section.lines += [f"- {note}" for note in finding.notes[:20]]
    return section, bool(finding.notes)


def scenario_kill(
    plan: Plan, cluster: Cluster, instances: list[compare.Server]
) -> tuple[Section, bool]:
    """Scenario 3: failed requests are counted, not stopped at; a stale read stops it."""
    section = Section("3. A replica killed under the mix")
    settle(cluster, instances)
    victim = cluster.replicas[0]
    finding = Finding(stop_at_first=False)
    total_s = plan.kill_before_s + plan.kill_down_s + plan.kill_after_s
    mix = Mix(
        "kill",
        [s.port for s in instances],
        plan.mix_clients,
        cluster.users,
        total_s + READY_DEADLINE_S,
        finding,
    )
    polls: list[tuple[int, str, float, str | None]] = []  # instance, id, answered at, state
    backends: list[tuple[float, dict[int, str] | None]] = []
    done = Event()
    pollers = [
        gevent.spawn(_poll_readyz, i, s.port, label(victim), polls, done)
        for i, s in enumerate(instances)
    ]
    sampler = gevent.spawn(_sample_backends, victim, backends, done)
    before, busy, began = metrics(instances), cpu.busy(os.getpid()), time.time()
    try:
        mix.start()
        gevent.sleep(plan.kill_before_s)  # the scenario's timeline, not a wait for readiness
        killed, killed_wall = time.monotonic(), time.time()
        victim.halt("immediate")
        halted = time.monotonic()
        gevent.sleep(plan.kill_down_s)
        launched = time.monotonic()
        victim.launch()
        ready = time.monotonic()
        gevent.sleep(plan.kill_after_s)
    finally:
        if mix.started:
            mix.stop()
        done.set()
        gevent.joinall([*pollers, sampler], timeout=STOP_DEADLINE_S)
    grown = clients.delta(metrics(instances), before)
    others = cpu.busy(os.getpid()).others_cores(busy)
    lines = clients.access_lines(log_paths(instances), "kill-")
    out_s, back_s, workers = _rotation(polls, lines, killed, launched)
    changes = state_changes(instances, began, time.time())
    logged = ", ".join(
        f"{who} {state} {at - killed_wall:+.3f}"
        for who, at, name, state in changes
        if name == label(victim)
    )
    failed = _failures(mix.log)
    stale = sum(sent.stale for sent in mix.log)
    section.check(
        "failed requests (5xx, socket errors)", "0", str(sum(failed.values())), not failed
    )
    section.check(
        "out of rotation on every worker after the kill",
        f"< {OUT_OF_ROTATION_S:g} s",
        f"{out_s:.3f} s" if out_s is not None else "not seen",
        out_s is not None and out_s < OUT_OF_ROTATION_S,
    )
    section.check(
        "back in rotation on every worker after launch() was called",
        f"< {BACK_IN_ROTATION_S:g} s",
        f"{back_s:.3f} s" if back_s is not None else "not seen",
        back_s is not None and back_s < BACK_IN_ROTATION_S,
    )
    section.check("stale reads of the clients' own writes", "0", str(stale), stale == 0)
    storm = _backend_storm(backends, killed, ready)
    section.lines += [
        f"{plan.mix_clients} token-carrying clients, the mix on both instances for "
        f"{mix.ended - mix.started:.1f} s ({len(mix.log):,} requests). Replica {label(victim)} "
        f'killed (`halt("immediate")`, SIGQUIT, {halted - killed:.3f} s until the postmaster '
        f"was gone) {plan.kill_before_s:g} s in, `launch()` called {plan.kill_down_s:g} s later "
        f"and returned after {ready - launched:.3f} s (accepting connections and streaming). "
        f"/readyz polled every {READYZ_EVERY_S * 1000:g} ms on each instance on a connection of "
        "its own; each answer attributed to its worker by the access line's pid, and a worker's "
        "time is that of its first answer showing the replica out (or back): "
        f"{workers} workers answered. Others' load: {others:.2f} cores.",
        "",
        "- out of rotation, per worker (s after the kill): "
        + _per_worker(out_s, polls, lines, killed, "out"),
        f"- back in rotation, per worker (s after launch() was called, {ready - launched:.3f} s "
        "before it returned): "
        f"{_per_worker(back_s, polls, lines, launched, 'back')}",
        f"- the workers' own log lines on {label(victim)} (s after the kill; launch() was "
        f"called at {launched - killed:+.3f}): {logged or 'none'}. A worker logs a change its "
        "monitor sees; one whose request found the replica broken first takes it out at once "
        "and logs nothing then",
        _changes_line(changes),
        f"- failed requests: {dict(failed) or 'none'}",
        *_metric_lines(grown),
        f"- the killed replica's client backends (pg_stat_activity every "
        f"{BACKENDS_EVERY_S * 1000:g} ms): {storm}",
    ]
    if finding.notes:
        section.lines += ["", "**Found:**", ""] + [f"- {note}" for note in finding.notes[:20]]
    return section, stale > 0


def _poll_readyz(instance: int, port: int, name: str, polls: list, done: Event) -> None:
    """Until `done`: /readyz on a connection of its own every READYZ_EVERY_S; each answer's
    request id, time and the state of replica `name` (None: no answer)."""
    for n in range(MAX_REQUESTS_PER_CLIENT):
        if done.is_set():
            return
        request_id = f"kill-rz{instance}-{n}"
        try:
            _, body = clients.get(port, "/readyz", request_id)
            state = (body or {}).get("replicas", {}).get(name, {}).get("state")
        except (OSError, ValueError):
            state = None
        polls.append((instance, request_id, time.monotonic(), state))
        done.wait(READYZ_EVERY_S)


def _worker_times(
    polls: list, lines: dict[str, dict], since: float, out: bool
) -> dict[tuple[int, int], tuple[float, float]]:
    """Per worker (instance, pid): seconds from `since` to its first answer after it showing
    the replica out of rotation (`out`) or in it, and to its answer before that one (0 when
    there was none since): the change happened between the two."""
    first: dict[tuple[int, int], tuple[float, float]] = {}
    previous: dict[tuple[int, int], float] = {}
    for instance, request_id, at, state in sorted(polls, key=lambda p: p[2]):
        line = lines.get(request_id)
        if line is None or at < since or state is None:
            continue
        worker = (instance, line["pid"])
        if worker not in first and (state != "up") == out:
            first[worker] = (at - since, previous.get(worker, 0.0))
        previous[worker] = at - since
    return first


def _rotation(
    polls: list, lines: dict[str, dict], killed: float, launched: float
) -> tuple[float | None, float | None, int]:
    """The slowest worker's time out of rotation after `killed` and back after `launched`
    (None unless every worker that answered was seen so), and how many workers answered."""
    workers = {(i, lines[rid]["pid"]) for i, rid, _, _ in polls if rid in lines}
    out = _worker_times(polls, lines, killed, out=True)
    back = _worker_times(polls, lines, launched, out=False)
    out_s = max(t for t, _ in out.values()) if len(out) == len(workers) and workers else None
    back_s = max(t for t, _ in back.values()) if len(back) == len(workers) and workers else None
    return out_s, back_s, len(workers)


def _per_worker(worst, polls, lines, since: float, which: str) -> str:
    times = _worker_times(polls, lines, since, out=which == "out")
    shown = ", ".join(
        f"{'AB'[i]}/{pid} {t:.3f} (its answer before: {before:.3f})"
        for (i, pid), (t, before) in sorted(times.items())
    )
    return f"{shown}; worst {worst:.3f}" if worst is not None else f"{shown}; not every worker"


def state_changes(
    instances: list[compare.Server], since_wall: float, until_wall: float
) -> list[tuple[str, float, str, str]]:
    """Each change of a replica's state that a worker logged between two `time.time()`s:
    (instance/pid, when, replica, state), in the order logged."""
    found = []
    for letter, server in zip("AB", instances, strict=False):
        with open(server.log_path, errors="replace") as log:
            for text in log:
                if '"message": "replica ' not in text:
                    continue
                line = json.loads(text)
                at = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
                name, _, state = line["message"].removeprefix("replica ").rpartition(": ")
                if since_wall <= at.timestamp() <= until_wall:
                    found.append((f"{letter}/{line['pid']}", at.timestamp(), name, state))
    return sorted(found, key=lambda change: change[1])


def _changes_line(changes: list[tuple[str, float, str, str]]) -> str:
    """What the workers' logs say of the replicas' states in a scenario."""
    if not changes:
        return "- replicas' states: no change logged by any worker (up throughout)"
    counted = Counter((name, state) for _, _, name, state in changes)
    return "- replicas' state changes logged by the workers (all workers of both instances): " + (
        ", ".join(f"{name} {state} x{n}" for (name, state), n in sorted(counted.items()))
    )


def _sample_backends(replica: LocalReplica, samples: list, done: Event) -> None:
    """Until `done`: the client backends of the bench database on `replica` every
    BACKENDS_EVERY_S, as {pid: application_name}; None while it does not answer."""
    conn = None
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if done.is_set():
            break
        try:
            if conn is None or conn.closed:
                conn = psycopg2.connect(replica.dsn(), connect_timeout=1)
                conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(_BACKENDS, (database.DBNAME,))
                samples.append((time.monotonic(), dict(cur.fetchall())))
        except psycopg2.Error:
            if conn is not None:
                conn.close()
            conn = None
            samples.append((time.monotonic(), None))
        done.wait(BACKENDS_EVERY_S)
    if conn is not None:
        conn.close()


def _backend_storm(samples: list, killed: float, ready: float) -> str:
    """The killed replica's backends just before the kill and once it answered again (times
    from launch() returning): the most new ones in one sample, and their count over time."""
    before = [len(pids) for at, pids in samples if pids is not None and at < killed][-1:]
    after = [(at - ready, pids) for at, pids in samples if at >= killed and pids is not None]
    if not after:
        return "no sample once it answered again"
    previous: dict[int, str] = {}
    new_most, new_first = 0, 0
    timeline = []
    for n, (at, pids) in enumerate(after):
        new = set(pids) - set(previous)
        if n == 0:
            new_first = len(new)
        else:
            new_most = max(new_most, len(new))
        previous = pids
        if n % 5 == 0:
            timeline.append(f"{at:.1f} s: {len(pids)}")
    apps = Counter(after[-1][1].values())
    return (
        f"{before[0] if before else 'n/a'} just before the kill; {new_first} in the first sample "
        f"once it answered again ({after[0][0]:+.2f} s from launch() returning); then at most "
        f"**{new_most} new in one {BACKENDS_EVERY_S * 1000:g} ms sample**; count over time "
        f"(s from launch() returning: backends): {', '.join(timeline)}; at the end "
        + ", ".join(f"{n} {app}" for app, n in sorted(apps.items()))
    )


def scenario_spike(
    plan: Plan, cluster: Cluster, instances: list[compare.Server]
) -> tuple[Section, bool]:
    """Scenario 4; and whether it found a bug (it stops at the first)."""
    section = Section(f"4. A {REPLICA_LAG_SPIKE_S:g} s lag spike under the mix")
    settle(cluster, instances)
    finding = Finding(stop_at_first=True)
    total_s = plan.spike_before_s + plan.spike_hold_s + plan.spike_after_s
    # Pages without a token: they need no replica to have replayed anything, so the bound is
    # not the whole of the reads, and a service that sent every read to the primary during a
    # spike would exceed it.
    mix = Mix(
        "spike",
        [s.port for s in instances],
        plan.mix_clients,
        cluster.users,
        total_s + READY_DEADLINE_S,
        finding,
        bare_pages=True,
    )
    replay: list[tuple[float, int]] = []
    done = Event()
    sampler = gevent.spawn(_sample_replay, cluster.replicas, replay, done)
    before, busy, began = metrics(instances), cpu.busy(os.getpid()), time.time()
    try:
        mix.start()
        gevent.sleep(plan.spike_before_s)  # the scenario's timeline
        on_at = time.monotonic()
        at_on = metrics(instances)
        cluster.set_apply_delay(REPLICA_LAG_SPIKE_S)
        on = time.monotonic()
        gevent.sleep(plan.spike_hold_s)
        cluster.set_apply_delay(0)
        off = time.monotonic()
        at_off = metrics(instances)
        gevent.sleep(plan.spike_after_s)
    finally:
        if mix.started:
            mix.stop()
        cluster.set_apply_delay(0)
        done.set()
        sampler.join(timeout=STOP_DEADLINE_S)
    after = metrics(instances)
    grown_at = {
        "before": clients.delta(at_on, before),
        "spike": clients.delta(at_off, at_on),
        "after": clients.delta(after, at_off),
    }
    others = cpu.busy(os.getpid()).others_cores(busy)
    changes = state_changes(instances, began, time.time())
    reads = _reads(mix.log)
    lines = clients.access_lines(log_paths(instances), "spike")
    attributed = clients.servers_of(reads, lines)
    windows = {"before": (mix.started, on_at), "spike": (on, off), "after": (off, mix.ended)}
    rows = {name: _window(reads, attributed, replay, *span) for name, span in windows.items()}
    spike = rows["spike"]
    stale = sum(sent.stale for sent in mix.log)
    failed = _failures(mix.log)
    within = spike["primary"] <= spike["needing_known"]
    section.check("stale reads of the clients' own writes", "0", str(stale), stale == 0)
    section.check(
        "primary's share of reads during the spike",
        "<= share of reads whose token was ahead of every replica as a worker could know it "
        "(docs/scaling.md's bound)",
        f"{_pct(spike['primary'])} vs {_pct(spike['needing_known'])}",
        within,
    )
    section.check(
        "failed requests (5xx, socket errors)", "0", str(sum(failed.values())), not failed
    )
    section.lines += [
        f"Both replicas get recovery_min_apply_delay = {REPLICA_LAG_SPIKE_S:g} s for "
        f"{off - on:.1f} s, {plan.spike_before_s:g} s into the mix of {plan.mix_clients} "
        "token-carrying clients (who ask for pages without their token: a page needs no "
        "replica to have replayed anything, so not every read needs the primary during the "
        "spike), then none again: with one replica left without delay the "
        "spike would send every read to that one, and the bound would not be tested. Replay "
        f"stops while the delay is on, until commits are {REPLICA_LAG_SPIKE_S:g} s old. "
        f"Each replica's replay position sampled every {REPLAY_EVERY_S * 1000:g} ms; a read "
        '"needs the primary" when the token it presented is ahead of both replicas\' positions '
        f"in the last sample at least {WORD_AGE_S * 1000:g} ms before it was sent: a worker "
        "routes on the replay position it last polled or a read told it, at most a poll "
        "interval (with its jitter) and a round trip old, so no worker could know of a "
        "later one (the bound the check uses). Beside it, two figures for comparison: the "
        "first sample after the read was sent (what no router can know when it routes), and "
        "the last sample before it. "
        "A read on the primary hands back the primary's position as its token, so a client "
        "that read there needs the primary for its next reads too, until a replica passes "
        "that position; and each such read first waits up to REPLICA_CATCH_UP_S for one. "
        f"Others' load: {others:.2f} cores.",
        "",
        "| window | time s | requests/s | reads | on primary (of known) | server unknown | "
        "reads needing the primary (as a worker could know it; sample after send; before "
        "send) | read p50 / p99 ms "
        "| stale |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, row in rows.items():
        section.lines.append(
            f"| {name} | {row['seconds']:.1f} | "
            f"{_rate(mix.log, *windows[name]):,.0f} | "
            f"{row['reads']:,} | {_pct(row['primary'])} | {row['unknown']:,} | "
            f"{_pct(row['needing_known'])}; {_pct(row['needing'])}; "
            f"{_pct(row['needing_looser'])} | "
            f"{row['p50']} / {row['p99']} | {row['stale']} |"
        )
    section.lines += ["", _named_line(reads, lines, "reads"), _changes_line(changes), ""]
    for name, grown in grown_at.items():
        section.lines += [f"/metrics, {name}:", "", *_metric_lines(grown), ""]
    section.lines += [
        "",
        "Per second (from the start of the mix):",
        "",
        "| s | requests | reads on primary (of known) | reads needing the primary | stale |",
        "|--:|--:|--:|--:|--:|",
    ]
    start = mix.started
    for second in range(int(mix.ended - start) + 1):
        row = _window(reads, attributed, replay, start + second, start + second + 1)
        section.lines.append(
            f"| {second} | {_count_in(mix.log, start + second, start + second + 1):,} | "
            f"{_pct(row['primary'])} | {_pct(row['needing_known'])} | {row['stale']} |"
        )
    section.lines.append(
        f"\nThe delay went on at {on - start:.1f} s and off at {off - start:.1f} s. "
        f"Failed: {dict(failed) or 'none'}."
    )
    if finding.notes:
        section.lines += ["", "**Found (the scenario stopped at the first):**", ""]
        section.lines += [f"- {note}" for note in finding.notes[:20]]
    return section, bool(finding.notes)


def _count_in(log: list[Sent], start: float, end: float) -> int:
    return sum(start <= sent.started < end for sent in log)


def _rate(log: list[Sent], start: float, end: float) -> float:
    return _count_in(log, start, end) / (end - start) if end > start else 0.0


def _sample_replay(replicas: list[LocalReplica], samples: list, done: Event) -> None:
    """Until `done`: the furthest replay position of `replicas` every REPLAY_EVERY_S."""
    conns = [psycopg2.connect(r.dsn(), connect_timeout=5) for r in replicas]
    try:
        for conn in conns:
            conn.autocommit = True
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if done.is_set():
                return
            furthest = 0
            for conn in conns:
                with conn.cursor() as cur:
                    cur.execute("SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint")
                    furthest = max(furthest, cur.fetchone()[0])
            samples.append((time.monotonic(), furthest))
            done.wait(REPLAY_EVERY_S)
    finally:
        for conn in conns:
            conn.close()


def _window(reads: list[Sent], attributed: dict, replay: list, start: float, end: float) -> dict:
    """The reads sent in [start, end): where they ran, and how many needed the primary."""
    inside = [r for r in reads if start <= r.started < end]
    on_replicas, on_primary, unknown = _shares(attributed, inside)
    times = [at for at, _ in replay]
    needing_before = needing_after = needing_known = 0
    for read in inside:
        i = bisect.bisect_right(times, read.started)
        if i and read.token_sent > replay[i - 1][1]:
            needing_before += 1
        if i < len(replay) and read.token_sent > replay[i][1]:
            needing_after += 1
        known = bisect.bisect_right(times, read.started - WORD_AGE_S)
        if not known or read.token_sent > replay[known - 1][1]:
            needing_known += 1
    return {
        "seconds": max(0.0, end - start),
        "reads": len(inside),
        "primary": _share(on_primary, on_replicas + on_primary),
        "unknown": unknown,
        "needing": _share(needing_after, len(inside)),
        "needing_looser": _share(needing_before, len(inside)),
        "needing_known": _share(needing_known, len(inside)),
        "stale": sum(r.stale for r in inside),
        "p50": _ms([r.ended - r.started for r in inside], 0.50),
        "p99": _ms([r.ended - r.started for r in inside], 0.99),
    }


ROUTING_SIDES = ("none", "self", "replica")


def scenario_routing(plan: Plan, cluster: Cluster, logs: Path) -> Section:
    """Scenario 5b: one instance with no replica, with the primary as its replica, and with a
    real replica."""
    section = Section("5b. Routing cost: no replica, the primary as the replica, a real replica")
    workload = WORKLOADS["mix"]
    members = {
        "none": [],
        "self": [cluster.primary_as_replica()],
        "replica": cluster.members(cluster.replicas[:1]),
    }
    results: dict[int, list[dict[str, dict]]] = {}
    for level in plan.routing_levels:
        results[level] = []
        for number in range(1, plan.routing_rounds + 1):
            turn = (number - 1) % len(ROUTING_SIDES)
            sides = ROUTING_SIDES[turn:] + ROUTING_SIDES[:turn]
            measured = {}
            for side in sides:
                settle(cluster, [])
                measured[side] = _routing_run(
                    side, level, number, plan, cluster, logs, workload, members[side]
                )
                print(
                    f"bench.replicas: routing {level} round {number} {side}: "
                    f"{measured[side]['rps']:,.0f} req/s",
                    flush=True,
                )
            measured["order"] = sides
            results[level].append(measured)
    section.lines += [
        "Three sides, one instance each (2 workers, pool 10 each), started afresh every run, "
        f"wrk -t2 with mix.lua (no tokens) for {plan.routing_s} s after a {compare.WARMUP_S} s "
        "warm-up, one at a time (the others stopped, so that their monitors poll nothing "
        "meanwhile), the order rotating each round:",
        "",
        "- `none`: no replica configured.",
        '- `self`: the issue\'s "replica being the primary itself": DATABASE_REPLICA_URLS names '
        "the primary through a search_path under which pg_is_in_recovery() is true and the "
        "replay position is the primary's insert position (`Cluster.primary_as_replica`). Every "
        "read goes through the replica's pool, monitor, routing and position, on the same "
        "server: the routing's cost alone.",
        "- `replica`: a real streaming replica of the same primary on the same 2 cores, which "
        "also pays for a second server's processes.",
        "",
        "Both replicas stream from the primary throughout, on every side. Server CPU per "
        "request counts the service and the primary, not the replica.",
        "",
    ]
    for level, rounds in results.items():
        section.lines += [
            f"### {level:,} connections",
            "",
            "| round | order | none req/s | self req/s | replica req/s | self/none | "
            "replica/none | CPU ms/req none; self; replica | p99 ms none; self; replica | "
            "read blocks on the replica (self; replica) | non-2xx and socket errors |",
            "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for n, r in enumerate(rounds, 1):
            section.lines.append(
                f"| {n} | {', '.join(r['order'])} | {r['none']['rps']:,.0f} | "
                f"{r['self']['rps']:,.0f} | {r['replica']['rps']:,.0f} | "
                f"{r['self']['rps'] / r['none']['rps']:.3f} | "
                f"{r['replica']['rps'] / r['none']['rps']:.3f} | "
                + "; ".join(f"{r[side]['cpu']:.3f}" for side in ROUTING_SIDES)
                + " | "
                + "; ".join(f"{r[side]['p99']:.1f}" for side in ROUTING_SIDES)
                + f" | {_pct(r['self']['on_replica'])}; {_pct(r['replica']['on_replica'])} | "
                + f"{sum(r[side]['errors'] for side in ROUTING_SIDES)} |"
            )
        ratios = {
            side: statistics.median(r[side]["rps"] / r["none"]["rps"] for r in rounds)
            for side in ("self", "replica")
        }
        cpu_ratios = {
            side: statistics.median(r[side]["cpu"] / r["none"]["cpu"] for r in rounds)
            for side in ("self", "replica")
        }
        section.lines += [
            f"| **median** | | {_median(rounds, 'none', 'rps'):,.0f} | "
            f"{_median(rounds, 'self', 'rps'):,.0f} | {_median(rounds, 'replica', 'rps'):,.0f} | "
            f"**{ratios['self']:.3f}** | **{ratios['replica']:.3f}** | | | | |",
            "",
        ]
        section.check(
            f"req/s with the primary as the replica / none, {level:,} connections (median)",
            ">= 0.95",
            f"{ratios['self']:.3f} (server CPU per request {cpu_ratios['self']:.3f})",
            ratios["self"] >= 0.95,
        )
        section.check(
            f"req/s with a real replica / none, {level:,} connections (median)",
            "none stated",
            f"{ratios['replica']:.3f} (server CPU per request {cpu_ratios['replica']:.3f})",
            None,
        )
    return section


def _median(rounds: list[dict], side: str, key: str) -> float:
    return statistics.median(r[side][key] for r in rounds)


def _routing_run(
    side: str,
    level: int,
    number: int,
    plan: Plan,
    cluster: Cluster,
    logs: Path,
    workload,
    replicas: list[tuple[str, str]],
) -> dict:
    server = start_service(f"routing-{side}-{level}-{number}", cluster, logs, replicas, 1)
    try:
        wrk.run(
            wrk.command(
                server.url,
                level,
                compare.WARMUP_S,
                workload.script,
                workload.lua_args(cluster.users),
            )
        )
        deadline = time.monotonic() + compare.DRAIN_DEADLINE_S
        while server.held_connections() and time.monotonic() < deadline:
            gevent.sleep(compare.POLL_S)
        before, busy = clients.scrape(server.port), cpu.busy(os.getpid())
        meter = cpu.CpuMeter(cluster.primary.pid, server.pid)
        meter.start()
        result, _ = wrk.run(
            wrk.command(
                server.url, level, plan.routing_s, workload.script, workload.lua_args(cluster.users)
            )
        )
        used = meter.stop()
        others = cpu.busy(os.getpid()).others_cores(busy)
        reads = clients.by_label(
            clients.delta(clients.scrape(server.port), before), "db_reads_total", "server"
        )
    finally:
        server.stop()
    ok = result.requests - result.non_2xx
    on_primary = reads.pop(PRIMARY, 0.0)
    return {
        "rps": result.rps,
        "p99": result.p99_ms,
        "others": others,
        "cpu": 1000 * used.server_s / ok if ok else float("nan"),
        "on_replica": _share(sum(reads.values()), sum(reads.values()) + on_primary)
        if replicas
        else float("nan"),
        "errors": result.non_2xx + result.socket_errors,
    }


def scenario_commits(plan: Plan, args: argparse.Namespace) -> Section:
    """Scenario 5a: bench.compare on the two checkouts, as it is."""
    section = Section("5a. The mix with no replica, before and after the replica commit")
    out = Path(tempfile.mkdtemp(prefix="bench-replicas-")) / "compare.md"
    argv = [
        "--a",
        str(args.a),
        "--b",
        str(args.b),
        "--levels",
        plan.commits_levels,
        "--rounds",
        str(plan.commits_rounds),
        "--duration",
        str(plan.commits_s),
        "--out",
        str(out),
    ]
    code = compare.main(argv)
    if code != 0:
        section.check("bench.compare", "completes", f"exit {code}", False)
        return section
    text = out.read_text()
    section.lines += [
        f"A: {host.revision(args.a)}, B: {host.revision(args.b)}; no DATABASE_REPLICA_URLS on "
        "either side. bench.compare's report as it printed it:",
        "",
        re.sub(r"^#{2,3} ", "#### ", text, flags=re.MULTILINE),
    ]
    for level, ratio in _compare_medians(text):
        section.check(
            f"req/s after / before, {level} connections (median B/A)", "none stated", ratio, None
        )
    return section


def _compare_medians(text: str) -> list[tuple[str, str]]:
    """The median B/A req/s of each level of a bench.compare report."""
    found, level = [], ""
    for line in text.splitlines():
        if line.startswith("### ") and "connections" in line:
            level = line.removeprefix("### ").split()[0]
        if line.startswith("| **median**"):
            found.append((level, line.split("|")[7].strip()))
    return found


# The report and the command.


def report(
    sections: list[Section], args: argparse.Namespace, plan: Plan, started: str, facts: dict
) -> str:
    """The Markdown report: how it was measured, every target in one table, then each
    scenario's figures."""
    command = "python -m bench.replicas " + shlex.join(args.argv)
    lines = [
        "# Reads on streaming replicas: issue 26's targets, measured",
        "",
        f"Measured {started} with `{command}` from the repository root at commit "
        f"{host.revision(servers.ROOT)}; written by bench/replicas.py, whose docstring says "
        "what each scenario does.",
        "",
        "**Everything ran on one machine of 2 cores, shared by the load generator (this "
        "script's gevent clients, or wrk), the service's instances, and PostgreSQL (a primary "
        "and two streaming replicas)**, and with other sessions' work (\"others' load\" beside "
        "each scenario): figures are this machine's on that day, to compare with each other, "
        "not with other machines.",
        "",
        "## Set-up",
        "",
        f"- machine: {host.describe('')['CPU']}, {host.describe('')['memory']}; "
        f"{facts.get('postgres', 'PostgreSQL')}; Python {host.describe('')['Python']}",
        "- load generator: this script's clients (Python greenlets, http.client, one process) "
        "for scenarios 1-4, wrk for 5",
        "- PostgreSQL: a throwaway primary (deploy/localpg.py: fsync off, synchronous_commit "
        "on, as `deploy.localpg --replicas` sets it) and two streaming replicas of it "
        "(`pg_basebackup -R`, hot standby, PostgreSQL's defaults otherwise), on 127.0.0.1; "
        f"{plan.users:,} users seeded",
        f"- service: {INSTANCES} instances (scenarios 1-4), each `gunicorn -c gunicorn.conf.py` "
        f"with WEB_CONCURRENCY={servers.WORKERS}, DB_POOL_MAX={servers.POOL_PER_WORKER}, "
        f"DB_POOL_TIMEOUT={servers.POOL_TIMEOUT_S}, APP_INSTANCES={INSTANCES}, "
        "DATABASE_REPLICA_URLS naming both replicas, every REPLICA_* setting at its default "
        "(poll 25 ms, max lag 10 s, catch-up wait 0.1 s)",
        "- settings passed through from the environment: "
        + (", ".join(f"{k}={v}" for k, v in servers.passed_through(os.environ).items()) or "none"),
        "- which server ran a read: the access line's `db_server`, which only the request that "
        "sent its batch's statement carries; a read that joined a batch is attributed by the "
        'token it got, which is its batch\'s position (bench/clients.py); "server unknown" '
        "counts the reads left, and shares are of the reads whose server is known",
        "",
        "## Targets",
        "",
        "| scenario | measure | target | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    sections = sorted(sections, key=lambda section: section.title)
    for section in sections:
        for what, target, measured, met in section.checks:
            verdict = "—" if met is None else ("PASS" if met else "**MISS**")
            lines.append(
                f"| {section.title.split('.')[0]} | {what} | {target} | {measured} | {verdict} |"
            )
    for section in sections:
        lines += ["", f"## {section.title}", "", *section.lines]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios; 0 when each ran to its end (whatever it measured), 1 when one
    failed to run or found a bug, 2 on bad usage."""
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    if "commits" in args.scenarios and (args.a is None or args.b is None):
        print(
            "bench.replicas: the commits scenario needs --a and --b (two checkouts)",
            file=sys.stderr,
        )
        return 2
    host.raise_open_files(max(plan.routing_levels) + 2048)
    servers.stop_everything_on_sigterm()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    logs = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    print(f"bench.replicas: servers' logs in {logs}", flush=True)
    sections: list[Section] = []
    facts: dict[str, str] = {}
    try:
        found = _run(args, plan, logs, sections, facts)
    except (RuntimeError, OSError, psycopg2.Error, wrk.WrkError) as exc:
        print(f"bench.replicas: failed: {exc}", file=sys.stderr)
        found = True
    text = report(sections, args, plan, started, facts)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text)
        print(f"bench.replicas: wrote {args.out}")
    return 1 if found else 0


def _run(
    args: argparse.Namespace, plan: Plan, logs: Path, sections: list[Section], facts: dict
) -> bool:
    """Every scenario asked for, into `sections` (and what the report says of the set-up
    into `facts`); whether one found a bug."""
    found = False
    wanted = [name for name in SCENARIOS if name in args.scenarios]
    with ExitStack() as stack:
        if set(wanted) & {"stale", "mix", "kill", "spike", "routing"}:
            cluster = Cluster(plan.users)
            stack.callback(cluster.stop)
            cluster.start()
            facts["postgres"] = cluster.version()
            print(
                f"bench.replicas: primary on {cluster.primary.port}, replicas on "
                f"{[r.port for r in cluster.replicas]}",
                flush=True,
            )
        pair = [name for name in wanted if name in ("stale", "mix", "kill", "spike")]
        if pair:
            instances: list[compare.Server] = []
            with ExitStack() as running:
                for name in "AB":
                    server = start_service(
                        name, cluster, logs, cluster.members(cluster.replicas), INSTANCES
                    )
                    running.callback(server.stop)
                    instances.append(server)
                for name in pair:
                    section, bug = SCENARIO_RUNS[name](plan, cluster, instances)
                    sections.append(section)
                    found = found or bug
                    print(f"bench.replicas: {name} done", flush=True)
        if "routing" in wanted:
            sections.append(scenario_routing(plan, cluster, logs))
    if "commits" in wanted:
        sections.append(scenario_commits(plan, args))
    return found


SCENARIO_RUNS: dict[str, Callable] = {
    "stale": scenario_stale,
    "mix": scenario_mix,
    "kill": scenario_kill,
    "spike": scenario_spike,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicas", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of each scenario")
    parser.add_argument("--a", type=Path, help="commits: the checkout before (bench.compare's A)")
    parser.add_argument("--b", type=Path, help="commits: the checkout after (bench.compare's B)")
    parser.add_argument(
        "--out", type=Path, help="the report (default bench/REPLICAS.md, none with --quick)"
    )
    args = parser.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = HERE / "REPLICAS.md"
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def _scenarios(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}, not {unknown}")
    return names


if __name__ == "__main__":
    sys.exit(main())
