"""gunicorn settings for the asyncio peer: Starlette + asyncpg (`asyncio_peer.py`) on uvicorn
workers with uvloop and httptools, each worker opening its own pool in the app's lifespan."""

import os

wsgi_app = "bench.variants.asyncio_peer:app"
worker_class = "bench.variants.asyncio_peer.UvloopWorker"
bind = [f"127.0.0.1:{os.environ['PORT']}"]
workers = int(os.environ["WEB_CONCURRENCY"])
preload_app = False
control_socket_disable = True
accesslog = "-"  # as the service: every variant pays for an access log line
