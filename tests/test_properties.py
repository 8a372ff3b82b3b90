"""Property-based tests of everything that parses client input: the cursor, the limit, the
user id and the JSON body. Whatever a client sends, the answer is the value asked for or a
clear 4xx — never another exception, never a 500, never a row stored from bad input."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.errors import ApiError
from service.api.pagination import BIGINT_MAX, MAX_LIMIT, decode_cursor, encode_cursor, parse_limit
from service.api.users import _parse_id

ids = st.integers(min_value=1, max_value=BIGINT_MAX)
texts = st.text(max_size=40) | st.text(string.ascii_letters + string.digits + "-_=:", max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
bodies = (
    st.fixed_dictionaries(
        {}, optional={"name": json_values, "email": json_values, "extra": json_values}
    )
    | json_values
)


@given(ids)
def test_a_cursor_names_the_id_it_was_made_from(last_id):
    assert decode_cursor(encode_cursor(last_id)) == last_id


@given(texts)
def test_any_other_cursor_is_refused_with_400(raw):
    try:
        last_id = decode_cursor(raw)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert encode_cursor(last_id) == raw  # only what the service itself hands out


@given(texts)
def test_a_limit_is_1_to_500_or_refused_with_400(raw):
    try:
        limit = parse_limit(raw)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert 1 <= limit <= MAX_LIMIT and str(limit) == raw.lstrip("0")


@given(texts | ids.map(str))
def test_a_user_id_is_a_positive_bigint_or_names_no_user(raw):
    try:
        uid = _parse_id(raw)
    except ApiError as exc:
        assert exc.status == 404
    else:
        assert 0 < uid <= BIGINT_MAX and int(raw) == uid


@pytest.fixture
def fuzz_client(app):
    return app.test_client()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
def test_any_json_body_is_stored_whole_or_refused_cleanly(fuzz_client, admin, body):
    admin.execute("TRUNCATE users")
    response = fuzz_client.post("/users", data=json.dumps(body), content_type="application/json")
    admin.execute("SELECT name, email FROM users")
    rows = admin.fetchall()
    if response.status_code == 201:
        created = response.get_json()
        assert rows == [(created["name"], created["email"])]
        assert created["email"] == body["email"] and created["name"] == body["name"].strip()
    else:
        assert response.status_code == 422, response.get_json()
        assert set(response.get_json()["error"]) == {"code", "message"}
        assert rows == []


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=200) | texts.map(str.encode))
def test_any_bytes_sent_as_json_get_a_json_answer_and_store_nothing_bad(fuzz_client, admin, raw):
    admin.execute("TRUNCATE users")
    response = fuzz_client.post("/users", data=raw, content_type="application/json")
    assert response.status_code in (201, 400, 422)
    assert set(response.get_json()["error"] if response.status_code != 201 else ()) <= {
        "code",
        "message",
    }
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == (1 if response.status_code == 201 else 0)
    if response.status_code == 201:
        assert json.loads(raw)["email"] == response.get_json()["email"]
