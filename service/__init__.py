"""The service: the Flask app (`service.app.create_app`) and what it stands on.

Importing the package loads nothing else, so that gunicorn's master can check the connection
budget and apply the schema (`service.budget`, `service.schema`) without importing the app:
each worker imports it after fork, and a reload (`kill -HUP`) gets fresh code.
"""
