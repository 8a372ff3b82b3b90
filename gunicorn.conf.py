"""gunicorn settings and hooks: the production command is `gunicorn -c gunicorn.conf.py`.

Patch first. gunicorn's gevent worker would patch only in `init_process()`, after fork and
after gunicorn itself imported its modules; patching here, the first thing gunicorn executes
of ours, makes sockets, locks (psycopg2's pool lock among them) and sleeps cooperative before
the app or any of its libraries is imported, in the master and in every worker.
"""

import gevent
from gevent import monkey

monkey.patch_all()

# psycopg2 waits for the server inside libpq; with psycogreen's wait callback it yields to the
# gevent hub instead, so one worker serves thousands of requests over a few connections.
from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import atexit  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from gunicorn.glogging import Logger  # noqa: E402

from config import ConfigError, load_settings  # noqa: E402
from config.settings import redact_dsn  # noqa: E402

try:
    settings = load_settings(os.environ)
except ConfigError as exc:
    sys.exit(f"configuration error: {exc}")


def _remove_metrics_dir(path: str, master_pid: int) -> None:
    if os.getpid() == master_pid:  # a worker runs the master's atexit handlers too, at its exit
        shutil.rmtree(path, ignore_errors=True)


# /metrics adds up every worker's values: prometheus_client's multiprocess mode keeps each
# worker's in files under PROMETHEUS_MULTIPROC_DIR. prometheus_client reads the variable when it
# is first imported, so it is set here, before the master imports the service (and every worker
# inherits it). Unless the environment names a directory, it is a fresh one, removed at exit.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="service-metrics-")
    atexit.register(_remove_metrics_dir, os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid())
_metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])

# Whether the OTEL_* variables turn tracing on (service/observability/tracing.py), checked in
# the master, once prometheus_client may be imported, so that a protocol we do not speak stops
# the start; each worker starts its own tracer provider.
from service.observability.tracing import configured as tracing_configured  # noqa: E402

try:
    traced = tracing_configured(os.environ)
except ValueError as exc:
    sys.exit(f"configuration error: {exc}")

# The Flask app behind its middleware (service/server/wsgi.py), served by gunicorn's gevent
# worker accepting new connections in batches (service/server/worker.py).
wsgi_app = "service.server.wsgi:application"
worker_class = "service.server.worker.GeventWorker"
# With METRICS_PORT, a second listener for /metrics alone (service/observability/metrics.py).
bind = [f"0.0.0.0:{port}" for port in (settings.port, settings.metrics_port) if port]
workers = settings.web_concurrency
worker_connections = settings.worker_connections
# No peer may set forwarding fields for gunicorn (it trusts 127.0.0.1 by default): TRUSTED_PROXIES
# alone says which X-Forwarded-* the app takes (service/server/wsgi.py), and gunicorn drops
# fields such as SCRIPT_NAME from every client, where from a trusted peer it would take them.
forwarded_allow_ips = ""
# Nothing may be opened before fork: each worker opens its own pool in post_worker_init.
preload_app = False
# A young collection of the cyclic garbage collector per this many objects allocated and not yet
# freed, in each worker (CPython's default: 700); post_worker_init.
GC_YOUNG_THRESHOLD = 10_000
# On SIGTERM a worker serves on for DRAIN_SECONDS while /readyz answers 503, then stops
# accepting and finishes the requests in flight (service/server/worker.py); the master SIGKILLs
# a worker still running graceful_timeout after the SIGTERM. 25 s, so that the drain and the
# requests in flight end before an orchestrator's usual 30 s grace (Kubernetes'
# terminationGracePeriodSeconds) runs out and it SIGKILLs the lot; `docker stop` waits 10 s
# unless given `--time 30`.
graceful_timeout = 25
# The queue of connections the kernel has accepted and a worker has not yet: a burst of
# thousands of connects overflows gunicorn's default (2048) and the overflow sees resets. The
# kernel caps it at net.core.somaxconn (4096 by default): raise that too for larger bursts.
backlog = 16384
# How long an idle keep-alive connection may wait for its next request (HTTP_KEEPALIVE_TIMEOUT,
# 15 s). Under a load of thousands of connections a worker can take seconds to come back to one
# of them; gunicorn's default (2 s) then closes connections mid-conversation. A stopping worker
# closes its idle keep-alive connections once its drain is over. Behind a load balancer whose
# idle timeout is 60 s, set it to 75. The other deadlines on the wire (head, body, write) are
# kept by the worker: service/server/connections.py.
keepalive = settings.http_keepalive_timeout
# Every response byte goes through the socket's sendall, which keeps the write deadline.
sendfile = False
# gunicorn's control socket sits at one path per user: two instances on one host would fight
# over it, and a read-only container home cannot hold it.
control_socket_disable = True
# Everything to stdout as JSON lines, one stream: gunicorn's own log and the app's, with the
# app's access lines (service/observability/logs.py).
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {"gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        }
    },
    "formatters": {"json": {"()": "service.observability.logs.JsonFormatter"}},
}


class AppWritesTheAccessLog(Logger):
    """gunicorn's logger without its access line: the app writes one per request, with the route
    and the pool wait that gunicorn cannot know, and a request id."""

    def access(self, resp, req, environ, request_time):
        pass


logger_class = AppWritesTheAccessLog


def on_starting(server):
    """In the master, before any worker: refuse a DRAIN_SECONDS that leaves graceful_timeout no
    time for the requests in flight, wait for the database, refuse to start when the
    connection budget exceeds the server's max_connections (before the schema is touched),
    then bring the schema up to date.

    Each step uses a connection of its own, closed before the next step and the first fork.
    """
    import psycopg2

    from service.db import budget, schema
    from service.server.worker import FORCED_STOP_S

    # gunicorn installs its signal handlers only after this hook; until then a stop signal
    # would kill the master outright while it waits for the database, skipping the atexit
    # handler that removes the metrics directory.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, _stop_while_starting)
    if server.cfg.is_ssl:
        raise RuntimeError(
            "gunicorn is given a certificate, but the service speaks plain HTTP: terminate TLS "
            "in front of it (a load balancer or proxy) and set TRUSTED_PROXIES"
        )
    if server.cfg.workers != settings.web_concurrency:  # e.g. --workers in GUNICORN_CMD_ARGS
        raise RuntimeError(
            f"gunicorn would run {server.cfg.workers} workers but WEB_CONCURRENCY is "
            f"{settings.web_concurrency}, which sizes the pools and the connection budget: "
            "set WEB_CONCURRENCY instead of gunicorn's --workers"
        )
    # The master SIGKILLs a worker graceful_timeout after the SIGTERM, and a worker ends what
    # still runs FORCED_STOP_S before that: the requests in flight get what the drain leaves.
    if settings.drain_seconds >= server.cfg.graceful_timeout - FORCED_STOP_S:
        raise RuntimeError(
            f"DRAIN_SECONDS={settings.drain_seconds:g} leaves the requests in flight no time: it "
            f"must be less than gunicorn's graceful_timeout ({server.cfg.graceful_timeout} s) "
            f"less {FORCED_STOP_S:g} s for a forced stop; lower DRAIN_SECONDS"
        )
    server.log.info("database: %s", settings.safe_database_url)
    wanted = budget.Budget.of(settings)
    # Each server, the primary and every replica, must take every worker's pool for it.
    for url in (settings.database_url, *settings.database_replica_urls):
        limits = budget.read_limits(url, settings.db_connect_timeout)
        budget.check(wanted, limits)  # BudgetExceeded: a RuntimeError, so one line and exit 1
        server.log.info(
            "connection budget: %s, of %s allowed (%s) at %s",
            wanted,
            limits.allowed,
            limits,
            redact_dsn(url),
        )
    try:
        applied = schema.migrate(settings.database_url, settings.db_connect_timeout)
    except psycopg2.Error as exc:  # gunicorn prints a RuntimeError as one line and exits 1
        raise RuntimeError(f"schema migration failed: {exc}") from None
    server.log.info("schema: %s", ", ".join(applied) if applied else "up to date")


def _stop_while_starting(signum, frame):
    sys.exit(f"stopped by {signal.Signals(signum).name} while starting")


def when_ready(server):
    """In the master, once, before the first fork: start the metrics from zero, dropping files an
    earlier run left in a given PROMETHEUS_MULTIPROC_DIR."""
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()
    server.log.info("metrics: %s", _metrics_dir)


def post_worker_init(worker):
    """In each worker, after fork and after the app is loaded: start its tracer provider and
    export thread (with tracing on), then open its own pool, whose statements it traces; then
    take what it has loaded out of the cyclic garbage collector's reach, and make its young
    collections rarer."""
    from service import db
    from service.observability import tracing
    from service.server import wsgi

    if traced:
        tracing.start(os.environ)
        worker.log.info("tracing: on, exporting with OTLP/HTTP")
    pool = db.open_pool(wsgi.app)
    worker.log.info("pool open: %s", pool.stats())
    # What the worker has loaded (modules, the app, the pool) lives as long as it does: frozen
    # (`gc.freeze()`), the cyclic collector no longer walks it; reference counting still frees
    # it. With thousands of requests in flight, their objects outlive young collections, and
    # every collection walks them: one per GC_YOUNG_THRESHOLD objects allocated and not yet
    # freed, instead of CPython's 700, walks them less often (docs/performance.md, "The garbage
    # collector at 5,000 connections").
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def post_request(worker, req, environ, resp):
    """Close a connection whose request's chunked body the app answered without reading it
    whole (service/server/wsgi.py's `body_left_unread`): gunicorn would read the rest before
    the next request, and answer framing broken there with a second, unasked-for response.

    Then let other greenlets run between two requests on one keep-alive connection: gunicorn's
    gevent worker reads the next request of a connection at once when it is already buffered,
    and a request that never waits (no database, like /healthz) never yields: a few busy
    connections could starve the rest. One switch per request keeps the service fair.
    """
    if "HTTP_TRANSFER_ENCODING" in environ:  # rare: the import is looked up only then
        from service.server.wsgi import body_left_unread

        if body_left_unread(environ):
            req.force_close()
    gevent.sleep(0)


def worker_exit(server, worker):
    """In each worker, once its requests are done (or graceful_timeout passed): close the pool,
    then send the spans still queued (for up to tracing.FLUSH_AT_EXIT_S)."""
    import sys

    from service import db

    wsgi = sys.modules.get("service.server.wsgi")  # absent when the worker died loading it
    if wsgi is not None:
        db.close_pool(wsgi.app)
    if traced:
        from service.observability import tracing

        tracing.shutdown()


def child_exit(server, worker):
    """In the master, once a worker has gone: drop its pool gauges from /metrics (its counts stay
    in the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, str(_metrics_dir))
