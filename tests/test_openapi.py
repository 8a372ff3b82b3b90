"""`/openapi.json` is a valid OpenAPI 3 document that names every route and says what it returns.

The document is generated from the routes' declarations and models (service/api/openapi.py);
these tests hold it to the app: every route and method in `app.url_map` is documented (and
nothing else is), every error is documented with the error schema, and real responses match
the schemas the document gives for their status (the handlers answer dicts, which nothing
validates at run time).
"""

import re

import pytest
from flask import Blueprint
from gunicorn_proc import free_port
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate as validate_spec

from service import db
from service.api.openapi import build
from service.api.operations import route
from service.app import create_app

UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}

# What the issue promises for each operation.
STATUSES = {
    ("get", "/healthz"): {200},
    ("get", "/readyz"): {200, 503},
    ("get", "/openapi.json"): {200},
    ("get", "/metrics"): {200},
    ("get", "/users"): {200, 400, 503},
    ("post", "/users"): {201, 400, 409, 413, 415, 422, 503},
    ("get", "/users/{user_id}"): {200, 404, 503},
    ("patch", "/users/{user_id}"): {200, 400, 404, 409, 413, 415, 422, 503},
    ("delete", "/users/{user_id}"): {204, 404, 503},
}


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "parameters":
                yield method, path, operation


def app_operations(app) -> set[tuple[str, str]]:
    """(method, OpenAPI path) for every route the app serves, `<int:x>` written as `{x}`."""
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        served |= {(method.lower(), path) for method in rule.methods - UNDOCUMENTED_METHODS}
    return served


def test_the_document_is_valid_openapi_3(document):
    validate_spec(document)
    assert document["openapi"].startswith("3.")


def test_every_route_and_method_is_documented_and_nothing_else(app, document):
    served = app_operations(app)
    documented = {(method, path) for method, path, _ in operations(document)}
    assert ("patch", "/users/{user_id}") in served  # the conversion works
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_a_route_without_a_declaration_stops_the_document(make_settings):
    app = create_app(make_settings())
    app.add_url_rule("/undeclared", view_func=lambda: "")
    with pytest.raises(ValueError, match="/undeclared has no declaration"):
        build(app)


def test_a_description_of_a_parameter_the_route_lacks_stops_the_document(make_settings):
    app = create_app(make_settings())
    extra = Blueprint("extra", __name__)

    @route(extra, "GET", "/extra/<item>", summary="x", answers={}, path={"id": "no such"})
    def extra_item(item: str):
        return ""

    app.register_blueprint(extra)
    with pytest.raises(ValueError, match="/extra/<item> has no parameter id"):
        build(app)


def test_each_operation_documents_the_statuses_it_returns(document):
    for method, path, operation in operations(document):
        documented = {int(status) for status in operation["responses"]}
        missing = STATUSES[(method, path)] - documented
        assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"


def test_every_error_response_has_the_error_schema(document):
    error_ref = {"$ref": "#/components/schemas/Error"}
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            where = f"{method.upper()} {path} {status}"
            assert response["content"]["application/json"]["schema"] == error_ref, where
            if status == "503":
                assert "Retry-After" in response["headers"], where
    schemas = document["components"]["schemas"]
    detail = schemas["Error"]["properties"]["error"]["$ref"].rpartition("/")[2]
    assert schemas[detail]["required"] == ["code", "message"]


def assert_documented(document: dict, method: str, path: str, response) -> None:
    """The response's status is documented for the operation, and its body and headers match."""
    documented = document["paths"][path][method]["responses"].get(str(response.status_code))
    assert documented is not None, f"{method.upper()} {path} gave {response.status_code}"
    for header in documented.get("headers", {}):
        assert header in response.headers, f"{method.upper()} {path}: no {header}"
    if "content" not in documented:
        assert response.get_data() == b""
        return
    schema = documented["content"]["application/json"]["schema"]
    body = response.get_json()
    validate_instance(body, {**schema, "components": document["components"]}, cls=OAS31Validator)


def test_real_responses_match_their_documented_schemas(client, document, subtests):
    ada = {"name": "Ada", "email": "ada@example.com"}
    created = client.post("/users", json=ada)
    user = f"/users/{created.get_json()['id']}"
    exchanges = [
        ("post", "/users", 201, created),
        ("post", "/users", 409, client.post("/users", json=ada)),
        ("post", "/users", 422, client.post("/users", json={"name": ""})),
        ("post", "/users", 400, client.post("/users", data="{", content_type="application/json")),
        ("post", "/users", 415, client.post("/users", data="Ada", content_type="text/plain")),
        ("post", "/users", 413, client.post("/users", json={"name": "x" * (1 << 20)})),
        ("get", "/users", 200, client.get("/users?limit=1")),
        ("get", "/users", 400, client.get("/users?limit=0")),
        ("get", "/users/{user_id}", 200, client.get(user)),
        ("get", "/users/{user_id}", 404, client.get("/users/abc")),
        ("patch", "/users/{user_id}", 200, client.patch(user, json={"name": "Bob"})),
        ("patch", "/users/{user_id}", 422, client.patch(user, json={})),
        ("delete", "/users/{user_id}", 204, client.delete(user)),
        ("delete", "/users/{user_id}", 404, client.delete(user)),
        ("get", "/healthz", 200, client.get("/healthz")),
        ("get", "/readyz", 200, client.get("/readyz")),
        ("get", "/openapi.json", 200, client.get("/openapi.json")),
    ]
    for method, path, status, response in exchanges:
        with subtests.test(method=method, path=path, status=status):
            assert response.status_code == status
            assert_documented(document, method, path, response)


def test_503_responses_match_the_documented_schema(make_settings, document):
    app = create_app(make_settings(DATABASE_URL=f"postgresql://u:p@127.0.0.1:{free_port()}/x"))
    db.open_pool(app)
    try:
        client = app.test_client()
        for method, path, url in [("get", "/readyz", "/readyz"), ("get", "/users", "/users")]:
            response = client.get(url)
            assert response.status_code == 503
            assert_documented(document, method, path, response)
    finally:
        db.close_pool(app)
