"""gunicorn settings and hooks: the production command is `gunicorn -c gunicorn.conf.py`.

Patch first. gunicorn's gevent worker would patch only in `init_process()`, after fork and
after gunicorn itself imported its modules; patching here, the first thing gunicorn executes
of ours, makes sockets, locks (psycopg2's pool lock among them) and sleeps cooperative before
the app or any of its libraries is imported, in the master and in every worker.
"""

from gevent import monkey

monkey.patch_all()

# psycopg2 waits for the server inside libpq; with psycogreen's wait callback it yields to the
# gevent hub instead, so one worker serves thousands of requests over a few connections.
from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import os  # noqa: E402
import sys  # noqa: E402

from config import ConfigError, load_settings  # noqa: E402

try:
    settings = load_settings(os.environ)
except ConfigError as exc:
    sys.exit(f"configuration error: {exc}")

wsgi_app = "service:create_app()"
worker_class = "gevent"
bind = [f"0.0.0.0:{settings.port}"]
workers = settings.web_concurrency
worker_connections = settings.worker_connections
# Nothing may be opened before fork: each worker opens its own pool in post_worker_init.
preload_app = False
graceful_timeout = 30
# gunicorn's control socket sits at one path per user: two instances on one host would fight
# over it, and a read-only container home cannot hold it.
control_socket_disable = True
accesslog = "-"
# Everything to stdout, one stream: gunicorn's own log, the access log and the app's log.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
    },
}


def on_starting(server):
    """In the master, before any worker: wait for the database and bring the schema up to date.

    The connection used here is closed before the first fork.
    """
    import psycopg2

    from service import schema

    server.log.info("database: %s", settings.safe_database_url)
    try:
        applied = schema.migrate(settings.database_url, settings.db_connect_timeout)
    except psycopg2.Error as exc:  # gunicorn prints a RuntimeError as one line and exits 1
        raise RuntimeError(f"schema migration failed: {exc}") from None
    server.log.info("schema: %s", ", ".join(applied) if applied else "up to date")


def post_worker_init(worker):
    """In each worker, after fork and after the app is loaded: open this worker's own pool."""
    from service import db

    pool = db.open_pool(worker.wsgi)
    worker.log.info("pool open: %s", pool.stats())


def worker_exit(server, worker):
    """In each worker, once its requests are done (or graceful_timeout passed): close the pool."""
    from service import db

    if getattr(worker, "wsgi", None) is not None:
        db.close_pool(worker.wsgi)
