"""What gunicorn serves: the WSGI entry point (`wsgi`), the app behind its middleware."""
