"""The service: the Flask app (`service.app.create_app`) and what it stands on.

Dependencies run one way: `server` (what gunicorn serves) -> `app` (the factory) -> `api` (the
resources and the errors' responses) -> `db` (get_db, the pool, the schema), with
`observability` (logs, metrics) beside them. `db` imports nothing of the others.
The gunicorn master imports `service.db` alone, to check the connection budget and apply the
schema; each worker imports the app after fork.
"""
