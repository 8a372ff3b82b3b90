"""The WSGI application gunicorn serves (`wsgi_app` in gunicorn.conf.py): the Flask app of this
worker, behind the middleware the settings ask for.

`app` is the Flask app itself, for the gunicorn hooks that open and close its pool;
`application` is what gunicorn calls, and nothing assumes that it is the Flask app. With
TRUSTED_PROXIES set to the number of proxies in front of the service (a load balancer: 1),
werkzeug's ProxyFix takes the client's address and scheme from the `X-Forwarded-For` and
`X-Forwarded-Proto` those proxies set, so the access line's `remote_addr` is the client's.
Unset (0), those headers are ignored: any client could write them.
"""

from __future__ import annotations

from werkzeug.middleware.proxy_fix import ProxyFix

from service.app import create_app

app = create_app()
_proxies = app.config["SETTINGS"].trusted_proxies
application = ProxyFix(app, x_for=_proxies, x_proto=_proxies) if _proxies else app
