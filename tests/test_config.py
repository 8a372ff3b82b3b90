"""Settings are read once from a mapping, with defaults, and every bad value names its variable."""

import re

import pytest
from pydantic import ValidationError

from config import ConfigError, load_settings, redact_dsn


def test_defaults_size_the_pool_to_the_worker_concurrency():
    s = load_settings({"WEB_CONCURRENCY": "4"})
    assert (s.port, s.worker_connections, s.db_max_connections) == (8000, 1000, 20)
    assert s.db_pool_max == 5  # 20 server connections shared by 4 workers
    assert s.db_pool_min == 2
    assert (s.db_pool_timeout, s.db_statement_timeout_ms, s.db_connect_timeout) == (5.0, 5000, 5)
    assert s.db_pool_max_lifetime == 3600.0
    assert s.app_instances == 1  # the connection budget counts this instance alone
    assert s.database_url == ""  # libpq then reads PGHOST, PGUSER, ...


@pytest.mark.parametrize(
    ("env", "pool_max"),
    [
        ({"WEB_CONCURRENCY": "30"}, 1),  # never below one
        ({"WEB_CONCURRENCY": "1", "WORKER_CONNECTIONS": "3"}, 3),  # never above concurrency
        ({"WEB_CONCURRENCY": "2", "DB_MAX_CONNECTIONS": "100"}, 50),
        ({"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "40"}, 40),  # explicit wins over the default
    ],
)
def test_pool_max_follows_the_connection_budget(env, pool_max):
    assert load_settings(env).db_pool_max == pool_max


def test_web_concurrency_defaults_to_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the host's, not ours
    assert load_settings({}).web_concurrency == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"WEB_CONCURRENCY": "-1"}, "WEB_CONCURRENCY"),
        ({"WORKER_CONNECTIONS": "1.5"}, "WORKER_CONNECTIONS"),
        ({"DB_POOL_TIMEOUT": "abc"}, "DB_POOL_TIMEOUT"),
        ({"DB_POOL_TIMEOUT": "0"}, "DB_POOL_TIMEOUT"),
        ({"DB_STATEMENT_TIMEOUT_MS": "0"}, "DB_STATEMENT_TIMEOUT_MS"),
        ({"DB_CONNECT_TIMEOUT": "5s"}, "DB_CONNECT_TIMEOUT"),
        ({"DB_POOL_MAX_LIFETIME": "-3"}, "DB_POOL_MAX_LIFETIME"),
        ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX"),
        ({"DB_POOL_MAX_WAITING": "-1"}, "DB_POOL_MAX_WAITING"),
        ({"DB_POOL_LEAK_WARN_S": "0"}, "DB_POOL_LEAK_WARN_S"),
        ({"APP_INSTANCES": "0"}, "APP_INSTANCES"),
        ({"DB_POOL_MIN": "6", "DB_POOL_MAX": "5"}, "DB_POOL_MIN"),
        ({"WEB_CONCURRENCY": "4", "DB_POOL_MAX": "10", "DB_MAX_CONNECTIONS": "20"}, "DB_POOL_MAX"),
        ({"DATABASE_URL": "postgresql://u:hunter2@h/db?bogus=1"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:hunter2@h:bad/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "host=h,g port=5432,70000 password=hunter2"}, "DATABASE_URL"),
        ({"DATABASE_URL": "host=h port=\u00b2 password=hunter2"}, "DATABASE_URL"),
    ],
)
def test_a_bad_value_is_refused_with_the_variable_named(env, named):
    with pytest.raises(ConfigError, match=named) as refused:
        load_settings({"WEB_CONCURRENCY": "2", **env})
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h:6432/db",
        "host=h,g port=5432,6432",
        "host=h,g port=,6432",
        "host=h port='5432 '",  # libpq reads it as 5432
    ],
)
def test_a_database_url_with_good_ports_is_accepted(url):
    assert load_settings({"WEB_CONCURRENCY": "2", "DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "70000"}, "PORT=70000 is out of range: accepted 1 to 65535"),
        ({"PORT": "http"}, "PORT='http' is not a whole number: accepted 1 to 65535"),
        (
            {"DB_POOL_TIMEOUT": "nan"},
            "DB_POOL_TIMEOUT='nan' is not a number: accepted 0.001 to 3600",
        ),
        ({"REPLICA_POLL_INTERVAL_S": "0.001"}, "accepted 0.005 to 10"),
    ],
)
def test_a_bad_number_message_says_what_is_accepted(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings({"WEB_CONCURRENCY": "2", **env})


def test_every_bad_variable_has_its_own_message():
    with pytest.raises(ConfigError) as refused:
        load_settings({"PORT": "0", "WEB_CONCURRENCY": "many", "DB_POOL_TIMEOUT": "-1"})
    assert str(refused.value).split("; ") == [
        "PORT=0 is out of range: accepted 1 to 65535",
        "WEB_CONCURRENCY='many' is not a whole number: accepted 1 to 256",
        "DB_POOL_TIMEOUT=-1 is out of range: accepted 0.001 to 3600",
    ]


def test_a_blank_variable_takes_its_default():
    assert load_settings({"WEB_CONCURRENCY": "2", "PORT": "  ", "DATABASE_URL": ""}).port == 8000


def test_only_the_mapping_given_is_read(monkeypatch, tmp_path):
    """pydantic-settings would read os.environ and a .env file itself: neither is a source."""
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DB_POOL_TIMEOUT=42\n")
    settings = load_settings({"WEB_CONCURRENCY": "2"})
    assert (settings.port, settings.db_pool_timeout) == (8000, 5.0)


def test_settings_are_frozen():
    settings = load_settings({"WEB_CONCURRENCY": "2"})
    with pytest.raises(ValidationError, match="frozen"):
        settings.port = 9000


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:hunter2@db.internal:5432/app",
        "postgresql://app@db.internal/app?password=hunter2",
        "host=db.internal user=app password=hunter2 dbname=app",
    ],
)
def test_passwords_never_appear_in_the_printable_dsn(dsn):
    settings = load_settings({"DATABASE_URL": dsn, "WEB_CONCURRENCY": "1"})
    assert "hunter2" not in settings.safe_database_url
    assert "db.internal" in settings.safe_database_url
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in redact_dsn(dsn)
