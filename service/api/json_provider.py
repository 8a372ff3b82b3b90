"""JSON bodies of responses, encoded by orjson.

`OrjsonProvider` is Flask's `DefaultJSONProvider` with `dumps` done by orjson: Flask still
builds every JSON response (a view's dict, `jsonify`), and request bodies are still parsed by
the standard library (`loads` is Flask's), so what the API accepts does not change. Why:
docs/performance.md.

The encoding: compact (`{"a":1}`), keys in the objects' own order, non-ASCII text as UTF-8
rather than `\\u` escapes, a date or datetime in ISO 8601 as `isoformat()` writes it
(`2026-12-03T19:01:34.123456+00:00`, where Flask's encoder writes an HTTP date), and a type
orjson does not know (a Decimal, say) through Flask's `default`. The standard library's
options (`indent`, `sort_keys`, ...) are ignored.

What orjson refuses, the standard library's encoder writes, with `\\u` escapes and dates still
in ISO 8601: text with a lone surrogate, which a client can send inside a JSON string and an
error message may quote, and an int beyond 64 bits.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON provider, encoding with orjson (module docstring)."""

    sort_keys = False  # the standard library's encoder, where it is used, keeps the order too

    @staticmethod
    def default(o: Any) -> Any:
        """For the standard library's encoder: dates as orjson writes them, the rest as Flask
        does (orjson writes dates itself, and calls this only for types it does not know)."""
        if isinstance(o, date):
            return o.isoformat()
        return DefaultJSONProvider.default(o)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        try:
            return orjson.dumps(obj, default=self.default).decode()
        except orjson.JSONEncodeError:
            return super().dumps(obj, **kwargs)
