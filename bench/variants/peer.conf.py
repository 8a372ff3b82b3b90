"""gunicorn settings for peer-gthread: the Flask peer (`peer.py`) under gthread workers, each
with its own psycopg_pool."""

import os

wsgi_app = "bench.variants.peer:app"
worker_class = "gthread"
# One thread per pooled connection: no thread ever waits for the pool. Measured at 50 and 500
# connections: 8 or 10 threads serve the most; 4 serve 10% less; 20 or 40 serve a third less,
# their threads fighting for the GIL.
threads = int(os.environ["DB_POOL_MAX"])
bind = [f"127.0.0.1:{os.environ['PORT']}"]
workers = int(os.environ["WEB_CONCURRENCY"])
worker_connections = int(os.environ["WORKER_CONNECTIONS"])
preload_app = False
control_socket_disable = True
accesslog = "-"  # as the service: every variant pays for an access log line


def post_worker_init(worker):
    from bench.variants import peer

    peer.open_pool()


def worker_exit(server, worker):
    from bench.variants import peer

    peer.close_pool()
