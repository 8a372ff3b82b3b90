"""The workloads: what wrk asks a server for, each a Lua script in bench/ and its arguments.

Every stack serves the same five: one route alone (get, list, create, update), or the mix of
all four that mix.lua sends. A write workload makes its emails unique with a tag that is new
for every wrk run (the warm-up included), so that no 409 ever comes from the bench itself.
Creates grow the users table through the run; the rotating order of the rounds spreads that
growth over the stacks.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    script: Path | None  # None: every request asks for `path`
    path: str = "/"
    takes_users: bool = False  # the script's first argument: the ids seeded, 1..N
    takes_tag: bool = False  # the script's next argument: a word unique to one wrk run

    def lua_args(self, users: int) -> list[str]:
        """The arguments after wrk's `--`, with a fresh tag each call."""
        args = [str(users)] if self.takes_users else []
        if self.takes_tag:
            args.append(f"t{secrets.token_hex(4)}")
        return args


WORKLOADS = {
    "mix": Workload(
        "mix",
        "mix.lua: 70% GET /users/<random id>, 10% GET /users?limit=20, 10% POST /users, "
        "10% PATCH /users/<random id>, picked at random per request",
        HERE / "mix.lua",
        takes_users=True,
        takes_tag=True,
    ),
    "get": Workload(
        "get", "GET /users/<random id> (users.lua)", HERE / "users.lua", takes_users=True
    ),
    "list": Workload("list", "GET /users?limit=20, newest first (list.lua)", HERE / "list.lua"),
    "create": Workload(
        "create",
        "POST /users, a unique email per request (create.lua)",
        HERE / "create.lua",
        takes_tag=True,
    ),
    "update": Workload(
        "update",
        "PATCH /users/<random id> with a new name (update.lua)",
        HERE / "update.lua",
        takes_users=True,
    ),
    # The ceiling variant's only workload: the service's own /healthz, no database.
    "healthz": Workload("healthz", "GET /healthz", None, "/healthz"),
}
ROUTES = ("get", "list", "create", "update")
DEFAULT = ("mix", *ROUTES)
