"""The image, built by a real Docker engine from the Dockerfile as it is, and run.

The engine and the base image come from the `docker_engine` fixture (tests/conftest.py). The
container runs with the host's network, so it reaches the session's PostgreSQL on 127.0.0.1
and serves on 127.0.0.1, read-only but for a tmpfs on /tmp.
"""

import json
import re
import secrets
import time
from pathlib import Path

import gevent
import pytest
from gunicorn_proc import MISSING_USER, free_port, request, wait_until
from pgutil import autocommit, backends, users_locked, waiting_on_lock

from deploy import localdocker
from deploy.localdocker import docker

REPO_ROOT = Path(__file__).resolve().parent.parent
HEALTHY_WITHIN_S = 60.0  # start period 30 s, checks every 10 s

pytestmark = pytest.mark.container


@pytest.fixture(scope="session")
def image(docker_engine, request):
    origin = docker_engine.base_origin
    tag = f"service:test-{secrets.token_hex(4)}"
    started = time.monotonic()
    docker("build", "-q", "-t", tag, str(REPO_ROOT), timeout=1200)
    took = time.monotonic() - started
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"image: built in {took:.0f} s on a {origin} {localdocker.BASE}; {size / 1e6:.0f} MB"
        )
    yield tag
    docker("rmi", "-f", tag, check=False)


class Container:
    def __init__(self, image: str, database_url: str, **env: str) -> None:
        self.name = f"service-test-{secrets.token_hex(4)}"
        self.port = free_port()
        env = {
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": "2",
            "DB_MAX_CONNECTIONS": "4",
            **env,
        }
        args = [f"--env={key}={value}" for key, value in env.items()]
        docker(
            "run", "--detach", f"--name={self.name}", "--network=host",
            "--read-only", "--tmpfs=/tmp", *args, image,
        )  # fmt: skip

    def inspect(self, template: str) -> str:
        return docker("inspect", "-f", template, self.name).stdout.strip()

    def health(self) -> str:
        return self.inspect("{{.State.Health.Status}}")

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def container(image, fresh_database):
    running = Container(image, fresh_database)
    try:
        wait_until(
            lambda: (
                running.health() == "healthy" or running.inspect("{{.State.Status}}") == "exited"
            ),
            HEALTHY_WITHIN_S,
            "the container's HEALTHCHECK to pass",
            every=0.5,
        )
        assert running.health() == "healthy", running.logs()
        yield running
    finally:
        running.remove()


def test_the_container_is_healthy_non_root_and_read_only(container):
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    assert docker("exec", container.name, "id", "-u").stdout.strip() == "10001"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    assert docker("exec", container.name, "touch", "/app/x", check=False).returncode != 0


def test_the_container_serves_the_users_api_against_postgresql(container):
    created = request(
        container.port,
        "POST",
        "/users",
        {"name": "From the image", "email": f"image-{secrets.token_hex(4)}@example.com"},
    )
    assert created.status == 201, created.body
    fetched = request(container.port, "GET", created.headers["Location"])
    assert fetched.status == 200 and fetched.json["name"] == "From the image"
    ready = request(container.port, "GET", "/readyz")
    assert ready.status == 200 and ready.json["pool"]["max"] == 2


def test_docker_stop_ends_it_with_0_within_graceful_timeout_and_no_server_connection_left(
    container, fresh_database
):
    assert request(container.port, "GET", "/users?limit=1").status == 200
    with autocommit(fresh_database) as cur:
        assert backends(cur, "service")
        started = time.monotonic()
        docker("stop", "--time=40", container.name, timeout=60)
        took = time.monotonic() - started
        assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()
        assert took < 25, f"took {took:.1f} s"
        assert backends(cur, "service") == []


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def test_the_image_holds_the_runtime_lock_and_nothing_else(image):
    listed = docker("run", "--rm", "--entrypoint=pip", image, "list", "--format=json").stdout
    installed = {normalized(entry["name"]) for entry in json.loads(listed)}
    locked = {
        normalized(line.split("==")[0])
        for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
        and "sys_platform == 'win32'" not in line
    }  # fmt: skip
    assert installed - {"pip", "setuptools"} == locked
    imported = docker(
        "run", "--rm", "--entrypoint=python", image, "-c", "import pytest", check=False
    )  # fmt: skip
    assert "No module named 'pytest'" in imported.stderr


def test_docker_stop_drains_readyz_503_at_once_and_every_request_in_flight_is_answered(
    image, fresh_database
):
    running = Container(image, fresh_database, DRAIN_SECONDS="2")
    try:
        wait_until(lambda: running.health() == "healthy", HEALTHY_WITHIN_S, "healthy", every=0.5)
        with autocommit(fresh_database) as cur:
            with users_locked(fresh_database):
                # Deletes of a user that does not exist (404): each holds a connection of its own.
                in_flight = [
                    gevent.spawn(request, running.port, "DELETE", MISSING_USER, timeout=30)
                    for _ in range(8)
                ]
                wait_until(lambda: waiting_on_lock(cur, "service") >= 2, 10, "requests on the lock")
                stop = gevent.spawn(docker, "stop", "--time=40", running.name, timeout=60)
                wait_until(
                    lambda: request(running.port, "GET", "/readyz", timeout=2).status == 503,
                    1.0,
                    "/readyz to answer 503",
                )
                assert request(running.port, "GET", "/healthz").status == 200  # still serving
            gevent.joinall(in_flight, timeout=30)
            assert [g.value.status if g.successful() else g.exception for g in in_flight] == [
                404
            ] * 8
            stop.join(timeout=60)
            assert stop.successful(), stop.exception
            assert running.inspect("{{.State.ExitCode}}") == "0", running.logs()
            assert backends(cur, "service") == []
    finally:
        running.remove()
