"""Keyset pagination: the `limit` and the opaque `cursor` query parameters of list endpoints.

A cursor names the last row a page showed (newest first, by id), so the next page starts
strictly after it: rows inserted between two requests can neither push a row onto a second
page nor hide one. The cursor is base64 text with a version tag; clients must not parse it.

`PageQuery` declares both parameters for a route (service/api/operations.py): it refuses, with
400, a limit that is not a whole number from 1 to MAX_LIMIT, or a cursor that is not exactly
one `encode_cursor` gives, and hands the route the id the cursor names. The document gives
CURSOR_PATTERN for the cursor: the cursors of ids below 10**18 (those of larger ids, up to
2**63-1, are accepted too).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
BIGINT_MAX = 2**63 - 1
_CURSOR = re.compile(r"v1:([0-9]{1,19})")

# The cursors encode_cursor() gives, as a regular expression for the OpenAPI document, so that
# a client (or a fuzzer) can tell a cursor from any string. "djE6" is "v1:"; the id's digits
# follow three at a time as four base64 characters, and ASCII digits leave only these
# characters possible in each place. The first digit is not 0 unless it is the only one. Ids of
# up to 18 digits: a bigserial takes centuries to reach 10**18.
_PAIR = "(?:[MN][DTjz]|O[DT])"  # a digit followed by another
_LEAD = "(?:M[Tjz]|N[DTjz]|O[DT])"  # the same, the first digit not 0
_THIRD, _FOURTH = "[AEIMQUYcgk]", "[w-z0-5]"  # the rest of a second digit; a third digit
_ONE = "(?:[MN][AQgw]|O[AQ])"  # a digit with none after it
_TRIPLE = _PAIR + _THIRD + _FOURTH
CURSOR_PATTERN = (
    f"^djE6(?:{_ONE}|{_LEAD}{_THIRD}|{_LEAD}{_THIRD}{_FOURTH}"
    f"(?:(?:{_TRIPLE}){{0,4}}(?:{_ONE}|{_PAIR}{_THIRD})?|(?:{_TRIPLE}){{5}}))$"
)


PageCursor = Annotated[str, Field(pattern=CURSOR_PATTERN)]


def _whole_number(raw: object) -> object:
    """A query parameter's text as a number: ASCII digits alone (no sign, space or point)."""
    if isinstance(raw, str):
        if not re.fullmatch(r"[0-9]{1,4}", raw):
            raise ValueError("not a whole number")
        return int(raw)
    return raw


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> int:
    """The id after which the page starts; ValueError unless `raw` is exactly a cursor that
    encode_cursor() gives."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    match = _CURSOR.fullmatch(text)
    # Only the exact text encode_cursor() gives: lenient base64 would take added characters.
    if not match or int(match[1]) > BIGINT_MAX or encode_cursor(int(match[1])) != raw:
        raise ValueError("not a cursor this service returned")
    return int(match[1])


# Validated as decode_cursor() decodes; documented by the pattern of the cursors it gives.
CursorId = Annotated[int, PlainValidator(decode_cursor, json_schema_input_type=PageCursor)]


class PageQuery(BaseModel):
    """The query parameters of a list route; any other parameter is ignored."""

    model_config = ConfigDict(strict=True)

    limit: Annotated[int, BeforeValidator(_whole_number)] = Field(
        DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=f"a whole number from 1 to {MAX_LIMIT}"
    )
    # The id the cursor names; None: the first page.
    cursor: CursorId = Field(
        None, description="the next_cursor of a previous page, as this service returned it"
    )
