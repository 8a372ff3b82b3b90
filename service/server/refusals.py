"""gunicorn's refusals of requests it cannot parse, in the API's error shape.

gunicorn refuses a request whose request line or header section is malformed before any app
sees it, and answers in HTML (`Worker.handle_error`). `answer()` gives the same refusal as the
API's JSON error (`{"error": {"code", "message"}}`, service/api/errors.py) with the connection
closed, as gunicorn closes it: where the next request would start is unknown. Its status is
gunicorn's, but for two that were not 4xx:

- a request whose Transfer-Encoding holds a coding gunicorn does not know: 400, not 501 (RFC
  9112 6.3: a request whose transfer codings do not end in chunked has no length that can be
  determined, and gets 400);
- gunicorn's `ConfigurationProblem`, a `SCRIPT_NAME` field that the request path does not
  start with: 400, not 500. (gunicorn.conf.py trusts no peer's forwarding fields, so gunicorn
  drops that field now; the mapping stays for a deployment that trusts one.)

Exceptions that are not the client's (an invalid header the app tried to send, anything
unexpected) are left to gunicorn: 500, logged with the traceback.
"""

from __future__ import annotations

import json
from ssl import SSLError

from gunicorn.http.errors import (
    ChunkMissingTerminator,
    ConfigurationProblem,
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidH2CPreface,
    InvalidHeader,
    InvalidHeaderName,
    InvalidHTTPVersion,
    InvalidProxyLine,
    InvalidRequestLine,
    InvalidRequestMethod,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    InvalidSchemeHeaders,
    LimitRequestHeaders,
    LimitRequestLine,
    ObsoleteFolding,
    UnsupportedTransferCoding,
)

# In order: the first class an exception is an instance of gives its status, reason and code.
REFUSALS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (InvalidRequestLine, 400, "Bad Request", "invalid_request_line"),
    (InvalidRequestMethod, 400, "Bad Request", "invalid_method"),
    (InvalidHTTPVersion, 400, "Bad Request", "invalid_http_version"),
    (UnsupportedTransferCoding, 400, "Bad Request", "unsupported_transfer_coding"),
    (ConfigurationProblem, 400, "Bad Request", "invalid_header"),
    (ObsoleteFolding, 400, "Bad Request", "invalid_header"),
    (InvalidHeaderName, 400, "Bad Request", "invalid_header"),
    (InvalidHeader, 400, "Bad Request", "invalid_header"),
    (LimitRequestLine, 414, "URI Too Long", "request_line_too_long"),
    (ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (LimitRequestHeaders, 431, "Request Header Fields Too Large", "header_fields_too_large"),
    (InvalidProxyLine, 400, "Bad Request", "invalid_proxy_line"),
    (ForbiddenProxyRequest, 403, "Forbidden", "forbidden"),
    (InvalidSchemeHeaders, 400, "Bad Request", "invalid_header"),
    (InvalidChunkSize, 400, "Bad Request", "invalid_chunked_body"),
    (ChunkMissingTerminator, 400, "Bad Request", "invalid_chunked_body"),
    (InvalidChunkExtension, 400, "Bad Request", "invalid_chunked_body"),
    (InvalidH2CPreface, 400, "Bad Request", "invalid_request_line"),
    (SSLError, 403, "Forbidden", "forbidden"),
)
# Those the app caused: gunicorn's 500.
NOT_THE_CLIENTS = (InvalidResponseHeader, InvalidResponseHeaderName)
# How much of gunicorn's description (which quotes the bytes it refused) a refusal repeats.
QUOTED_CHARS = 200


def answer(exc: BaseException) -> bytes | None:
    """The whole HTTP response refusing the request gunicorn failed with `exc`, or None when
    `exc` is not the client's fault."""
    if isinstance(exc, NOT_THE_CLIENTS):
        return None
    for kind, status, reason, code in REFUSALS:
        if isinstance(exc, kind):
            message = (str(exc) or reason)[:QUOTED_CHARS]
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            head = (
                f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            return head.encode("latin-1") + body
    return None
