"""The Flask app: `create_app()` builds it and opens nothing.

The gunicorn hooks in `gunicorn.conf.py` open each worker's pool after fork and close it at
exit; tests build an app and open its pool themselves (`service.db.open_pool`).
"""

from __future__ import annotations

import os

from flask import Flask, Response, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from config import Settings, load_settings
from service import db
from service.api import auth, client, errors, health, openapi, users
from service.api.json_provider import OrjsonProvider
from service.observability import logs, metrics

MAX_BODY_BYTES = 1 << 20


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config["SETTINGS"] = settings or load_settings(os.environ)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json = OrjsonProvider(app)
    app.extensions[db.EVENTS] = metrics.PoolMetrics()
    app.after_request(_no_type_without_a_body)
    logs.register(app)
    metrics.register(app)
    # After logs: a refused request still gets its request id, access line and count. The
    # token first: a stranger's body is never read.
    auth.register(app, frozenset({users.bp.name}))
    app.before_request(_read_whole_body)
    for module in (health, users, openapi):
        app.register_blueprint(module.bp)
    errors.register(app)
    loaders = users.batch_loaders()
    app.extensions.update(loaders)
    app.extensions[db.WAITING_ELSEWHERE] = lambda: sum(x.waiting for x in loaders.values())
    app.extensions[db.CLIENT_GONE] = client.hung_up
    return app


def _read_whole_body() -> None:
    """Read the body here, once (cached for `get_json`), and refuse one that is not whole, so
    that a handler never sees a body cut short and the pool never sees a client still sending.

    A body shorter than its Content-Length means the client hung up, or missed the body
    deadline (service/server/connections.py): gunicorn hands the app what came, without a
    word, so it is checked here (400, and nothing is stored). A body sent without
    Content-Length (chunked) that runs past the limit gets 413: werkzeug refuses a body only by
    its Content-Length, and reads one without up to the limit and stops there in silence (a
    JSON object followed by 1 MiB of spaces would be stored); so look for one byte more.
    """
    if request.method in ("GET", "HEAD"):
        return  # the method first: most requests are GETs, and it costs no header parsing
    body = request.get_data(cache=True)
    if request.content_length is not None:
        if len(body) < request.content_length:
            raise ClientDisconnected()
        return
    if len(body) < MAX_BODY_BYTES:
        return
    try:  # past werkzeug's wrapper: the server's own reader
        more = request.environ["wsgi.input"].read(1)
    except OSError:  # gunicorn's NoMoreData: the client hung up before the last chunk
        raise ClientDisconnected() from None
    if more:
        raise RequestEntityTooLarge()


def _no_type_without_a_body(response: Response) -> Response:
    """A 204, or the empty answer to OPTIONS, has no body, so it names no type: Flask would
    call it text/html, beside an API whose every body is JSON."""
    if response.status_code == 204 or (
        request.method == "OPTIONS" and not response.is_streamed and not response.get_data()
    ):
        del response.headers["Content-Type"]
    return response
