"""Optional bearer tokens (service/api/auth.py): with API_TOKENS set, /users needs one; the
probes stay open; a token is compared in constant time and never logged."""

import pytest
from gunicorn_proc import Gunicorn, request

from config import ConfigError, load_settings

TOKEN = "t0ken-for-the-tests-0123456789"
OTHER = "another-token-for-the-tests-987"
USER = {"name": "Ada", "email": "ada@example.com"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def guarded(make_app):
    return make_app(API_TOKENS=f"{TOKEN}, {OTHER}").test_client()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "unauthorized"),
        ({"Authorization": f"Basic {TOKEN}"}, "unauthorized"),
        ({"Authorization": "Bearer "}, "unauthorized"),
        (bearer("not-the-token-at-all-0000000"), "invalid_token"),
        (bearer(TOKEN[:-1]), "invalid_token"),
        (bearer(TOKEN + "x"), "invalid_token"),
    ],
)
def test_without_a_valid_token_every_users_route_is_a_json_401(guarded, admin, headers, code):
    for method, path, body in [
        ("GET", "/users", None),
        ("GET", "/users/1", None),
        ("POST", "/users", USER),
        ("PATCH", "/users/1", {"name": "x"}),
        ("DELETE", "/users/1", None),
    ]:
        response = guarded.open(path, method=method, json=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.get_json()["error"]["code"] == code
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="service"')
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0  # nothing was stored


@pytest.mark.parametrize("token", [TOKEN, OTHER])
def test_each_configured_token_opens_the_api(guarded, token):
    created = guarded.post("/users", json=USER, headers=bearer(token))
    assert created.status_code == 201
    got = guarded.get(created.headers["Location"], headers=bearer(token))
    assert got.get_json() == created.get_json()


def test_the_probes_metrics_and_document_stay_open(guarded):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert guarded.get(path).status_code == 200, path


def test_without_api_tokens_the_api_stays_open(client):
    assert client.get("/users").status_code == 200


def test_tokens_come_from_a_file_too(make_app, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one a line\n{OTHER}\n\n")
    client = make_app(API_TOKENS=TOKEN, API_TOKENS_FILE=str(tokens)).test_client()
    for token in (TOKEN, OTHER):
        assert client.get("/users", headers=bearer(token)).status_code == 200


@pytest.mark.parametrize(
    "env",
    [
        {"API_TOKENS": "short-token"},
        {"API_TOKENS": f"{TOKEN},{'é' * 20}"},
        {"API_TOKENS": " , "},
        {"API_TOKENS_FILE": "/nonexistent/tokens"},
    ],
)
def test_a_bad_token_setting_is_refused_without_showing_the_token(env):
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    assert "API_TOKENS" in str(refused.value)
    assert "short-token" not in str(refused.value) and TOKEN not in str(refused.value)


def test_settings_never_print_the_tokens():
    assert TOKEN not in repr(load_settings({"API_TOKENS": TOKEN}))


def test_real_gunicorn_asks_for_the_token_and_never_logs_it(database_url, tmp_path):
    env = {"WEB_CONCURRENCY": "1", "DB_POOL_MAX": "1", "API_TOKENS": TOKEN}
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as gunicorn:
        refused = request(gunicorn.port, "GET", "/users", headers=bearer(OTHER))
        allowed = request(gunicorn.port, "GET", "/users", headers=bearer(TOKEN))
        health = request(gunicorn.port, "GET", "/healthz")
        log = gunicorn.log
    assert (refused.status, allowed.status, health.status) == (401, 200, 200)
    assert refused.json["error"]["code"] == "invalid_token"
    assert "WWW-Authenticate" in refused.headers
    assert TOKEN not in log and OTHER not in log
