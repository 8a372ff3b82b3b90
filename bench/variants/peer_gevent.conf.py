"""gunicorn settings for peer-gevent: the Flask peer (`peer.py`) under gunicorn's stock gevent
worker, each worker with its own psycopg_pool.

Nothing is patched here: gunicorn's gevent worker patches in `init_process()`, after fork and
before it loads the app, so psycopg is first imported into a patched process. psycopg 3 chooses
its wait function at that import: with `select` patched it takes `wait_poll`, whose
`select.poll` is gevent's and yields to the hub, instead of its C wait, which would block the
whole worker for every round trip. `post_worker_init` refuses to serve if that went otherwise.
"""

import os

wsgi_app = "bench.variants.peer:app"
worker_class = "gevent"
bind = [f"127.0.0.1:{os.environ['PORT']}"]
workers = int(os.environ["WEB_CONCURRENCY"])
worker_connections = int(os.environ["WORKER_CONNECTIONS"])
preload_app = False
control_socket_disable = True
accesslog = "-"  # as the service: every variant pays for an access log line


def post_worker_init(worker):
    """Check that psycopg waits in the gevent hub, then open this worker's pool."""
    import psycopg.waiting

    from bench.variants import peer

    if psycopg.waiting.wait is getattr(psycopg.waiting, "wait_c", None):
        raise RuntimeError(
            "psycopg was imported before gevent patched select: its C wait would block the "
            "worker on every query"
        )
    peer.open_pool()


def worker_exit(server, worker):
    from bench.variants import peer

    peer.close_pool()
