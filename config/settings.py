"""Settings from the environment, read and validated once at start.

Every variable is in `VARIABLES` with its default and accepted range, so the README table and
the error messages come from one place. `load_settings()` takes a mapping (tests pass a dict,
production passes `os.environ`) and returns a frozen `Settings`, or raises `ConfigError` naming
the variable and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2.extensions


class ConfigError(ValueError):
    """A variable is out of range or malformed; the message names it and the accepted range."""


@dataclass(frozen=True)
class Variable:
    name: str
    kind: type
    default: object  # a value, or a callable of the settings read so far (derived defaults)
    low: float
    high: float
    help: str


def _cpu_count() -> int:
    """CPUs this process may use: a container limited by cpuset sees its share, not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_pool_max(s: dict) -> int:
    return max(1, min(s["worker_connections"], s["db_max_connections"] // s["web_concurrency"]))


# Order matters: a derived default may use only the variables above it.
VARIABLES = (
    Variable("PORT", int, 8000, 1, 65535, "TCP port the service listens on (0.0.0.0)"),
    Variable(
        "METRICS_PORT",
        int,
        0,
        0,
        65535,
        "TCP port serving /metrics alone (0.0.0.0), which the public port then does not serve; "
        "0: /metrics on the public port",
    ),
    Variable(
        "WEB_CONCURRENCY",
        int,
        lambda s: _cpu_count(),
        1,
        256,
        "gunicorn worker processes (default: the CPUs this process may run on)",
    ),
    Variable(
        "WORKER_CONNECTIONS",
        int,
        1000,
        1,
        100_000,
        "concurrent HTTP connections per worker (greenlets)",
    ),
    Variable(
        "HTTP_HEAD_TIMEOUT",
        float,
        10.0,
        0.1,
        3600,
        "seconds a client has to send a request's head (line and headers): from connect for "
        "the first request, from its first byte for a later one; missed: the connection closes",
    ),
    Variable(
        "HTTP_BODY_TIMEOUT",
        float,
        30.0,
        0.1,
        3600,
        "seconds a client has to send a whole request body, from the end of its head",
    ),
    Variable(
        "HTTP_KEEPALIVE_TIMEOUT",
        int,
        15,
        0,
        3600,
        "seconds an idle keep-alive connection may wait for its next request (0: one request "
        "per connection)",
    ),
    Variable(
        "HTTP_WRITE_TIMEOUT",
        float,
        30.0,
        0.1,
        3600,
        "seconds a client has to take a whole response, from its first byte",
    ),
    Variable(
        "DRAIN_SECONDS",
        float,
        5.0,
        0,
        60,
        "seconds a worker keeps serving after SIGTERM while /readyz answers 503, so that a load "
        "balancer stops sending it requests; then it stops accepting and finishes those in "
        "flight, within gunicorn's graceful_timeout (25 s) of the SIGTERM, of which the drain "
        "must leave more than 3 s",
    ),
    Variable(
        "DB_MAX_CONNECTIONS",
        int,
        20,
        1,
        100_000,
        "server connections this instance may use in all, across its workers",
    ),
    Variable(
        "DB_POOL_MAX",
        int,
        _default_pool_max,
        1,
        10_000,
        "connections per worker (default: "
        "max(1, min(WORKER_CONNECTIONS, DB_MAX_CONNECTIONS // WEB_CONCURRENCY)))",
    ),
    Variable(
        "DB_POOL_MIN",
        int,
        lambda s: min(2, s["db_pool_max"]),
        0,
        10_000,
        "connections each worker opens at start, best effort (default: min(2, DB_POOL_MAX))",
    ),
    Variable(
        "APP_INSTANCES",
        int,
        1,
        1,
        10_000,
        "instances of the service sharing the database server: at start, WEB_CONCURRENCY x "
        "DB_POOL_MAX x APP_INSTANCES must fit in the server's max_connections",
    ),
    Variable(
        "DB_POOL_TIMEOUT",
        float,
        5.0,
        0.001,
        3600,
        "seconds a request may wait for a free connection before it gets 503",
    ),
    Variable(
        "DB_STATEMENT_TIMEOUT_MS",
        int,
        5000,
        1,
        86_400_000,
        "milliseconds any statement may run before it is cancelled (503)",
    ),
    Variable(
        "DB_POOL_MAX_WAITING",
        int,
        0,
        0,
        1_000_000,
        "requests per worker that may wait for a connection; more get 503 at once (0: no cap)",
    ),
    Variable("DB_CONNECT_TIMEOUT", int, 5, 1, 3600, "seconds to establish a server connection"),
    Variable(
        "DB_POOL_MAX_LIFETIME",
        float,
        3600.0,
        1,
        604_800,
        "seconds after which a connection is replaced (with up to 10% jitter)",
    ),
    Variable(
        "TRUSTED_PROXIES",
        int,
        0,
        0,
        10,
        "proxies in front of the service whose X-Forwarded-For and X-Forwarded-Proto are "
        "trusted (a load balancer: 1); 0 ignores those headers",
    ),
    Variable(
        "DB_POOL_LEAK_WARN_S",
        float,
        30.0,
        0.001,
        86_400,
        "seconds a request may hold a connection before a warning logs the stack that holds it",
    ),
    Variable(
        "REPLICA_POLL_INTERVAL_S",
        float,
        0.025,
        0.005,
        10,
        "seconds between two reads of each replica's replay position, by each worker",
    ),
    Variable(
        "REPLICA_MAX_LAG_S",
        float,
        10.0,
        0.1,
        3600,
        "seconds a replica may lag behind the primary and stay in rotation: the oldest a read "
        "without a token may be",
    ),
    Variable(
        "REPLICA_CATCH_UP_S",
        float,
        0.1,
        0,
        10,
        "seconds a read whose position no replica has replayed waits for one, then goes to the "
        "primary",
    ),
)


# A bearer token shorter than this is refused: it could be guessed.
TOKEN_MIN_LENGTH = 16


@dataclass(frozen=True)
class Settings:
    database_url: str = field(repr=False)  # may hold a password: never printed
    database_replica_urls: tuple[str, ...] = field(repr=False)  # likewise
    api_tokens: tuple[str, ...] = field(repr=False)  # secrets: never printed
    port: int
    metrics_port: int
    web_concurrency: int
    worker_connections: int
    http_head_timeout: float
    http_body_timeout: float
    http_keepalive_timeout: int
    http_write_timeout: float
    drain_seconds: float
    db_max_connections: int
    db_pool_max: int
    db_pool_min: int
    app_instances: int
    db_pool_timeout: float
    db_statement_timeout_ms: int
    db_pool_max_waiting: int
    db_connect_timeout: int
    db_pool_max_lifetime: float
    trusted_proxies: int
    db_pool_leak_warn_s: float
    replica_poll_interval_s: float
    replica_max_lag_s: float
    replica_catch_up_s: float

    @property
    def safe_database_url(self) -> str:
        """The DSN with any password replaced, fit for logs and responses."""
        return redact_dsn(self.database_url)


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Read every variable from `environ`; raise ConfigError on the first bad one."""
    values: dict = {
        "database_url": _database_url(environ),
        "database_replica_urls": _replica_urls(environ),
        "api_tokens": _api_tokens(environ),
    }
    for var in VARIABLES:
        values[var.name.lower()] = _read(environ, var, values)
    _check_ports(values)
    _check_pool(environ, values)
    return Settings(**values)


def _read(environ: Mapping[str, str], var: Variable, so_far: dict) -> int | float:
    raw = environ.get(var.name, "").strip()
    if not raw:
        default = var.default
        return default(so_far) if callable(default) else default
    try:
        value = var.kind(raw)
    except ValueError:
        raise ConfigError(f"{var.name}={raw!r} is not {_kind_name(var)}") from None
    if not var.low <= value <= var.high:
        raise ConfigError(f"{var.name}={raw} is out of range: {_range(var)}")
    return value


def _kind_name(var: Variable) -> str:
    return "a whole number" if var.kind is int else "a number"


def _range(var: Variable) -> str:
    return f"accepted {var.kind(var.low)} to {var.kind(var.high)}"


def _check_ports(v: dict) -> None:
    if v["metrics_port"] and v["metrics_port"] == v["port"]:
        raise ConfigError(f"METRICS_PORT={v['metrics_port']} is PORT too: give /metrics its own")


def _check_pool(environ: Mapping[str, str], v: dict) -> None:
    if v["db_pool_min"] > v["db_pool_max"]:
        raise ConfigError(
            f"DB_POOL_MIN={v['db_pool_min']} is greater than DB_POOL_MAX={v['db_pool_max']}"
        )
    # An explicit DB_POOL_MAX wins over the default budget, but not over an explicit one.
    wanted = v["db_pool_max"] * v["web_concurrency"]
    if environ.get("DB_MAX_CONNECTIONS", "").strip() and wanted > v["db_max_connections"]:
        raise ConfigError(
            f"DB_POOL_MAX={v['db_pool_max']} x WEB_CONCURRENCY={v['web_concurrency']} = {wanted} "
            f"exceeds DB_MAX_CONNECTIONS={v['db_max_connections']}; lower one or raise the budget"
        )


def _database_url(environ: Mapping[str, str]) -> str:
    """DATABASE_URL, or "" so that libpq reads its PG* variables (PGHOST, PGUSER, ...)."""
    return _checked_url("DATABASE_URL", environ.get("DATABASE_URL", "").strip())


def _replica_urls(environ: Mapping[str, str]) -> tuple[str, ...]:
    """DATABASE_REPLICA_URLS: streaming replicas' URLs, separated by white space (a URL may
    hold commas: libpq's several hosts); () when unset, and every query goes to DATABASE_URL."""
    urls = environ.get("DATABASE_REPLICA_URLS", "").split()
    for url in urls:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"DATABASE_REPLICA_URLS holds {redact_dsn(url)!r}: accepted postgresql:// URLs "
                "separated by white space"
            )
        _checked_url("DATABASE_REPLICA_URLS", url)
    if len(set(urls)) != len(urls):
        raise ConfigError("DATABASE_REPLICA_URLS names a replica twice")
    return tuple(urls)


def _checked_url(name: str, url: str) -> str:
    if url:
        try:
            params = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError:
            raise ConfigError(
                f"{name}={redact_dsn(url)!r} is not a valid PostgreSQL URL or DSN"
            ) from None
        # libpq parses the port only when it connects: `host:bad` would pass as a DSN and then
        # fail every connect, so the start would wait for a database it can never reach.
        # One port per host, or none; "²".isdigit() is true too, hence isascii().
        ports = [port.strip() for port in params.get("port", "").split(",")]
        if not all(
            not port or (port.isascii() and port.isdigit() and 0 < int(port) < 65536)
            for port in ports
        ):
            raise ConfigError(
                f"{name}={redact_dsn(url)!r} has port {params['port']!r}; accepted a "
                "number from 1 to 65535 (one per host)"
            )
    return url


def _api_tokens(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The bearer tokens of API_TOKENS (comma-separated) and API_TOKENS_FILE (one a line; `#`
    starts a comment line), together; () when neither is set, and the API is open. A message
    names the variable, never a token."""
    tokens = [token.strip() for token in environ.get("API_TOKENS", "").split(",")]
    path = environ.get("API_TOKENS_FILE", "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"API_TOKENS_FILE={path!r} cannot be read: {exc}") from None
        tokens += [line.strip() for line in lines if not line.strip().startswith("#")]
    tokens = [token for token in tokens if token]
    for token in tokens:
        if len(token) < TOKEN_MIN_LENGTH or not token.isascii() or not token.isprintable():
            raise ConfigError(
                f"API_TOKENS/API_TOKENS_FILE hold a token that is not {TOKEN_MIN_LENGTH} or more "
                "printable ASCII characters (the token is not shown)"
            )
        if any(char.isspace() for char in token):
            raise ConfigError("API_TOKENS/API_TOKENS_FILE hold a token with white space in it")
    if (environ.get("API_TOKENS", "").strip() or path) and not tokens:
        raise ConfigError("API_TOKENS/API_TOKENS_FILE are set but hold no token")
    return tuple(tokens)


def redact_dsn(dsn: str) -> str:
    """The DSN as libpq reads it (key=value), with any password replaced by '***'.

    Going through libpq's own parser catches every place a password can hide: the URL's
    user-info, a `?password=` parameter, or a key=value DSN.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return " ".join(f"{key}={value}" for key, value in params.items())
