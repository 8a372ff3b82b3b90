"""Reads on streaming replicas, through the production command, against a real primary and two
real streaming replicas (the `replicated` fixture): reads go to replicas, a client that carries
its consistency token never reads older data than it wrote or saw, across two instances and
at any apply delay, and a replica that is paused, killed or promoted leaves the rotation while
every request still succeeds.

Bounds are coarse (a replica out within 1.5 s of its fault, where the design gives 0.5 s and a
poll interval); bench/REPLICAS.md has what was measured (`python -m bench.replicas`).
"""

from __future__ import annotations

import http.client
import json
import secrets
import time

import gevent
import pytest
from gunicorn_proc import Gunicorn, request, scrape_metrics, wait_until
from openapi_schema_validator import OAS31Validator, validate

from service.api.consistency import HEADER, decode

pytestmark = pytest.mark.replicas


def label(replica) -> str:
    return f"127.0.0.1:{replica.port}"


def start(replicated, tmp_path, name: str, urls=None, **env) -> Gunicorn:
    return Gunicorn(
        replicated.database_url,
        tmp_path / f"{name}.log",
        WEB_CONCURRENCY="2",
        DATABASE_REPLICA_URLS=" ".join(urls if urls is not None else replicated.replica_urls),
        **env,
    )


def create(port: int, token: str | None = None):
    email = f"u{secrets.token_hex(6)}@example.com"
    headers = {HEADER: token} if token else {}
    reply = request(port, "POST", "/users", {"name": "R", "email": email}, headers=headers)
    assert reply.status == 201, reply
    return reply.json["id"], reply.headers[HEADER]


def read(port: int, user_id: int, token: str | None = None):
    headers = {HEADER: token} if token else {}
    return request(port, "GET", f"/users/{user_id}", headers=headers)


def replica_states(port: int) -> dict[str, str]:
    reply = request(port, "GET", "/readyz", timeout=5)
    return {name: r["state"] for name, r in reply.json.get("replicas", {}).items()}


def served_by(server: Gunicorn, request_id: str) -> str:
    def line():
        for text in server.log_lines(request_id):
            entry = json.loads(text)
            if entry.get("logger") == "service.access":
                return entry
        return None

    return wait_until(line, 10, f"the access line of {request_id}").get("db_server")


@pytest.fixture
def service(replicated, tmp_path):
    with start(replicated, tmp_path, "a") as server:
        wait_until(lambda: set(replica_states(server.port).values()) == {"up"}, 10, "replicas up")
        yield server


def test_reads_run_on_the_replicas_and_the_access_line_names_the_server(service, replicated):
    user_id, token = create(service.port)
    assert token.startswith("1:")
    servers = set()
    for i in range(40):
        reply = request(
            service.port,
            "GET",
            f"/users/{user_id}",
            headers={HEADER: token, "X-Request-ID": f"r{i}"},
        )
        assert reply.status == 200
        assert decode(reply.headers[HEADER]) >= decode(token)  # never back in time
        servers.add(served_by(service, f"r{i}"))
    assert servers <= {label(r) for r in replicated.replicas} | {"primary"}
    assert servers & {label(r) for r in replicated.replicas}, servers
    reads = scrape_metrics(service.port)
    on_replicas = sum(
        value
        for (name, labels), value in reads.items()
        if name == "db_reads_total" and dict(labels)["server"] != "primary"
    )
    assert on_replicas >= 30


def test_readyz_names_each_replica_as_the_openapi_document_says(service, replicated):
    document = request(service.port, "GET", "/openapi.json").json
    ready = request(service.port, "GET", "/readyz").json
    assert set(ready["replicas"]) == {label(r) for r in replicated.replicas}
    answer = document["paths"]["/readyz"]["get"]["responses"]["200"]
    schema = answer["content"]["application/json"]["schema"]
    validate(ready, {**schema, "components": document["components"]}, cls=OAS31Validator)


def test_every_read_of_a_batch_names_its_server_in_the_access_line(service, replicated):
    user_id, token = create(service.port)
    replies = gevent.joinall(
        [
            gevent.spawn(
                request,
                service.port,
                "GET",
                f"/users/{user_id}",
                headers={HEADER: token, "X-Request-ID": f"batch{i}"},
            )
            for i in range(40)
        ],
        raise_error=True,
    )
    assert {r.value.status for r in replies} == {200}
    servers = {served_by(service, f"batch{i}") for i in range(40)}
    assert None not in servers
    assert servers <= {label(r) for r in replicated.replicas} | {"primary"}


def metric_sum(port: int, name: str, **labels: str) -> float:
    return sum(
        value
        for (found, got), value in scrape_metrics(port).items()
        if found == name and labels.items() <= dict(got).items()
    )


def test_during_a_lag_spike_a_read_ahead_of_every_replica_goes_to_the_primary_at_once(
    service, replicated
):
    """Replicas that lag by more than the catch-up wait cannot replay a fresh write within it:
    the read goes to the primary without waiting."""
    for replica in replicated.replicas:
        replica.set_apply_delay(3)
    try:
        user_id, token = create(service.port)

        def lagging():
            replicas = request(service.port, "GET", "/readyz").json["replicas"]
            return all(r["lag_seconds"] > 0.3 for r in replicas.values())

        wait_until(lagging, 5, "both replicas lagging past the catch-up wait")
        waits = metric_sum(service.port, "db_read_catch_up_wait_seconds_count")
        behind = metric_sum(service.port, "db_read_fallbacks_total", reason="behind")
        assert read(service.port, user_id, token).status == 200
        assert metric_sum(service.port, "db_read_catch_up_wait_seconds_count") == waits
        assert metric_sum(service.port, "db_read_fallbacks_total", reason="behind") == behind + 1
    finally:
        for replica in replicated.replicas:
            replica.set_apply_delay(0)


def test_a_browser_carries_the_token_in_a_cookie(service):
    reply = request(service.port, "POST", "/users", {"name": "C", "email": "c@example.com"})
    cookie = reply.headers["Set-Cookie"]
    assert cookie.startswith("consistency_token=1:") and "HttpOnly" in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    again = request(
        service.port, "GET", f"/users/{reply.json['id']}", headers={"Cookie": cookie.split(";")[0]}
    )
    assert again.status == 200
    assert decode(again.headers[HEADER]) >= decode(token)


def test_a_request_refused_before_its_token_is_read_hands_no_token(service):
    """On one keep-alive connection, a read that hands a token, then a request that a hook
    before the token's refuses (HTTP/1.1 with no Host: 400): the refusal carries no token,
    neither its own nor the read's before it."""
    user_id, _ = create(service.port)
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        conn.request("GET", f"/users/{user_id}")
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and decode(first.getheader(HEADER)) is not None
        conn.putrequest("GET", f"/users/{user_id}", skip_host=True)
        conn.endheaders()
        refused = conn.getresponse()
        assert refused.status == 400
        assert json.loads(refused.read())["error"]["code"] == "missing_host"
        assert refused.getheader(HEADER) is None and refused.getheader("Set-Cookie") is None
    finally:
        conn.close()


@pytest.mark.parametrize("delay_s", [0.05, 0.5])
def test_a_token_carried_to_another_instance_always_reads_the_write(replicated, tmp_path, delay_s):
    """Write on one instance, read at once on the other with the token, under an apply delay on
    both replicas: never a 404. Without the token the same read may miss it (a stale read the
    token prevents)."""
    for replica in replicated.replicas:
        replica.set_apply_delay(delay_s)
    try:
        with start(replicated, tmp_path, "a") as a, start(replicated, tmp_path, "b") as b:
            stale_without_token = 0
            for i in range(60):
                writer, reader = (a, b) if i % 2 else (b, a)
                user_id, token = create(writer.port)
                if read(reader.port, user_id).status == 404:
                    stale_without_token += 1
                assert read(reader.port, user_id, token).status == 200
            assert stale_without_token > 0  # the delay is real, and the token is what helps
    finally:
        for replica in replicated.replicas:
            replica.set_apply_delay(0)


def test_an_unreadable_token_reads_on_the_primary_and_is_counted(service):
    user_id, _ = create(service.port)
    for garbled in ("nonsense", "2:0/1", "1:zz/1", "1:FFFFFFFFF/0"):
        reply = read(service.port, user_id, garbled)
        assert reply.status == 200, (garbled, reply)
    metrics = scrape_metrics(service.port)
    assert metrics[("consistency_tokens_unreadable_total", frozenset())] == 4


def test_a_token_far_ahead_of_the_primary_reads_there_at_once(service):
    user_id, _ = create(service.port)
    started = time.monotonic()
    reply = read(service.port, user_id, "1:FFFFFFFF/0")
    assert reply.status == 200
    assert time.monotonic() - started < 1.0  # no catch-up wait for a position nobody wrote


def test_a_paused_replica_leaves_the_rotation_and_rejoins_while_reads_succeed(service, replicated):
    paused = replicated.replicas[0]
    user_id, token = create(service.port)
    paused.pause()
    started = time.monotonic()
    try:
        wait_until(
            lambda: replica_states(service.port)[label(paused)] == "down",
            5,
            "the paused replica out of rotation",
        )
        out_after = time.monotonic() - started
        for _ in range(20):
            assert read(service.port, user_id, token).status == 200
    finally:
        paused.resume()
    wait_until(lambda: replica_states(service.port)[label(paused)] == "up", 10, "the replica back")
    assert out_after < 1.5


def test_a_killed_replica_costs_no_request_and_rejoins(replicated, tmp_path):
    own = replicated.primary.start_replica()
    try:
        own.catch_up()
        url = own.dsn(replicated.dbname)
        with start(replicated, tmp_path, "a", urls=[url]) as server:
            wait_until(lambda: replica_states(server.port) == {label(own): "up"}, 10, "up")
            user_id, token = create(server.port)
            failures = []
            stop = gevent.event.Event()

            def reader():
                while not stop.is_set():
                    reply = read(server.port, user_id, token)
                    if reply.status != 200:
                        failures.append(reply.status)

            readers = [gevent.spawn(reader) for _ in range(4)]
            gevent.sleep(0.3)
            own.halt("immediate")
            killed = time.monotonic()
            wait_until(
                lambda: replica_states(server.port)[label(own)] == "down", 5, "the replica out"
            )
            out_after = time.monotonic() - killed
            gevent.sleep(0.3)
            own.launch()
            wait_until(lambda: replica_states(server.port)[label(own)] == "up", 10, "back")
            stop.set()
            gevent.joinall(readers, timeout=10, raise_error=True)
            assert failures == []
            assert out_after < 1.5
    finally:
        own.stop()


def test_a_promoted_replica_leaves_the_rotation(replicated, tmp_path):
    own = replicated.primary.start_replica()
    try:
        own.catch_up()
        with start(replicated, tmp_path, "a", urls=[own.dsn(replicated.dbname)]) as server:
            wait_until(lambda: replica_states(server.port) == {label(own): "up"}, 10, "up")
            own.promote()
            wait_until(
                lambda: replica_states(server.port)[label(own)] == "promoted", 2, "promoted out"
            )
            user_id, token = create(server.port)
            assert read(server.port, user_id, token).status == 200
    finally:
        own.stop()
