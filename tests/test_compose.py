"""compose.yaml with real containers: HAProxy (`lb`), the stack's one entry point, in front of
three instances of the service (`--scale app=3`), which write through PgBouncer in transaction
mode to PostgreSQL (`db`) and read on its streaming replica (`db-replica`).

The images are built from the repository (the service's Dockerfile, deploy/postgres,
deploy/pgbouncer and deploy/haproxy, on Debian's packages), so no registry is needed; the engine
and the base come from the `docker_engine` fixture. The stack is a compose project of its own,
built and started once for the module and taken down with its volumes at the end. Every
request goes through the balancer on 127.0.0.1: the instances are not published.
"""

import http.client
import json
import re
import secrets
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import gevent
import pytest
import yaml
from gevent.event import Event
from gunicorn_proc import HOST, request, scrape_metrics, wait_until
from loadgen import join_all

from config import load_settings
from deploy import rolling
from deploy.localdocker import docker

INSTANCES = 3
POOL_SIZE = 10  # deploy/compose/pgbouncer.ini's default_pool_size
# The replica's label in /readyz and /metrics: its name resolves to one address, so the label
# is "db-replica/<address>:5432" (service/db/replicas.py's resolve_url).
REPLICA = re.compile(r"db-replica/[0-9.]+:5432")
HEALTHY_WITHIN_S = 120.0
ROLL_LOAD_CLIENTS = 20
ROLL_LOAD_LIMIT_S = 90.0

pytestmark = pytest.mark.container


@dataclass(frozen=True)
class Stack(rolling.Stack):
    port: int = 0  # the balancer's, on 127.0.0.1

    def server_connections(self) -> int:
        """The app's connections the primary has open now, as its superuser sees them."""
        done = self.compose(
            "exec", "-T", "-e", "PGPASSWORD=compose-superuser-password", "db",
            "psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
        )  # fmt: skip
        return int(done.stdout.strip())


@pytest.fixture(scope="module")
def stack(docker_engine):
    stack = Stack(f"servicetest{secrets.token_hex(3)}")
    try:
        stack.compose("up", "-d", "--build", "--scale", f"app={INSTANCES}", timeout=1500)
        instances = stack.instances()
        assert len(instances) == INSTANCES
        wait_until(
            lambda: all(stack.in_rotation(container) for container in instances),
            HEALTHY_WITHIN_S,
            "every instance in the balancer's rotation",
            every=0.5,
        )
        published = stack.compose("port", "lb", "8080").stdout.strip()
        host, _, port = published.rpartition(":")
        assert host == HOST
        yield replace(stack, port=int(port))
    finally:
        logs = subprocess.run(
            ["docker-compose", "-p", stack.project, "-f", str(stack.compose_file), "logs"],
            cwd=stack.compose_file.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "Traceback" in logs.stdout:
            print(logs.stdout[-5000:])
        stack.compose("down", "--volumes", "--remove-orphans", timeout=120)


def haproxy_seconds(value: str) -> float:
    """A time in HAProxy's configuration: milliseconds unless it says its unit."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 0.001}[unit]


def test_the_balancer_drops_a_draining_instance_before_its_drain_ends():
    """From its SIGTERM an instance answers /readyz with 503 for DRAIN_SECONDS while it still
    serves, then stops accepting. The balancer must have taken it out of rotation by then: its
    next check comes within one interval, and `fall` failed checks, each given at most
    `timeout check`, take it out."""
    config = (rolling.REPO / "deploy" / "compose" / "haproxy.cfg").read_text()
    (server,) = re.findall(r"^\s*server-template .*$", config, re.MULTILINE)
    options = server.split()
    inter = haproxy_seconds(options[options.index("inter") + 1])
    fall = int(options[options.index("fall") + 1])
    (check_timeout,) = re.findall(r"^\s*timeout check (\S+)", config, re.MULTILINE)
    compose = yaml.safe_load(rolling.COMPOSE_FILE.read_text())
    settings = load_settings(compose["services"]["app"]["environment"])
    assert fall * inter + haproxy_seconds(check_timeout) < settings.drain_seconds


def header(reply, name: str) -> str | None:
    return {key.lower(): value for key, value in reply.headers.items()}.get(name.lower())


def test_a_write_through_the_balancer_is_read_back_with_its_token_on_the_replica(stack):
    user = {"name": "through the balancer", "email": f"lb-{secrets.token_hex(4)}@example.com"}
    created = request(stack.port, "POST", "/users", user)
    assert created.status == 201, created.body
    location, token = header(created, "Location"), header(created, "Consistency-Token")
    assert token
    with_token = {"Consistency-Token": token}
    # Round robin: each instance reads it, wherever the write ran.
    for _ in range(2 * INSTANCES):
        read = request(stack.port, "GET", location, headers=with_token)
        assert read.status == 200, read.body
        assert read.json == created.json

    def replica_up_on_every_instance() -> bool:
        states = [request(stack.port, "GET", "/readyz").json for _ in range(INSTANCES)]
        return all(
            [r["state"] for name, r in s["replicas"].items() if REPLICA.fullmatch(name)] == ["up"]
            for s in states
        )

    wait_until(replica_up_on_every_instance, 30, "every instance to see the replica up", every=0.5)

    def read_on_the_replica() -> bool:
        assert request(stack.port, "GET", location, headers=with_token).status == 200
        samples = scrape_metrics(stack.port)
        return any(
            name == "db_reads_total" and REPLICA.fullmatch(dict(labels)["server"]) and value > 0
            for (name, labels), value in samples.items()
        )

    wait_until(read_on_the_replica, 30, "a read on the replica", every=0.2)


def test_instances_serve_through_pgbouncer_within_the_connection_budget(stack):
    tag = secrets.token_hex(4)
    created = []
    for i in range(INSTANCES):
        user = {"name": f"instance {i}", "email": f"compose-{tag}-{i}@example.com"}
        reply = request(stack.port, "POST", "/users", user)
        assert reply.status == 201, reply.body
        created.append(header(reply, "Location"))

    # 90 clients at once: the pools hold up to 3 x 2 x 5 = 30 connections to PgBouncer, and the
    # primary sees PgBouncer's pool alone.
    def client() -> list[int]:
        return [request(stack.port, "GET", created[0], timeout=20).status for _ in range(10)]

    seen = []
    clients = [gevent.spawn(client) for _ in range(30 * INSTANCES)]

    def sample() -> bool:
        seen.append(stack.server_connections())
        return all(c.ready() for c in clients)

    wait_until(sample, 120, "the clients to finish", every=0.2)
    assert all(c.successful() for c in clients)
    assert {status for c in clients for status in c.value} == {200}
    assert 0 < max(seen) <= POOL_SIZE


@dataclass
class Tally:
    """What one keep-alive client saw: the statuses, the errors (no response at all), and how
    many connections it opened."""

    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    connections: int = 0


def keep_alive_client(port: int, stop: Event, limit_s: float) -> Tally:
    """Create a user, read it back with its token, read a page, again and again on one
    keep-alive connection until `stop` or `limit_s`. Nothing is retried: a request that gets
    no response is an error, and the next one opens a new connection."""
    tally = Tally()
    conn = http.client.HTTPConnection(HOST, port, timeout=20)
    deadline = time.monotonic() + limit_s
    token = ""

    def exchange(method: str, path: str, body: object = None) -> http.client.HTTPResponse:
        if conn.sock is None:
            tally.connections += 1
        headers = {"Consistency-Token": token} if token else {}
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body)
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        response.read()
        tally.statuses[response.status] += 1
        return response

    try:
        while not stop.is_set() and time.monotonic() < deadline:
            email = f"roll-{secrets.token_hex(6)}@example.com"
            try:
                created = exchange("POST", "/users", {"name": "roll", "email": email})
                token = created.getheader("Consistency-Token") or token
                if created.status == 201:
                    exchange("GET", created.getheader("Location"))
                exchange("GET", "/users?limit=5")
            except (OSError, http.client.HTTPException) as exc:
                tally.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
    finally:
        conn.close()
    return tally


def test_a_rolling_restart_under_load_loses_no_request(stack):
    """Each instance in turn is replaced (deploy/rolling.py: a new one started and in rotation,
    then the old one stopped with SIGTERM and its drain) while 20 clients keep sending writes
    and reads on keep-alive connections through the balancer: every request is answered 2xx,
    none gets a socket error, and no client retries anything."""
    old = stack.instances()
    stop = Event()
    clients = [
        gevent.spawn(keep_alive_client, stack.port, stop, ROLL_LOAD_LIMIT_S)
        for _ in range(ROLL_LOAD_CLIENTS)
    ]
    started = time.monotonic()
    try:
        gevent.sleep(1.0)  # the load is under way before the first instance is replaced
        new = rolling.roll(stack, log=lambda line: None)
        rolled_s = time.monotonic() - started
        gevent.sleep(1.0)  # and goes on once the last one is gone
    finally:
        stop.set()
        tallies = join_all(clients, 30, "the keep-alive clients")
    assert rolled_s < ROLL_LOAD_LIMIT_S, "the load stopped before the roll had ended"
    statuses = sum((t.statuses for t in tallies), Counter())
    errors = [error for t in tallies for error in t.errors]
    print(f"rolled in {rolled_s:.1f} s under {sum(statuses.values())} requests: {statuses}")
    assert not errors, errors
    assert set(statuses) == {200, 201}, statuses
    assert statuses.total() > 20 * ROLL_LOAD_CLIENTS
    # The balancer kept each client's connection open through the roll.
    assert [t.connections for t in tallies] == [1] * ROLL_LOAD_CLIENTS
    assert len(new) == INSTANCES and not set(new) & set(old)
    assert all(stack.in_rotation(container) for container in new)


def test_one_instance_killed_leaves_the_others_serving_through_the_balancer(stack):
    """A crash, not a drain: the balancer retries the connections the dead instance refuses on
    the others, so clients see nothing until its checks take it out of rotation. Runs last: it
    leaves the stack one instance short."""
    victim, *others = stack.instances()
    gone = rolling.address(victim)
    docker("kill", victim)
    for _ in range(10 * INSTANCES):
        assert request(stack.port, "GET", "/users?limit=1", timeout=10).status == 200

    def out_of_rotation() -> bool:
        states = stack.balancer_states()
        return states.get(gone, ("gone",))[0] != "UP" and all(
            stack.in_rotation(container) for container in others
        )

    wait_until(out_of_rotation, 30, "the killed instance to leave the rotation", every=0.5)
