"""Token-carrying HTTP clients for bench/replicas.py, and what the service says about their
requests afterwards: the server each read ran on, and its /metrics.

A `Client` is one user of the service as docs/scaling.md describes it: it keeps a keep-alive
connection to each instance and the consistency token of its last response, presents that
token with every request (`Consistency-Token` header; no cookies), and records each request
it sends as a `Sent`, named by the `X-Request-ID` it sends. It runs in a greenlet: the process
must have been patched by gevent before `http.client` opened any socket.

Which server ran a read is known from the service's access line, `db_server`, but only for
the request whose greenlet sent its batch's statement (service/db/batch.py): a read that joined
a batch gets no `db_server`. Every read of one batch gets the same token, the position its
statement could have seen (service/db/replicas.py), so `servers_of` names a joined read's server
by the token it got, when the requests whose server is named and which got that token all ran
on one kind of server (the primary, or replicas); otherwise the read stays unknown.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service.api.consistency import HEADER, decode

HOST = "127.0.0.1"
TIMEOUT_S = 30.0
PRIMARY = "primary"
REPLICA = "replica"
REQUEST_ID = "X-Request-ID"


@dataclass
class Sent:
    """One request and how it ended: a status, or `error` (the exception's name) when no
    complete response came. Times are `time.monotonic()`."""

    request_id: str
    kind: str  # what the bench meant by it: create, rename, read, page, bare, ...
    instance: int
    started: float
    ended: float = 0.0
    status: int | None = None
    error: str | None = None
    token_sent: int = 0  # the position presented (0: none)
    token_got: int = 0  # the position of the response's token (0: none)
    stale: bool = False  # a read of the client's own write that did not show it
    after_write_s: float | None = None  # a read: since its client's last write was answered

    @property
    def failed(self) -> bool:
        """No complete response, or a 5xx."""
        return self.error is not None or (self.status is not None and self.status >= 500)


class Client:
    """One client: a keep-alive connection per instance port, opened on first use and again
    after a failure, and the token of its last response (presented unless `carry=False`).

    `send` never raises for the request itself: a request with no complete response within
    TIMEOUT_S is recorded with `error`, and its connection is closed.
    """

    def __init__(self, name: str, ports: list[int], log: list[Sent]):
        self.name = name
        self._ports = ports
        self._conns: list[http.client.HTTPConnection | None] = [None] * len(ports)
        self._log = log
        self._count = 0
        self.token = ""  # as the service wrote it
        self.wrote_at: float | None = None  # when its last write was answered

    def send(
        self,
        kind: str,
        instance: int,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        carry: bool = True,
        write: bool = False,
    ) -> tuple[Sent, dict | None]:
        """Send one request on `instance`'s connection; return its record and JSON body (None
        for none). A response's token becomes the client's when `carry` is set."""
        self._count += 1
        headers = {REQUEST_ID: f"{self.name}-{self._count}"}
        if carry and self.token:
            headers[HEADER] = self.token
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body)
        sent = Sent(headers[REQUEST_ID], kind, instance, time.monotonic())
        if HEADER in headers:
            sent.token_sent = decode(headers[HEADER]) or 0
        if not write and self.wrote_at is not None:
            sent.after_write_s = sent.started - self.wrote_at
        answer = None
        try:
            conn = self._conns[instance] or self._connect(instance)
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            sent.status = response.status
            token = response.getheader(HEADER)
            if raw and response.getheader("Content-Type", "").startswith("application/json"):
                answer = json.loads(raw)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            sent.error = type(exc).__name__
            self._close(instance)
            token = None
        sent.ended = time.monotonic()
        if token:
            sent.token_got = decode(token) or 0
            if carry:
                self.token = token
        if write and sent.status is not None and sent.status < 300:
            self.wrote_at = sent.ended
        self._log.append(sent)
        return sent, answer

    def close(self) -> None:
        for instance in range(len(self._conns)):
            self._close(instance)

    def _connect(self, instance: int) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(HOST, self._ports[instance], timeout=TIMEOUT_S)
        self._conns[instance] = conn
        return conn

    def _close(self, instance: int) -> None:
        conn, self._conns[instance] = self._conns[instance], None
        if conn is not None:
            conn.close()


def get(port: int, path: str, request_id: str | None = None) -> tuple[int, dict | None]:
    """One GET on a connection of its own (so that any worker may take it), closed after; its
    status and JSON body. Raises OSError or HTTPException when no complete response comes."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path, headers={REQUEST_ID: request_id} if request_id else {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def access_lines(log_paths: Iterable[Path], prefix: str) -> dict[str, dict]:
    """The service's access lines of the requests whose id starts with `prefix`, by id, in
    compact JSON (as the service writes them) or not."""
    found = {}
    for path in log_paths:
        with open(path, errors="replace") as log:
            for text in log:
                if prefix in text and '"service.access"' in text:
                    line = json.loads(text)
                    request_id = line.get("request_id") or ""
                    if line.get("logger") == "service.access" and request_id.startswith(prefix):
                        found[request_id] = line
    return found


def kind_of_server(db_server: str | None) -> str | None:
    """PRIMARY, REPLICA, or None for a line that names no server."""
    if db_server is None:
        return None
    return PRIMARY if db_server == PRIMARY else REPLICA


def servers_of(reads: list[Sent], lines: dict[str, dict]) -> dict[str, str | None]:
    """The kind of server (PRIMARY, REPLICA) each read ran on, by request id: as its access
    line names it, or else as the reads named there that got the same token ran (module
    docstring); None when that is unknown or ambiguous."""
    named: dict[str, str | None] = {
        r.request_id: kind_of_server(lines.get(r.request_id, {}).get("db_server")) for r in reads
    }
    by_token: dict[int, set[str]] = defaultdict(set)
    for read in reads:
        kind = named[read.request_id]
        if kind is not None and read.token_got:
            by_token[read.token_got].add(kind)
    for read in reads:
        if named[read.request_id] is None and len(by_token.get(read.token_got, ())) == 1:
            (named[read.request_id],) = by_token[read.token_got]
    return named


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of an instance's /metrics (every worker's, added up), by name and labels.
    Raises RuntimeError unless it answers 200."""
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"/metrics answered {response.status}")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def by_label(
    samples: dict[tuple[str, frozenset], float], name: str, label: str
) -> dict[str, float]:
    """The values of metric `name`, added up by the value of `label`."""
    found: dict[str, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample == name:
            found[dict(labels).get(label, "")] += value
    return dict(found)


def delta(
    after: dict[tuple[str, frozenset], float], before: dict[tuple[str, frozenset], float]
) -> dict[tuple[str, frozenset], float]:
    """What counters grew by between two scrapes (a sample new in `after` counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def added(
    *scrapes: dict[tuple[str, frozenset], float],
) -> dict[tuple[str, frozenset], float]:
    """Several instances' samples, added up."""
    total: dict[tuple[str, frozenset], float] = defaultdict(float)
    for samples in scrapes:
        for key, value in samples.items():
            total[key] += value
    return dict(total)
