"""The HTTP API: the users resource, the probes, the OpenAPI document, and the one place where
errors become responses (`errors`)."""
