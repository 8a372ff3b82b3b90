"""gunicorn settings for the per-request variant: the service's gevent set-up, another app.

Patched first, like the service's gunicorn.conf.py, so that psycopg2 waits in the gevent hub.
"""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import os  # noqa: E402

wsgi_app = "bench.variants.per_request:app"
worker_class = "gevent"  # the service's worker, as in gunicorn.conf.py
bind = [f"127.0.0.1:{os.environ['PORT']}"]
workers = int(os.environ["WEB_CONCURRENCY"])
worker_connections = int(os.environ["WORKER_CONNECTIONS"])
preload_app = False
control_socket_disable = True
accesslog = "-"  # as the service: every variant pays for an access log line
