"""The API fuzzed against its own OpenAPI document, and the document's patterns held to the code.

schemathesis reads `/openapi.json` from a real gunicorn and sends what the document allows and
what it forbids, operation by operation and along the links between operations (create a
user, then read, change and delete it), with every check it has: no 5xx, statuses, content
types, headers and bodies as documented, valid data accepted and invalid data refused. It runs
as a command (its pytest plugin would import ssl before gevent patches), bounded in examples
per operation and in time, with a fixed seed so that a run can be replayed.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gunicorn_proc import Gunicorn
from hypothesis import given
from hypothesis import strategies as st
from pgutil import fresh_database

from config import load_settings
from service.api.errors import ApiError
from service.api.models import NAME_MAX, NAME_PATTERN, UserChange
from service.api.operations import read_body
from service.api.pagination import CURSOR_PATTERN, decode_cursor, encode_cursor
from service.app import create_app
from service.db import schema

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MAX_EXAMPLES = 30  # per operation and phase
SEED = 20261125
DEADLINE_S = 300  # the whole run; about 20 s on two shared cores


@pytest.fixture(scope="module")
def fuzzed_database(database_url):
    """A database of its own: the fuzzer creates and deletes users at will."""
    with fresh_database(database_url, "fuzz") as dsn:
        schema.migrate(dsn, connect_timeout=5)
        yield dsn


def test_every_response_keeps_to_the_openapi_document(fuzzed_database, tmp_path, request, capsys):
    env = {"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "4"}
    with Gunicorn(fuzzed_database, tmp_path / "gunicorn.log", **env) as gunicorn:
        report_path = tmp_path / "report.json"
        done = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"http://127.0.0.1:{gunicorn.port}/openapi.json",
                "--checks=all",
                f"--max-examples={MAX_EXAMPLES}",
                f"--seed={SEED}",
                "--request-timeout=10",
                "--report=json",
                f"--report-json-path={report_path}",
            ],
            cwd=tmp_path,  # its hypothesis database and reports stay out of the repository
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        log = gunicorn.log

    output = done.stdout[-20_000:] + done.stderr[-5_000:]
    assert done.returncode == 0, output
    report = json.loads(report_path.read_text())
    assert report["complete"] and not report["failures"] and not report["errors"], output
    assert report["operations"]["tested"] == report["operations"]["total"], output
    assert not report["warnings"]["unsupported_regex"], "a pattern the fuzzer cannot generate"
    assert "unhandled error" not in log
    figures = {
        "seed": SEED,
        "max_examples": MAX_EXAMPLES,
        "operations": report["operations"]["tested"],
        "test_cases": report["test_cases"]["generated"],
        "seconds": round(report["running_time"], 1),
        "phases": {name: phase["status"] for name, phase in report["phases"].items()},
    }
    with capsys.disabled():
        print(f"\nschemathesis: {json.dumps(figures)}")
    if getattr(request.config, "cache", None) is not None:  # unless -p no:cacheprovider
        request.config.cache.set("reliability/fuzz", figures)


# The document's patterns, held to the code they describe, read as JSON Schema reads them
# (ECMA-262: `$` is the end of the text, hence fullmatch).


@given(st.integers(min_value=0, max_value=10**18 - 1))
def test_every_cursor_the_service_gives_matches_the_documented_pattern(last_id):
    assert re.search(CURSOR_PATTERN, encode_cursor(last_id))


@given(st.from_regex(CURSOR_PATTERN, fullmatch=True))
def test_every_cursor_the_document_allows_is_accepted(raw):
    assert decode_cursor(raw) < 10**18


@pytest.fixture(scope="module")
def bare_app():
    return create_app(load_settings({"DATABASE_URL": "postgresql:///unused"}))


@given(name=st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda n: len(n) <= NAME_MAX))
def test_every_name_the_document_allows_is_accepted(bare_app, name):
    with bare_app.test_request_context(json={"name": name}):
        assert read_body(UserChange).name == name.strip()


@given(name=st.text(max_size=NAME_MAX).filter(lambda n: not re.search(NAME_PATTERN, n)))
def test_every_name_the_document_forbids_is_refused(bare_app, name):
    with bare_app.test_request_context(json={"name": name}), pytest.raises(ApiError) as refused:
        read_body(UserChange)
    assert refused.value.status == 422
    assert refused.value.code == "invalid_name"
