"""compose.yaml with real containers: PostgreSQL, PgBouncer in transaction mode and three
replicas of the service (`--scale app=3`), each published on a port of its own on 127.0.0.1.

The images are built from the repository (the service's Dockerfile, deploy/postgres and
deploy/pgbouncer, on Debian's packages), so no registry is needed; the engine and the base come
from the `docker_engine` fixture. The stack is a compose project of its own, taken down with
its volume at the end.
"""

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import gevent
import pytest
from gunicorn_proc import request, wait_until

from deploy.localdocker import docker

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 3
POOL_SIZE = 10  # deploy/compose/pgbouncer.ini's default_pool_size
HEALTHY_WITHIN_S = 120.0

pytestmark = pytest.mark.container


@dataclass
class Stack:
    project: str
    ports: dict[str, int]  # app container id -> its port on 127.0.0.1

    def compose(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker-compose", "-p", self.project, "-f", str(REPO / "compose.yaml"), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def server_connections(self) -> int:
        """The app's connections PostgreSQL has open now, as its superuser sees them."""
        done = self.compose(
            "exec", "-T", "-e", "PGPASSWORD=compose-superuser-password", "db",
            "psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
        )  # fmt: skip
        return int(done.stdout.strip())


@pytest.fixture(scope="module")
def stack(docker_engine):
    stack = Stack(f"servicetest{secrets.token_hex(3)}", {})
    try:
        stack.compose("up", "-d", "--build", "--scale", f"app={REPLICAS}", timeout=1500)
        ids = stack.compose("ps", "-q", "app").stdout.split()
        assert len(ids) == REPLICAS
        wait_until(
            lambda: all(health(i) == "healthy" for i in ids),
            HEALTHY_WITHIN_S,
            "every replica's HEALTHCHECK",
            every=1.0,
        )
        for container in ids:
            published = docker("port", container, "8000/tcp").stdout.split()[0]
            host, _, port = published.rpartition(":")
            assert host == "127.0.0.1"
            stack.ports[container] = int(port)
        yield stack
    finally:
        logs = subprocess.run(
            ["docker-compose", "-p", stack.project, "-f", str(REPO / "compose.yaml"), "logs"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "Traceback" in logs.stdout:
            print(logs.stdout[-5000:])
        stack.compose("down", "--volumes", "--remove-orphans", timeout=120)


def health(container: str) -> str:
    return docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()


def test_three_replicas_serve_through_pgbouncer_within_the_connection_budget(stack):
    ports = list(stack.ports.values())
    tag = secrets.token_hex(4)
    created = []
    for i, port in enumerate(ports):
        user = {"name": f"replica {i}", "email": f"compose-{tag}-{i}@example.com"}
        reply = request(port, "POST", "/users", user)
        assert reply.status == 201, reply.body
        created.append(reply.headers["Location"])
    # Each replica reads what every other wrote: one database behind them all.
    for port in ports:
        for location in created:
            assert request(port, "GET", location).status == 200

    # 30 clients at once on each replica: the pools hold up to 3 x 2 x 5 = 30 connections to
    # PgBouncer, and the server sees PgBouncer's pool alone.
    def client(port: int) -> list[int]:
        return [request(port, "GET", created[0], timeout=20).status for _ in range(10)]

    seen = []
    clients = [gevent.spawn(client, port) for port in ports for _ in range(30)]

    def sample() -> bool:
        seen.append(stack.server_connections())
        return all(c.ready() for c in clients)

    wait_until(sample, 120, "the clients to finish", every=0.2)
    assert all(c.successful() for c in clients)
    assert {status for c in clients for status in c.value} == {200}
    assert 0 < max(seen) <= POOL_SIZE


def test_one_replica_killed_leaves_the_others_serving(stack):
    victim, *others = stack.ports
    docker("kill", victim)
    for container in others:
        for _ in range(10):
            assert request(stack.ports[container], "GET", "/users?limit=1").status == 200
    with pytest.raises(OSError):
        request(stack.ports[victim], "GET", "/healthz", timeout=2)
