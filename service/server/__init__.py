"""What gunicorn runs: the worker (`worker`), and the WSGI entry point it serves (`wsgi`), the
app behind its middleware."""
