"""The Flask app: `create_app()` builds it and opens nothing.

The gunicorn hooks in `gunicorn.conf.py` open each worker's pool after fork and close it at
exit; tests build an app and open its pool themselves (`service.db.open_pool`).
"""

from __future__ import annotations

import os

from flask import Flask

from config import Settings, load_settings
from service import errors, health, logs, metrics, openapi, users

MAX_BODY_BYTES = 1 << 20


def create_app(settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config["SETTINGS"] = settings or load_settings(os.environ)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    logs.register(app)
    metrics.register(app)
    for module in (health, users, openapi):
        app.register_blueprint(module.bp)
    errors.register(app)
    return app
