"""The WSGI application gunicorn serves (`wsgi_app` in gunicorn.conf.py): the Flask app of this
worker, behind the middleware the settings ask for.

`app` is the Flask app itself, for the gunicorn hooks that open and close its pool;
`application` is what gunicorn calls, and nothing assumes that it is the Flask app. With
TRUSTED_PROXIES set to the number of proxies in front of the service (a load balancer: 1),
werkzeug's ProxyFix takes the client's address and scheme from the `X-Forwarded-For` and
`X-Forwarded-Proto` those proxies set, so the access line's `remote_addr` is the client's.
Unset (0), those headers are ignored: any client could write them.

A chunked request body reaches the app through `ChunkedBody`, which makes the framing errors
gunicorn's parser finds while the app reads the body the client's fault (4xx), not the app's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gunicorn.http.errors import LimitRequestHeaders, ParseException
from werkzeug.middleware.proxy_fix import ProxyFix

from service.api.errors import ApiError
from service.app import create_app

REQUEST_HEADER_FIELDS_TOO_LARGE = 431
# How much of gunicorn's own description (which quotes the bytes it refused) an error repeats.
QUOTED_CHARS = 120


class ChunkedBody:
    """A chunked request body (gunicorn's `wsgi.input`), whose broken framing is answered as
    the client's error.

    gunicorn parses chunked framing lazily, as the app reads: a chunk size that is not hex,
    chunk data longer than its size, a bad chunk extension, a bare LF, a missing last chunk or
    trailer section, a trailer field that must not be a trailer (Content-Length, Host, ...)
    each raise one of gunicorn's `ParseException`s out of `read()`, which the app would answer
    as its own fault (500, with a traceback). Here each becomes an `ApiError`: 400
    `malformed_body`, or 431 when the trailer section is over gunicorn's limit. Nothing has
    reached a handler then: `_read_whole_body` (service/app.py) reads every body before one
    runs. gunicorn marks the body failed and closes the connection after the response, since
    where the next request would start is unknown.

    A client that hangs up mid-body raises gunicorn's `NoMoreData`, an OSError: it passes
    through, and werkzeug answers it as a disconnected client (400), as before.

    `ended` says whether the app read it to its end. One answered before that (a GET, or a
    request refused before its body is read) closes its connection after the response
    (`body_left_unread`, gunicorn.conf.py's `post_request`): gunicorn would otherwise read
    the rest before the next request, and answer broken framing there with a second response.
    """

    __slots__ = ("_body", "ended")

    def __init__(self, body) -> None:
        self._body = body
        self.ended = False

    def read(self, size: int | None = None) -> bytes:
        try:
            data = self._body.read(size)
        except ParseException as exc:
            raise _client_error(exc) from None
        if not data or size is None or size < 0:
            self.ended = True
        return data

    def readline(self, size: int | None = None) -> bytes:
        try:
            line = self._body.readline(size)
        except ParseException as exc:
            raise _client_error(exc) from None
        if not line:
            self.ended = True
        return line

    def __iter__(self):
        return iter(self.readline, b"")


def body_left_unread(environ: dict) -> bool:
    """Whether the request of `environ` had a chunked body that the app did not read to its
    end."""
    body = environ.get("wsgi.input")
    return isinstance(body, ChunkedBody) and not body.ended


def _client_error(exc: ParseException) -> ApiError:
    quoted = str(exc)[:QUOTED_CHARS]
    if isinstance(exc, LimitRequestHeaders):
        return ApiError(
            REQUEST_HEADER_FIELDS_TOO_LARGE,
            "trailer_section_too_large",
            f"the chunked body's trailer section is too large: {quoted}",
        )
    return ApiError(
        400, "malformed_body", f"the request body's chunked framing is malformed: {quoted}"
    )


def read_chunked_bodies_as_client_errors(inner: Callable) -> Callable:
    """WSGI middleware: hands `inner` every chunked request body as a `ChunkedBody`. A request
    with no Transfer-Encoding (most: GETs, and bodies with a Content-Length, whose reads raise
    no framing error) passes untouched, at the cost of one dict lookup."""

    def middleware(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if "HTTP_TRANSFER_ENCODING" in environ:
            environ["wsgi.input"] = ChunkedBody(environ["wsgi.input"])
        return inner(environ, start_response)

    return middleware


app = create_app()
_proxies = app.config["SETTINGS"].trusted_proxies
application = read_chunked_bodies_as_client_errors(
    ProxyFix(app, x_for=_proxies, x_proto=_proxies) if _proxies else app
)
