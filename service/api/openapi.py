"""The OpenAPI 3 document of the API, served at `/openapi.json`.

Written by hand next to the handlers it describes; a test checks that it is a valid OpenAPI
document and that it names every route the app serves, so the two cannot drift apart.
"""

from __future__ import annotations

from flask import Blueprint

from service.api.pagination import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_LIMIT
from service.api.users import EMAIL_MAX, NAME_MAX, NAME_PATTERN

bp = Blueprint("openapi", __name__)


def _error(description: str, retry_after: bool = False) -> dict:
    response = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "whole seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return response


def _json(ref: str, description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": NAME_MAX,
    "description": "not blank, no control characters; stored without surrounding white space",
    "pattern": NAME_PATTERN,
}
_BUSY = _error("the database is busy, slow or unreachable: retry later", retry_after=True)
_USER_ID = {
    "name": "user_id",
    "in": "path",
    "required": True,
    "description": "a user id; anything that is not one gives 404",
    "schema": {"type": "string"},
}
_BODY_ERRORS = {
    "400": _error("malformed JSON, or malformed chunked framing"),
    "413": _error("body larger than 1 MiB"),
    "415": _error("body is not application/json, or has a content coding (Accept-Encoding)"),
    "422": _error("invalid field values, unknown or missing fields"),
}

DOCUMENT = {
    "openapi": "3.0.3",
    "info": {
        "title": "service",
        "version": "1.0.0",
        "description": "Users over PostgreSQL, served by gunicorn gevent workers from a "
        "small pool of connections per worker. Every error is JSON {error: {code, message}}.",
    },
    "paths": {
        "/healthz": {
            "get": {
                "summary": "Liveness: the worker answers (never touches the database)",
                "responses": {"200": _json("Status", "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: a pooled connection answers SELECT 1 within 1 s",
                "responses": {"200": _json("Ready", "ready"), "503": _BUSY},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of every worker, added up: pool and HTTP requests",
                "responses": {
                    "200": {
                        "description": "the metrics in Prometheus's text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/users": {
            "get": {
                "summary": "List users, newest first, with keyset pagination",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "next_cursor of the previous page (opaque)",
                        "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                    },
                ],
                "responses": {
                    "200": _json("UserPage", "a page of users"),
                    "400": _error("bad limit or cursor"),
                    "503": _BUSY,
                },
            },
            "post": {
                "summary": "Create a user",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewUser"}}
                    },
                },
                "responses": {
                    "201": {
                        **_json("User", "created"),
                        "headers": {
                            "Location": {
                                "description": "/users/<id> of the new user",
                                "schema": {"type": "string"},
                            }
                        },
                    },
                    **_BODY_ERRORS,
                    "409": _error("email already taken"),
                    "503": _BUSY,
                },
            },
        },
        "/users/{user_id}": {
            "parameters": [_USER_ID],
            "get": {
                "summary": "One user",
                "responses": {
                    "200": _json("User", "the user"),
                    "404": _error("no such user"),
                    "503": _BUSY,
                },
            },
            "patch": {
                "summary": "Change name and/or email",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/UserChange"}}
                    },
                },
                "responses": {
                    "200": _json("User", "the changed user"),
                    **_BODY_ERRORS,
                    "404": _error("no such user"),
                    "409": _error("email already taken"),
                    "503": _BUSY,
                },
            },
            "delete": {
                "summary": "Delete a user",
                "responses": {
                    "204": {"description": "deleted"},
                    "404": _error("no such user"),
                    "503": _BUSY,
                },
            },
        },
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "request_id": {"type": "string"},
                        },
                    }
                },
            },
            "Status": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}},
            },
            "Ready": {
                "type": "object",
                "required": ["status", "pool"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "pool": {
                        "type": "object",
                        "required": ["max", "size", "in_use", "idle", "waiting"],
                        "properties": {
                            key: {"type": "integer", "minimum": 0}
                            for key in ("max", "size", "in_use", "idle", "waiting")
                        },
                    },
                },
            },
            "User": {
                "type": "object",
                "required": ["id", "name", "email", "created_at"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "integer", "format": "int64", "minimum": 1},
                    "name": _NAME,
                    "email": {"type": "string", "format": "email", "maxLength": EMAIL_MAX},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "NewUser": {
                "type": "object",
                "required": ["name", "email"],
                "additionalProperties": False,
                "properties": {
                    "name": _NAME,
                    "email": {"type": "string", "format": "email", "maxLength": EMAIL_MAX},
                },
            },
            "UserChange": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "name": _NAME,
                    "email": {"type": "string", "format": "email", "maxLength": EMAIL_MAX},
                },
            },
            "UserPage": {
                "type": "object",
                "required": ["users", "next_cursor"],
                "properties": {
                    "users": {"type": "array", "items": {"$ref": "#/components/schemas/User"}},
                    "next_cursor": {"type": "string", "nullable": True, "pattern": CURSOR_PATTERN},
                },
            },
        }
    },
}


def _declare_bearer_tokens(document: dict) -> None:
    """With API_TOKENS set, every /users operation needs a bearer token (service/api/auth.py);
    unset, the API is open: hence the empty alternative in each `security`."""
    document["components"]["securitySchemes"] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "one of API_TOKENS, when the service sets any; else not required",
        }
    }
    for path, item in document["paths"].items():
        if path.startswith("/users"):
            for method, operation in item.items():
                if method != "parameters":
                    operation["security"] = [{"bearerAuth": []}, {}]
                    operation["responses"]["401"] = _error("no bearer token, or not a valid one")


_declare_bearer_tokens(DOCUMENT)


@bp.get("/openapi.json")
def openapi():
    return DOCUMENT
