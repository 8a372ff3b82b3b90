"""One declaration per route: its method and path, what it reads and what it answers.

`route()` registers a view on a blueprint, as Flask's `bp.get()` does, and records its
`Operation`: a summary, the model of its JSON body and of its query parameters (pydantic), a
description of its path parameters (each is documented, as text, described or not), and each
status it answers with its model and headers.
That one declaration both

* validates: the view is called with `body=` and `query=`, instances of those models that
  pydantic-core validated, or the client gets the refusal below and the view never runs;
* documents: service/api/openapi.py builds `/openapi.json` from the operations of the routes
  the app serves, and refuses to build one while a route has none.

A refusal keeps the API's error shape (service/api/errors.py), and names what it refuses. For
a body, in this order: not a JSON object, 422 `invalid_body`; unknown fields, 422
`unknown_field` with all of them; missing fields, 422 `missing_field`; then the first field
refused, in the model's order, 422 `invalid_<field>` with the field's description as the
message. A query parameter refused gives 400 `invalid_<parameter>`. Malformed JSON (400), a
body that is not JSON (415) or is over 1 MiB (413) are refused before the model sees it, by
`request.get_json()` and service/app.py.

The body is parsed by the standard library (Flask's `get_json`), then validated with
`model_validate`: pydantic's own parser (`model_validate_json`) refuses, as malformed JSON,
text that the API takes today and refuses with 422 (a lone surrogate in a string) or accepts
(a byte order mark, UTF-16).

Why our own and not flask-openapi3 or spectree: both wrap every view and parse each request
through their own layer, with their own error bodies; ours adds one call to a route that reads
a body or a query, and none to the others (registered as they are), and its refusals are the
API's own. What it does not do: validate responses (the models document them; tests hold real
responses to the document).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, request
from pydantic import BaseModel, ValidationError

from service.api.errors import ApiError

Model = TypeVar("Model", bound=BaseModel)
View = TypeVar("View", bound=Callable[..., Any])

BUSY = {503: "the database is busy, slow or unreachable: retry later"}
BODY_ERRORS = {
    400: "malformed JSON, or malformed chunked framing",
    413: "body larger than 1 MiB",
    415: "body is not application/json, or has a content coding (Accept-Encoding)",
    422: "invalid field values, unknown or missing fields",
}


@dataclass(frozen=True)
class Header:
    description: str
    type: Any = str


@dataclass(frozen=True)
class Answer:
    """A status that is not an error: its body's model (None: no body) and headers."""

    description: str
    model: Any = None
    media_type: str = "application/json"
    headers: Mapping[str, Header] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    method: str
    summary: str
    answers: Mapping[int, Answer]
    errors: Mapping[int, str]  # status: description; each answers service.api.models.Error
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    path: Mapping[str, str] = field(default_factory=dict)  # description of a path parameter


_DECLARED: dict[Callable[..., Any], Operation] = {}


def route(
    bp: Blueprint,
    method: str,
    rule: str,
    *,
    summary: str,
    answers: Mapping[int, Answer],
    errors: Mapping[int, str] | None = None,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    path: Mapping[str, str] | None = None,
) -> Callable[[View], View]:
    """Serve the decorated view at `method` `rule` of `bp`, validating and documenting it as
    declared (module docstring). A body adds the statuses of BODY_ERRORS to `errors`, a query
    400."""
    errors = dict(errors or {})
    if body is not None:
        errors = {**BODY_ERRORS, **errors}
    if query is not None:
        errors.setdefault(400, "invalid " + " or ".join(query.model_fields))
    operation = Operation(method, summary, answers, errors, body, query, path or {})

    def declare(view: View) -> View:
        served = view if body is None and query is None else _reading(view, body, query)
        _DECLARED[served] = operation
        bp.add_url_rule(rule, view_func=served, methods=[method])
        return view

    return declare


def declare(view: Callable[..., Any], method: str, *, summary: str, answers: Mapping[int, Answer]):
    """Document `view`, which a lower layer registered itself (service/observability's
    `/metrics` may not import the API layer): it reads neither a body nor a query."""
    _DECLARED[view] = Operation(method, summary, answers, {})


def declared(view: Callable[..., Any]) -> Operation | None:
    """The operation `route()` declared for a view the app serves, or None."""
    return _DECLARED.get(view)


def _reading(
    view: Callable[..., Any], body: type[BaseModel] | None, query: type[BaseModel] | None
) -> Callable[..., Any]:
    @wraps(view)
    def served(**kwargs: Any) -> Any:
        if query is not None:
            kwargs["query"] = read_query(query)
        if body is not None:
            kwargs["body"] = read_body(body)
        return view(**kwargs)

    return served


def read_body(model: type[Model]) -> Model:
    """The request's JSON body as `model`, or ApiError (module docstring)."""
    try:
        body = request.get_json()  # 415 when not JSON, 400 when malformed, 413 when over 1 MiB
    except RecursionError:  # valid JSON nested deeper than the parser goes: still the client's
        raise ApiError(400, "bad_request", "the JSON body is nested too deeply") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc, model, body, 422) from None


def read_query(model: type[Model]) -> Model:
    """The query parameters as `model` (the first value of a repeated one), or 400."""
    query = request.args.to_dict()
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise _refusal(exc, model, query, 400) from None


def _refusal(exc: ValidationError, model: type[BaseModel], sent: Any, status: int) -> ApiError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    whole = [error for error in errors if not error["loc"]]
    if whole and whole[0]["type"] == "model_type":
        return ApiError(status, "invalid_body", "the body must be a JSON object")
    unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
    if whole and whole[0]["type"] == "string_unicode":
        # A key that is not Unicode text (a lone surrogate) stops pydantic before it can name
        # the key; it is no field's name.
        unknown = sorted(set(sent) - set(model.model_fields))
    if unknown:
        return ApiError(status, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    missing = [str(error["loc"][0]) for error in errors if error["type"] == "missing"]
    if missing:
        return ApiError(status, "missing_field", f"missing field(s): {', '.join(missing)}")
    if whole:  # the model's own check of the fields together
        return ApiError(status, whole[0]["type"], whole[0]["msg"])
    name = str(errors[0]["loc"][0])
    described = model.model_fields[name].description or errors[0]["msg"]
    return ApiError(status, f"invalid_{name}", f"invalid {name}: {described}")
