"""The bodies of the users API and of the probes, as pydantic models.

The request models (`NewUser`, `UserChange`) validate what a client sends, in pydantic-core:
strict types (a number or null is not a name), no unknown field, the limits below. The
response models (`User`, `UserPage`, `Error`, `Status`, `Ready`) say what the handlers
answer; the handlers answer dicts, which orjson encodes, and nothing validates a response at
run time (tests/test_openapi.py and tests/test_fuzz_api.py hold real responses to them).
Both kinds are the schemas of the OpenAPI document (service/api/openapi.py). A field's
`description` is also what the client reads when its value is refused
(service/api/operations.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from service.api.pagination import BIGINT_MAX, PageCursor

NAME_MAX = 200
EMAIL_MAX = 254
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"  # C0, DEL and C1
# No control character, and something besides white space.
NAME_PATTERN = rf"^[^{CONTROL_CHARS}]*[^\s{CONTROL_CHARS}][^{CONTROL_CHARS}]*$"
# local@domain.tld, without "@", white space or control characters in either part, and no
# empty label in the domain. Any script is accepted: the document gives this pattern and no
# `format` (JSON Schema's "email" is ASCII only, "idn-email" refuses much that is stored).
EMAIL_PATTERN = (
    rf"^[^@\s{CONTROL_CHARS}]{{1,64}}@[^@\s.{CONTROL_CHARS}]+(\.[^@\s.{CONTROL_CHARS}]+)+$"
)

# A name is checked as sent (its length too), then stored without surrounding white space.
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN),
    AfterValidator(str.strip),
    Field(
        description=f"1 to {NAME_MAX} characters, not blank, no control characters;"
        " stored without surrounding white space"
    ),
]
Email = Annotated[
    str,
    StringConstraints(max_length=EMAIL_MAX, pattern=EMAIL_PATTERN),
    Field(
        description=f"an address such as name@example.com, at most {EMAIL_MAX} characters,"
        " no white space or control characters"
    ),
]


class NewUser(BaseModel):
    """The body of `POST /users`: both fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    email: Email


class UserChange(BaseModel):
    """The body of `PATCH /users/<id>`: either field or both. A field left out keeps its
    stored value (None here); null is refused, as any value that is not a string."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})

    name: Name = None
    email: Email = None

    @model_validator(mode="after")
    def _changes_something(self) -> UserChange:
        if not self.model_fields_set:
            raise PydanticCustomError("missing_field", "give name, email or both")
        return self


class User(BaseModel):
    """A user as every users route answers it."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[int, Field(ge=1, le=BIGINT_MAX, json_schema_extra={"format": "int64"})]
    name: Name
    email: Email
    created_at: datetime


class UserPage(BaseModel):
    """A page of users, newest first; `next_cursor` is null on the last page."""

    users: list[User]
    next_cursor: PageCursor | None


class ErrorDetail(BaseModel):
    code: str = Field(description="stable and machine-readable: what went wrong")
    message: str
    request_id: str | SkipJsonSchema[None] = Field(
        None, description="a 500's: finds its traceback in the log"
    )


class Error(BaseModel):
    """Every error the API answers (service/api/errors.py)."""

    error: ErrorDetail


class Status(BaseModel):
    status: Literal["ok"]


class PoolStats(BaseModel):
    max: Annotated[int, Field(ge=0)]
    size: Annotated[int, Field(ge=0)]
    in_use: Annotated[int, Field(ge=0)]
    idle: Annotated[int, Field(ge=0)]
    waiting: Annotated[int, Field(ge=0)]


class ReplicaState(BaseModel):
    state: Literal["up", "down", "lagging", "promoted", "joining"]
    lag_bytes: int
    lag_seconds: float


class Ready(BaseModel):
    """`/readyz`'s answer: the worker's pool (and, with replicas, each replica's state)."""

    status: Literal["ok"]
    pool: PoolStats
    replicas: dict[str, ReplicaState] | SkipJsonSchema[None] = Field(
        None,
        description="with DATABASE_REPLICA_URLS: each replica as this worker last saw it, by"
        " its label",
    )
