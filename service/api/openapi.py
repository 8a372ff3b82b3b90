"""The OpenAPI 3.1 document of the API, served at `/openapi.json`, generated from code.

Each path and method comes from `app.url_map`, each operation from the route's declaration
(service/api/operations.py), each schema from the pydantic models (service/api/models.py)
through their JSON Schema, which OpenAPI 3.1 takes as it is. Nothing in it is written by hand,
so it cannot drift from the routes: building it fails while a route the app serves has no
declaration. It is built on the first request for it, once per app.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from flask import Blueprint, Flask, current_app
from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from service.api import operations
from service.api.models import Error
from service.api.operations import Answer, Header, Operation, route
from service.observability import metrics

REF = "#/components/schemas/{model}"
DOCUMENT = "service.api.openapi.document"
# The app.extensions key of the blueprints whose routes need a bearer token when the service
# has any (service/api/auth.py): set by create_app.
GUARDED = "service.api.openapi.guarded"
_INFO = {
    "title": "service",
    "version": "1.0.0",
    "description": "Users over PostgreSQL, served by gunicorn gevent workers from a small pool"
    " of connections per worker. Every error is JSON {error: {code, message}}.",
}
_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "one of API_TOKENS, when the service sets any; else not required",
}

_RETRY_AFTER = Header("whole seconds to wait before retrying", Annotated[int, Field(ge=1)])

bp = Blueprint("openapi", __name__)

operations.declare(
    metrics.metrics,
    "GET",
    summary="Prometheus metrics of every worker, added up: pool and HTTP requests",
    answers={200: Answer("the metrics in Prometheus's text format", str, "text/plain")},
)


@route(
    bp,
    "GET",
    "/openapi.json",
    summary="This document",
    answers={200: Answer("the OpenAPI document", dict[str, Any])},
)
def openapi():
    document = current_app.extensions.get(DOCUMENT)
    if document is None:  # pure computation, no yield: concurrent first requests build alike
        document = current_app.extensions[DOCUMENT] = build(
            current_app, current_app.extensions.get(GUARDED, frozenset())
        )
    return document


class _Schemas(GenerateJsonSchema):
    """pydantic's JSON Schema without titles (the component's name is one) and without the
    `default: null` of a field left out: such a field is absent, and null is not a value of
    it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


def build(app: Flask, guarded: frozenset[str] = frozenset()) -> dict:
    """The document of every route `app` serves; a route of a blueprint in `guarded` needs a
    bearer token (401) when the service has any. ValueError names a route without a
    declaration."""
    declared = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        operation = operations.declared(app.view_functions[rule.endpoint])
        if operation is None:
            raise ValueError(f"{rule.rule} has no declaration (service/api/operations.py)")
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        declared.append((path, rule.endpoint, operation))
        undescribed = set(operation.path) - rule.arguments
        if undescribed:
            raise ValueError(f"{rule.rule} has no parameter {', '.join(sorted(undescribed))}")
    models = {Error}
    for _, _, operation in declared:
        models |= {answer.model for answer in operation.answers.values()}
        models.add(operation.body)
    models = {model for model in models if isinstance(model, type) and issubclass(model, BaseModel)}
    refs, defs = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda model: model.__name__)],
        ref_template=REF,
        schema_generator=_Schemas,
    )
    schemas = {model: refs[model, "validation"] for model in models}
    paths: dict[str, dict] = {}
    for path, endpoint, operation in declared:
        secured = endpoint.partition(".")[0] in guarded
        item = paths.setdefault(path, {})
        item[operation.method.lower()] = _operation(path, endpoint, operation, schemas, secured)
    document = {"openapi": "3.1.0", "info": _INFO, "paths": paths}
    document["components"] = {"schemas": defs["$defs"]}
    if guarded:
        document["components"]["securitySchemes"] = {"bearerAuth": _BEARER}
    return document


def _operation(
    path: str, endpoint: str, operation: Operation, schemas: dict, secured: bool
) -> dict:
    described: dict[str, Any] = {
        "operationId": endpoint.rpartition(".")[2],
        "summary": operation.summary,
    }
    parameters = [_path_parameter(name, operation) for name in re.findall(r"{([^}]+)}", path)]
    if operation.query is not None:
        parameters += _query_parameters(operation.query)
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        content = {"application/json": {"schema": schemas[operation.body]}}
        described["requestBody"] = {"required": True, "content": content}
    responses = {status: _answer(answer, schemas) for status, answer in operation.answers.items()}
    errors = dict(operation.errors)
    if secured:
        described["security"] = [{"bearerAuth": []}, {}]  # {}: no token when none is set
        errors[401] = "no bearer token, or not a valid one"
    for status, description in errors.items():
        responses[status] = _error(status, description, schemas[Error])
    described["responses"] = {str(status): responses[status] for status in sorted(responses)}
    return described


def _path_parameter(name: str, operation: Operation) -> dict:
    parameter = {"name": name, "in": "path", "required": True}
    if name in operation.path:
        parameter["description"] = operation.path[name]
    return parameter | {"schema": TypeAdapter(str).json_schema()}


def _query_parameters(query: type[BaseModel]) -> list[dict]:
    schema = query.model_json_schema(ref_template=REF, schema_generator=_Schemas)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema["properties"].items():
        field_schema = dict(field_schema)
        parameter = {"name": name, "in": "query", "required": name in required}
        if "description" in field_schema:
            parameter["description"] = field_schema.pop("description")
        parameters.append(parameter | {"schema": field_schema})
    return parameters


def _answer(answer: Answer, schemas: dict) -> dict:
    described: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        described["headers"] = _headers(answer.headers)
    if answer.model is not None:
        schema = schemas.get(answer.model) or TypeAdapter(answer.model).json_schema()
        described["content"] = {answer.media_type: {"schema": schema}}
    return described


def _error(status: int, description: str, schema: dict) -> dict:
    described: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if status == 503:
        described["headers"] = _headers({"Retry-After": _RETRY_AFTER})
    return described


def _headers(headers: Mapping[str, Header]) -> dict:
    return {
        name: {"description": header.description, "schema": TypeAdapter(header.type).json_schema()}
        for name, header in headers.items()
    }
