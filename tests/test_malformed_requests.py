"""Malformed requests, sent as raw bytes to the production command, are the client's fault:
each gets a 4xx with the JSON error shape, no traceback reaches the log, and nothing is stored.

Three classes (issue 25): a chunked body whose framing is broken (400, or 431 for a trailer
section over gunicorn's limit), with the connection closed after the answer since where the
next request would start is unknown; a body with a content coding (415 with Accept-Encoding);
an HTTP/1.1 request with no Host field, or with two (400, RFC 9112 3.2). Every body is a valid
user to create, so that a server that ignored the framing or the coding would store it.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import zlib

import pytest
from gunicorn_proc import HOST, Gunicorn, read_response, request
from pgutil import seed_users

USER = b'{"name": "Ann", "email": "ann@example.com"}'
HEAD = (
    b"POST /users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
SIZE = b"%x" % len(USER)


@pytest.fixture(scope="module")
def server(database_url, tmp_path_factory):
    with Gunicorn(
        database_url,
        tmp_path_factory.mktemp("malformed") / "gunicorn.log",
        WEB_CONCURRENCY="1",
        HTTP_BODY_TIMEOUT="3",
    ) as server:
        yield server


@pytest.fixture
def log_since(server):
    """The server log written since the test started."""
    start = len(server.log)
    return lambda: server.log[start:]


def exchange(
    port: int, raw: bytes, *, half_close: bool = False
) -> tuple[bytes, bytes, bytes, bool]:
    """Send `raw` on a fresh connection (then shut down our sending side, with `half_close`);
    returns the response's status line, its header fields, its body, and whether the server
    closed the connection after that one response."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        head, body = read_response(sock)
        status, _, fields = head.partition(b"\r\n")
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return status, fields, body, closed


def assert_refused_cleanly(admin, log: str) -> None:
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0
    assert "Traceback" not in log
    assert '"level": "ERROR"' not in log


FRAMING = {
    "size not hex": HEAD + b"zz\r\n" + USER + b"\r\n0\r\n\r\n",
    "negative size": HEAD + b"-5\r\n" + USER + b"\r\n0\r\n\r\n",
    "size with 0x": HEAD + b"0x" + SIZE + b"\r\n" + USER + b"\r\n0\r\n\r\n",
    "size with a trailing space": HEAD + SIZE + b" \r\n" + USER + b"\r\n0\r\n\r\n",
    "size with a leading space": HEAD + b" " + SIZE + b"\r\n" + USER + b"\r\n0\r\n\r\n",
    "empty size": HEAD + b"\r\n" + USER + b"\r\n0\r\n\r\n",
    "size line with no end, over the limit": HEAD + b"0" * 20000,
    "data longer than its size": HEAD + b"5\r\n" + USER + b"\r\n0\r\n\r\n",
    "data shorter than its size": HEAD + b"%x\r\n" % (len(USER) + 2) + USER + b"\r\n0\r\n\r\n",
    "bare LF after the size": HEAD + SIZE + b"\n" + USER + b"\r\n0\r\n\r\n",
    "bare LF after the data": HEAD + SIZE + b"\r\n" + USER + b"\n0\r\n\r\n",
    "bare CR in an extension": HEAD + SIZE + b";a=b\rc\r\n" + USER + b"\r\n0\r\n\r\n",
    "extension with no name": HEAD + SIZE + b";=x\r\n" + USER + b"\r\n0\r\n\r\n",
    "extension with a bad value": HEAD + SIZE + b';a="x\r\n' + USER + b"\r\n0\r\n\r\n",
    "Content-Length as a trailer": HEAD
    + SIZE
    + b"\r\n"
    + USER
    + b"\r\n0\r\nContent-Length: 5\r\n\r\n",
    "Transfer-Encoding as a trailer": HEAD
    + SIZE
    + b"\r\n"
    + USER
    + b"\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "Host as a trailer": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\nHost: other\r\n\r\n",
    "trailer name with a space": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\nX-A : b\r\n\r\n",
    "trailer folded": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\nX-A: b\r\n c\r\n\r\n",
    "trailer with a bare LF": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\nX-A: b\nX-B: c\r\n\r\n",
    "trailer with a NUL": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\nX-A: b\x00c\r\n\r\n",
}

# Framing that ends with the client's sending side shut: the body can never be completed.
CUT_SHORT = {
    "no last chunk": HEAD + SIZE + b"\r\n" + USER + b"\r\n",
    "data cut inside a chunk": HEAD + SIZE + b"\r\n" + USER[:10],
    "no end of the trailer section": HEAD + SIZE + b"\r\n" + USER + b"\r\n0\r\n",
    "a huge size and little data": HEAD + b"ffffffffffffffff\r\n" + USER,
}

# gunicorn's limit on a trailer section is the one on a head: 100 fields, and 100 fields'
# worth of bytes (8 KiB each, about 800 KiB).
TOO_LARGE = {
    "trailer section over the limit": HEAD
    + SIZE
    + b"\r\n"
    + USER
    + b"\r\n0\r\nX-Pad: "
    + b"a" * (900 * 1024),
    "101 trailer fields": HEAD
    + SIZE
    + b"\r\n"
    + USER
    + b"\r\n0\r\n"
    + b"".join(b"X-%d: a\r\n" % i for i in range(101))
    + b"\r\n",
}


@pytest.mark.parametrize("raw", FRAMING.values(), ids=FRAMING.keys())
def test_a_chunked_body_with_broken_framing_is_400_and_closes_the_connection(
    server, admin, log_since, raw
):
    status, _, body, closed = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 400 "), (status, body)
    assert json.loads(body)["error"]["code"] == "malformed_body"
    assert closed, "the connection stayed open after a body whose end is unknown"
    assert_refused_cleanly(admin, log_since())
    assert request(server.port, "GET", "/healthz").status == 200


@pytest.mark.parametrize("raw", CUT_SHORT.values(), ids=CUT_SHORT.keys())
def test_a_chunked_body_cut_short_by_the_client_is_400(server, admin, log_since, raw):
    status, _, body, closed = exchange(server.port, raw, half_close=True)
    assert status.startswith(b"HTTP/1.1 400 "), (status, body)
    assert json.loads(body)["error"]["code"] in ("malformed_body", "bad_request")
    assert closed
    assert_refused_cleanly(admin, log_since())


@pytest.mark.parametrize("raw", TOO_LARGE.values(), ids=TOO_LARGE.keys())
def test_a_trailer_section_over_the_limit_is_431(server, admin, log_since, raw):
    status, _, body, closed = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 431 "), (status, body)
    assert json.loads(body)["error"]["code"] == "trailer_section_too_large"
    assert closed
    assert_refused_cleanly(admin, log_since())


def test_well_formed_chunks_with_extensions_and_trailers_are_stored(server, admin, log_since):
    """The control: framing as RFC 9112 allows it is read, not refused."""
    raw = (
        HEAD
        + b"5;name=value\r\n"
        + USER[:5]
        + b"\r\n"
        + b'%x ; quoted="a b"\r\n' % (len(USER) - 5)
        + USER[5:]
        + b"\r\n0\r\nX-Checksum: abc\r\n\r\n"
    ).replace(b"Host: test\r\n", b"Host: test\r\nConnection: close\r\n")
    status, _, body, _ = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 201 "), (status, body)
    admin.execute("SELECT email FROM users")
    assert admin.fetchall() == [("ann@example.com",)]
    assert "Traceback" not in log_since()


CODED = {
    "gzip, not compressed": (b"gzip", USER),
    "gzip, compressed": (b"gzip", gzip.compress(USER)),
    "deflate": (b"deflate", zlib.compress(USER)),
    "br": (b"br", USER),
    "x-unknown": (b"x-unknown", USER),
    "identity, then gzip": (b"identity, gzip", gzip.compress(USER)),
    "GZIP in capitals": (b"GZIP", gzip.compress(USER)),
}


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("coding,payload", CODED.values(), ids=CODED.keys())
def test_a_body_with_a_content_coding_is_415_naming_identity(
    server, admin, log_since, method, coding, payload
):
    [user_id] = seed_users(admin, 1)
    path = "/users" if method == "POST" else f"/users/{user_id}"
    raw = (
        b"%s %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (method.encode(), path.encode(), coding, len(payload))
    ) + payload
    status, fields, body, _ = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 415 "), (status, body)
    assert b"Accept-Encoding: identity\r\n" in fields + b"\r\n"
    assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    admin.execute("SELECT name, email FROM users")
    assert admin.fetchall() == [("user 1", "user1@example.com")]
    assert "Traceback" not in log_since()


def test_a_body_coded_identity_is_stored(server, admin):
    reply = request(
        server.port,
        "POST",
        "/users",
        json.loads(USER),
        headers={"Content-Encoding": "identity"},
    )
    assert reply.status == 201
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 1


HOSTS = {
    "no Host": (b"", 400),
    "two Hosts": (b"Host: a\r\nHost: b\r\n", 400),
    "the same Host twice": (b"Host: a\r\nHost: a\r\n", 400),
    "two Hosts, cased apart": (b"Host: a\r\nhost: a\r\n", 400),
    "an empty Host": (b"Host:\r\n", 201),
    "one Host": (b"Host: a\r\n", 201),
}


@pytest.mark.parametrize("fields,expected", HOSTS.values(), ids=HOSTS.keys())
def test_an_http_1_1_request_needs_exactly_one_host(server, admin, log_since, fields, expected):
    raw = (
        b"POST /users HTTP/1.1\r\n" + fields + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(USER)
    ) + USER
    status, _, body, _ = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 %d " % expected), (status, body)
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == (1 if expected == 201 else 0)
    assert "Traceback" not in log_since()


def test_a_missing_host_is_answered_with_the_json_error_shape(server):
    status, _, body, _ = exchange(
        server.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    assert status.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "missing_host"


def test_http_1_0_needs_no_host(server):
    status, _, body, _ = exchange(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status.startswith(b"HTTP/1.0 200 "), (status, body)


# Transfer codings beside chunked: gunicorn takes gzip, deflate and compress and decodes none,
# so a body it handed on would be stored as if it were plain; one it does not know, it refuses.
TRANSFER_CODED = {
    "gzip, chunked": b"gzip, chunked",
    "deflate, chunked": b"deflate, chunked",
    "compress, chunked": b"compress, chunked",
    "GZIP in capitals, chunked": b"GZIP, chunked",
    "an unknown coding": b"xchunked",
    "an unknown coding, chunked": b"x-unknown, chunked",
    "an empty field": b"",
}


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("coding", TRANSFER_CODED.values(), ids=TRANSFER_CODED.keys())
def test_a_body_with_a_transfer_coding_beside_chunked_is_400_and_nothing_changes(
    server, admin, log_since, method, coding
):
    [user_id] = seed_users(admin, 1)
    path = "/users" if method == "POST" else f"/users/{user_id}"
    raw = (
        (
            b"%s %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: %s\r\n\r\n" % (method.encode(), path.encode(), coding)
        )
        + SIZE
        + b"\r\n"
        + USER
        + b"\r\n0\r\n\r\n"
    )
    status, fields, body, closed = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 400 "), (status, body)
    assert b"Content-Type: application/json" in fields
    assert json.loads(body)["error"]["code"] == "unsupported_transfer_coding"
    assert closed
    admin.execute("SELECT name, email FROM users")
    assert admin.fetchall() == [("user 1", "user1@example.com")]
    assert "Traceback" not in log_since()


# What gunicorn's parser refuses before the app sees a request: (raw request, status, code).
UNPARSABLE = {
    "a lowercase method": (b"get /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid_method"),
    "HTTP/2.0 on HTTP/1": (
        b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n",
        400,
        "invalid_http_version",
    ),
    "a field with no colon": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A\r\n\r\n",
        400,
        "invalid_header",
    ),
    "a folded field": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
        400,
        "invalid_header",
    ),
    "Content-Length twice": (
        b"POST /users HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        400,
        "invalid_header",
    ),
    "Content-Length and Transfer-Encoding": (
        b"POST /users HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "invalid_header",
    ),
    "a request line over the limit": (
        b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        414,
        "request_line_too_long",
    ),
    "101 fields": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(101))
        + b"\r\n",
        431,
        "header_fields_too_large",
    ),
    "an expectation other than 100-continue": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: foo\r\n\r\n",
        417,
        "expectation_failed",
    ),
}


@pytest.mark.parametrize("raw,expected,code", UNPARSABLE.values(), ids=UNPARSABLE.keys())
def test_what_gunicorn_cannot_parse_gets_the_json_error_shape_and_closes(
    server, admin, log_since, raw, expected, code
):
    status, fields, body, closed = exchange(server.port, raw)
    assert status.startswith(b"HTTP/1.1 %d " % expected), (status, body)
    assert b"Content-Type: application/json" in fields
    assert json.loads(body)["error"]["code"] == code
    assert closed
    assert_refused_cleanly(admin, log_since())


def test_a_script_name_field_from_a_local_client_is_dropped_not_a_500(server):
    """gunicorn trusts 127.0.0.1 with forwarding fields by default, and took SCRIPT_NAME from
    it: a path that did not start with it was a 500. No peer is trusted (TRUSTED_PROXIES says
    which X-Forwarded-* the app takes), so the field is dropped, from every client."""
    for script_name in (b"/foo", b"/health"):
        status, _, body, _ = exchange(
            server.port,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nSCRIPT_NAME: %s\r\nConnection: close\r\n\r\n"
            % script_name,
        )
        assert status.startswith(b"HTTP/1.1 200 "), (status, body)


# A chunked body with broken framing that the app answers without reading it whole.
UNREAD = {
    "a GET": b"GET /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "a HEAD": b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "a POST without Host": b"POST /users HTTP/1.1\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "a POST with a content coding": b"POST /users HTTP/1.1\r\nHost: a\r\n"
    b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
}


@pytest.mark.parametrize("raw", UNREAD.values(), ids=UNREAD.keys())
def test_a_request_answered_before_its_chunked_body_is_read_gets_one_response_and_a_close(
    server, admin, log_since, raw
):
    """gunicorn reads what is left of a body before the next request; framing broken there
    was answered with a second response nobody asked for. The connection closes instead."""
    with socket.create_connection((HOST, server.port), timeout=10) as sock:
        sock.sendall(raw)
        head = _read_exactly(sock, lambda got: got.endswith(b"\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 "), head
        if not raw.startswith(b"HEAD"):  # the body, to its Content-Length and not a byte more
            length = int(re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)[1])
            _read_exactly(sock, lambda got: len(got) == length)
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b"", rest  # nothing more: closed after the one response
    assert_refused_cleanly(admin, log_since())


def _read_exactly(sock: socket.socket, done) -> bytes:
    """Bytes read one at a time until `done(what was read)`: nothing after them is consumed,
    so a second response cannot hide in the read of the first."""
    got = b""
    while not done(got):
        chunk = sock.recv(1)
        assert chunk, got
        got += chunk
    return got


def test_a_path_with_doubled_slashes_is_404_not_a_redirect_to_the_clients_host(server, admin):
    """werkzeug merges slashes by redirecting (308) to an absolute URL built from the request's
    own Host field; `/users//1` names no route."""
    [user_id] = seed_users(admin, 1)
    status, fields, body, _ = exchange(
        server.port,
        b"GET /users//%d HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n" % user_id,
    )
    assert status.startswith(b"HTTP/1.1 404 "), (status, fields, body)
    assert b"Location" not in fields
    assert json.loads(body)["error"]["code"] == "not_found"
