"""Settings from the environment, read and validated once at start.

`Settings` is a pydantic-settings model: every variable is one field, in the order of the
README's configuration table (tests/test_docs.py checks one against the other), with its type,
default, accepted range (`ge`, `le`) and description. `load_settings()` takes a mapping (tests
pass a dict, production passes `os.environ`) and returns a frozen `Settings`, or raises
`ConfigError` naming each bad variable and what it accepts.

The mapping is the only source: `load_settings()` gives its variables to the model as init
arguments, and `Settings.settings_customise_sources` keeps init arguments the only source
pydantic-settings reads. It would otherwise read `os.environ` and a `.env` file itself. No `.env`
file is read: every way of running the service (gunicorn.conf.py, the image, Compose,
Kubernetes) sets the environment, and a file found in the working directory would make the
settings depend on where the service was started, and the master and its workers on both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import annotated_types
import psycopg2.extensions
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class ConfigError(ValueError):
    """A variable is out of range or malformed; the message names it and the accepted range."""


# A bearer token shorter than this is refused: it could be guessed.
TOKEN_MIN_LENGTH = 16


def _cpu_count() -> int:
    """CPUs available

    The CPUs this process may run on: a container limited by cpuset sees its share, not the
    host's. (The first line is the README's default: tests/test_docs.py.)
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_pool_max(s: dict[str, Any]) -> int:
    """`DB_MAX_CONNECTIONS // WEB_CONCURRENCY` (1 to `WORKER_CONNECTIONS`)"""
    return max(1, min(s["worker_connections"], s["db_max_connections"] // s["web_concurrency"]))


def _default_pool_min(s: dict[str, Any]) -> int:
    """`min(2, DB_POOL_MAX)`"""
    return min(2, s["db_pool_max"])


class Settings(BaseSettings):
    """Every variable the service reads, named after its field in upper case (`port`: PORT).

    A derived default (a `default_factory` of the fields above it) says what it is in its
    docstring's first line. Secrets are left out of `repr()`.
    """

    # A ValidationError raised past load_settings() never shows a value: it may be a token.
    model_config = SettingsConfigDict(
        frozen=True, alias_generator=str.upper, allow_inf_nan=False, hide_input_in_errors=True
    )

    database_url: str = Field(
        "",
        repr=False,  # may hold a password
        description="PostgreSQL URL or key=value DSN (unset: libpq's `PG*`); its password is "
        "never logged",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port the service listens on")
    web_concurrency: int = Field(
        default_factory=_cpu_count, ge=1, le=256, description="gunicorn worker processes"
    )
    worker_connections: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="concurrent HTTP connections per worker",
    )
    db_max_connections: int = Field(
        20,
        ge=1,
        le=100_000,
        description="server connections of this instance (all its workers)",
    )
    db_pool_max: int = Field(
        default_factory=_default_pool_max, ge=1, le=10_000, description="connections per worker"
    )
    db_pool_min: int = Field(
        default_factory=_default_pool_min,
        ge=0,
        le=10_000,
        description="connections each worker opens at start (best effort)",
    )
    app_instances: int = Field(
        1,
        ge=1,
        le=10_000,
        description="instances sharing the server (the budget checked at start)",
    )
    db_pool_timeout: float = Field(
        5.0,
        ge=0.001,
        le=3600,
        description="seconds a request may wait for a connection, then 503",
    )
    db_pool_max_waiting: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="requests per worker that may wait for a connection (0: no cap)",
    )
    db_statement_timeout_ms: int = Field(
        5000,
        ge=1,
        le=86_400_000,
        description="milliseconds a statement may run, then it is cancelled (503)",
    )
    db_connect_timeout: int = Field(
        5, ge=1, le=3600, description="seconds to open a server connection"
    )
    db_pool_max_lifetime: float = Field(
        3600.0,
        ge=1,
        le=604_800,
        description="seconds before a connection is replaced (up to 10% jitter)",
    )
    # Validated before API_TOKENS, which adds this file's tokens to its own.
    api_tokens_file: Path | None = Field(
        None, description="a file of bearer tokens, one a line (`#`: a comment)"
    )
    api_tokens: tuple[str, ...] = Field(
        (),
        repr=False,  # secrets
        description="bearer tokens, comma-separated (16+ printable ASCII each), with the file's: "
        "`/users` needs one (else 401); none: the API is open",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="a port for `/metrics` alone, then 404 on the public port (0: none)",
    )
    http_head_timeout: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description="seconds to send a request's head, from connect or its first byte",
    )
    http_body_timeout: float = Field(
        30.0, ge=0.1, le=3600, description="seconds to send a body, from the end of its head"
    )
    http_write_timeout: float = Field(
        30.0, ge=0.1, le=3600, description="seconds to take a whole response"
    )
    http_keepalive_timeout: int = Field(
        15,
        ge=0,
        le=3600,
        description="seconds a keep-alive connection may idle (0: no keep-alive)",
    )
    # gunicorn.conf.py refuses a drain that leaves the requests in flight too little of
    # gunicorn's graceful_timeout.
    drain_seconds: float = Field(
        5.0,
        ge=0,
        le=60,
        description="seconds a worker serves on after SIGTERM, `/readyz` answering 503",
    )
    trusted_proxies: int = Field(
        0,
        ge=0,
        le=10,
        description="proxies in front whose `X-Forwarded-For`/`-Proto` are trusted (a load "
        "balancer: 1)",
    )
    db_pool_leak_warn_s: float = Field(
        30.0,
        ge=0.001,
        le=86_400,
        description="seconds a connection may be held before its holder's stack is logged",
    )
    database_replica_urls: tuple[str, ...] = Field(
        (),
        repr=False,  # may hold passwords
        description="streaming replicas' `postgresql://` URLs, space-separated, for reads",
    )
    replica_max_lag_s: float = Field(
        10.0, ge=0.1, le=3600, description="a replica lagging more leaves the rotation"
    )
    replica_catch_up_s: float = Field(
        0.1,
        ge=0,
        le=10,
        description="a read ahead of every replica waits this long, then reads the primary",
    )
    replica_poll_interval_s: float = Field(
        0.025,
        ge=0.005,
        le=10,
        description="how often each worker reads each replica's replay position",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The init arguments alone: `load_settings()`'s mapping (see the module doc)."""
        return (init_settings,)

    @property
    def safe_database_url(self) -> str:
        """The DSN with any password replaced, fit for logs and responses."""
        return redact_dsn(self.database_url)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        return _checked_url("DATABASE_URL", url)

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _replica_urls(cls, value: str | tuple[str, ...]) -> tuple[str, ...]:
        """White space separates them: a URL may hold commas (libpq's several hosts)."""
        urls = value.split() if isinstance(value, str) else value
        for url in urls:
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError(
                    f"DATABASE_REPLICA_URLS holds {redact_dsn(url)!r}: accepted postgresql:// "
                    "URLs separated by white space"
                )
            _checked_url("DATABASE_REPLICA_URLS", url)
        if len(set(urls)) != len(urls):
            raise ValueError("DATABASE_REPLICA_URLS names a replica twice")
        return tuple(urls)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _api_tokens(cls, value: str | tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """API_TOKENS' tokens and API_TOKENS_FILE's, together; a message names the variable,
        never a token."""
        given = value.split(",") if isinstance(value, str) else list(value)
        path = info.data.get("api_tokens_file")
        if path is not None:
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"API_TOKENS_FILE={str(path)!r} cannot be read: {exc}") from None
            given += [line for line in lines if not line.strip().startswith("#")]
        tokens = [token.strip() for token in given if token.strip()]
        for token in tokens:
            if len(token) < TOKEN_MIN_LENGTH or not token.isascii() or not token.isprintable():
                raise ValueError(
                    f"API_TOKENS/API_TOKENS_FILE hold a token that is not {TOKEN_MIN_LENGTH} or "
                    "more printable ASCII characters (the token is not shown)"
                )
            if any(char.isspace() for char in token):
                raise ValueError("API_TOKENS/API_TOKENS_FILE hold a token with white space in it")
        if (given or path is not None) and not tokens:
            raise ValueError("API_TOKENS/API_TOKENS_FILE are set but hold no token")
        return tuple(tokens)

    @model_validator(mode="after")
    def _check_ports(self) -> Settings:
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"METRICS_PORT={self.metrics_port} is PORT too: give /metrics its own")
        return self

    @model_validator(mode="after")
    def _check_pool(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError(
                f"DB_POOL_MIN={self.db_pool_min} is greater than DB_POOL_MAX={self.db_pool_max}"
            )
        # An explicit DB_POOL_MAX wins over the default budget, but not over an explicit one.
        wanted = self.db_pool_max * self.web_concurrency
        if "db_max_connections" in self.model_fields_set and wanted > self.db_max_connections:
            raise ValueError(
                f"DB_POOL_MAX={self.db_pool_max} x WEB_CONCURRENCY={self.web_concurrency} = "
                f"{wanted} exceeds DB_MAX_CONNECTIONS={self.db_max_connections}; lower one or "
                "raise the budget"
            )
        return self


# Every variable the service reads, by name, with its field of Settings.
VARIABLES: dict[str, FieldInfo] = {
    name.upper(): field for name, field in Settings.model_fields.items()
}


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Read every variable of `VARIABLES` from `environ` and nothing else; a variable unset or
    blank takes its default. Raise ConfigError naming every bad variable (one message each,
    separated by "; ") and what it accepts."""
    given = {name: environ[name].strip() for name in VARIABLES if environ.get(name, "").strip()}
    try:
        return Settings(**given)
    except ValidationError as exc:
        messages = [_message(error) for error in exc.errors(include_url=False)]
        raise ConfigError("; ".join(m for m in messages if m)) from None


def _message(error: ErrorDetails) -> str | None:
    """The message of one of pydantic's errors, or None for a derived
    default left unmade because a variable it derives from is bad (that one has its own)."""
    if error["type"] == "default_factory_not_called":
        return None
    if error["type"] == "value_error":  # our validators' messages, which name the variable
        return str(error["ctx"]["error"])
    # Every other error is a number's: unparseable, infinite or out of bounds.
    name = error["loc"][0]
    field = VARIABLES[name]
    if error["type"] in ("greater_than_equal", "less_than_equal"):
        return f"{name}={error['input']} is out of range: accepted {accepted_range(field)}"
    kind = "a whole number" if field.annotation is int else "a number"
    return f"{name}={error['input']!r} is not {kind}: accepted {accepted_range(field)}"


def accepted_range(field: FieldInfo) -> str:
    """'low to high' from a numeric field's bounds ('1 to 65535'), as messages and the README
    say it; "" for a field without bounds."""
    low = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    return "" if low is None or high is None else f"{number(low)} to {number(high)}"


def number(value: float) -> str:
    """A number as a person writes it: 3600, 0.025 (never 3600.0 or 3.6e+03)."""
    return str(int(value)) if value == int(value) else str(value)


def _checked_url(name: str, url: str) -> str:
    if url:
        try:
            params = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError:
            raise ValueError(
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
            raise ValueError(
                f"{name}={redact_dsn(url)!r} has port {params['port']!r}; accepted a "
                "number from 1 to 65535 (one per host)"
            )
    return url


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
