"""Property-based tests of everything that parses client input: the cursor, the limit, the
user id and the JSON body. Whatever a client sends, the answer is the value asked for or a
clear 4xx — never another exception, never a 500, never a row stored from bad input."""

import json
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import load_settings
from service.api.errors import ApiError
from service.api.models import EMAIL_MAX, NAME_MAX
from service.api.operations import read_query
from service.api.pagination import BIGINT_MAX, MAX_LIMIT, PageQuery, decode_cursor, encode_cursor
from service.api.users import _parse_id
from service.app import create_app

ids = st.integers(min_value=1, max_value=BIGINT_MAX)
texts = st.text(max_size=40) | st.text(string.ascii_letters + string.digits + "-_=:", max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
# Text the service stores: no control character (C0, DEL, C1) and no lone surrogate.
storable = st.characters(blacklist_categories=("Cc", "Cs"))
# A name with something besides white space; white space around it is trimmed.
names = st.text(storable, min_size=1, max_size=NAME_MAX).filter(str.strip)
# local@domain.tld: neither part holds "@" or white space, and no domain label is empty.
email_parts = storable.filter(lambda c: c != "@" and not c.isspace())
emails = st.builds(
    "{}@{}".format,
    st.text(email_parts, min_size=1, max_size=64),
    st.lists(
        st.text(email_parts.filter(lambda c: c != "."), min_size=1), min_size=2, max_size=4
    ).map(".".join),
).filter(lambda email: len(email) <= EMAIL_MAX)
valid_bodies = st.fixed_dictionaries({"name": names, "email": emails})
bodies = (
    valid_bodies
    | st.fixed_dictionaries(
        {},
        optional={"name": names | json_values, "email": emails | json_values, "extra": json_values},
    )
    | json_values
)
# Each property below runs this many examples; at least this share of them must be stored (201),
# or the "stored whole" half of the property would go untested. The examples are the same on
# every run (derandomize): Hypothesis repeats small emails, and how many repeats end in 409
# would otherwise move the share from run to run.
BODY_EXAMPLES = 150
STORED_AT_LEAST = 0.25


@pytest.fixture(scope="module")
def bare_app():
    return create_app(load_settings({"DATABASE_URL": "postgresql:///unused"}))


@given(ids)
def test_a_cursor_names_the_id_it_was_made_from(last_id):
    assert decode_cursor(encode_cursor(last_id)) == last_id


@given(texts)
def test_any_other_cursor_is_refused_with_400(bare_app, raw):
    try:
        with bare_app.test_request_context(query_string={"cursor": raw}):
            last_id = read_query(PageQuery).cursor
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_cursor")
    else:
        assert encode_cursor(last_id) == raw  # only what the service itself hands out


@given(texts)
def test_a_limit_is_1_to_500_or_refused_with_400(bare_app, raw):
    try:
        with bare_app.test_request_context(query_string={"limit": raw}):
            limit = read_query(PageQuery).limit
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "invalid_limit")
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


def assert_stored_whole(admin, response, sent: dict) -> None:
    """A 201 answers with the fields sent (the name trimmed), and the one row stored holds
    exactly what it answered."""
    created = response.get_json()
    assert created["email"] == sent["email"] and created["name"] == sent["name"].strip()
    assert response.headers["Location"] == f"/users/{created['id']}"
    admin.execute("SELECT id, name, email FROM users")
    assert admin.fetchall() == [(created["id"], created["name"], created["email"])]


def assert_refused_cleanly(admin, response, statuses: tuple[int, ...]) -> None:
    assert response.status_code in statuses, response.get_json()
    assert set(response.get_json()["error"]) == {"code", "message"}
    admin.execute("SELECT count(*) FROM users")
    assert admin.fetchone()[0] == 0


def test_any_json_body_is_stored_whole_or_refused_cleanly(fuzz_client, admin):
    answered = Counter()

    @settings(max_examples=BODY_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(body=bodies)
    def post(body):
        admin.execute("TRUNCATE users")
        response = fuzz_client.post(
            "/users", data=json.dumps(body), content_type="application/json"
        )
        answered[response.status_code] += 1
        if response.status_code == 201:
            assert_stored_whole(admin, response, body)
        else:
            assert_refused_cleanly(admin, response, (422,))

    post()
    assert answered[201] >= STORED_AT_LEAST * answered.total(), answered


# JSON objects as a client would encode them: \u escapes, or UTF-8 as it is.
valid_json = st.builds(
    lambda body, ascii: json.dumps(body, ensure_ascii=ascii).encode(), valid_bodies, st.booleans()
)


def test_any_bytes_sent_as_json_get_a_json_answer_and_store_nothing_bad(fuzz_client, admin):
    answered = Counter()

    @settings(max_examples=BODY_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(raw=st.binary(max_size=200) | texts.map(str.encode) | valid_json)
    def post(raw):
        admin.execute("TRUNCATE users")
        response = fuzz_client.post("/users", data=raw, content_type="application/json")
        answered[response.status_code] += 1
        if response.status_code == 201:
            assert_stored_whole(admin, response, json.loads(raw))
        else:
            assert_refused_cleanly(admin, response, (400, 422))

    post()
    assert answered[201] >= STORED_AT_LEAST * answered.total(), answered
