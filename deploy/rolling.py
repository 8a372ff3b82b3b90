"""A rolling replacement of compose.yaml's app instances behind its balancer, as an
orchestrator's rolling update does it (maxSurge 1, maxUnavailable 0), so that no request is
lost.

For each instance running at the start, in turn: one new instance is started beside the others
(`docker-compose up --no-deps --no-recreate --scale app=N+1 app`); once HAProxy has seen it
pass its check on /readyz, the old one is stopped with `docker stop --time 30` and removed.
Its SIGTERM starts the drain (docs/operations.md): /readyz answers 503, HAProxy takes it out of
rotation within its check's fall time, and it serves what still reaches it until it stops
accepting, then finishes what is in flight. The new instances run the image `app` names now:
build it first (`docker-compose build app`, as `make roll` does) to roll out a new release.

compose.yaml's APP_INSTANCES counts the one instance more that runs during each step.

`python -m deploy.rolling [--project NAME]` rolls the stack of `make up` (or the named
project); `roll()` is what the tests call.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.localdocker import docker

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "compose.yaml"
SERVICE = "app"
BALANCER = "lb"
BACKEND = "app"  # deploy/compose/haproxy.cfg's backend of the app's instances
ADMIN_SOCKET = "/tmp/haproxy.sock"
IN_ROTATION_WITHIN_S = 60.0
# compose.yaml's stop_grace_period: gunicorn's graceful_timeout (25 s) and a margin.
STOP_TIMEOUT_S = 30


class RollFailed(RuntimeError):
    """A step did not complete; the message says which, and what is left running."""


@dataclass(frozen=True)
class Stack:
    """A running compose.yaml stack: its project name (None: docker-compose's default, from
    the directory) and its file."""

    project: str | None = None
    compose_file: Path = COMPOSE_FILE

    def compose(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`docker-compose ARGS` on this stack; CalledProcessError when it fails."""
        project = ["-p", self.project] if self.project else []
        return subprocess.run(
            ["docker-compose", *project, "-f", str(self.compose_file), *args],
            cwd=self.compose_file.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def instances(self) -> list[str]:
        """The ids of the app's running containers, oldest first."""
        ids = self.compose("ps", "-q", SERVICE).stdout.split()
        if not ids:
            return []
        fields = "{{.State.Running}} {{.Created}} {{.Id}}"
        lines = docker("inspect", "-f", fields, *ids).stdout.splitlines()
        running = sorted(line.split()[1:] for line in lines if line.startswith("true "))
        return [container for _, container in running]

    def balancer_states(self) -> dict[str, tuple[str, str]]:
        """Each address of an app instance HAProxy knows -> (its status, its last check): e.g.
        `"172.19.0.5": ("UP", "L7OK")`, `("DOWN", "L7STS")`; a slot with no address is left out.
        """
        (balancer,) = self.compose("ps", "-q", BALANCER).stdout.split()
        addresses = {
            fields[3]: fields[4]  # srv_name -> srv_addr
            for fields in map(str.split, admin(balancer, f"show servers state {BACKEND}"))
            if len(fields) > 4 and fields[0] != "#" and fields[4] not in ("-", "0.0.0.0")
        }
        header, *lines = admin(balancer, "show stat")
        rows = csv.DictReader([header.removeprefix("# "), *lines])
        return {
            addresses[row["svname"]]: (row["status"], row["check_status"])
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] in addresses
        }

    def in_rotation(self, container: str) -> bool:
        """Whether HAProxy sends `container` requests, having seen it pass a check."""
        return self.balancer_states().get(address(container)) == ("UP", "L7OK")


def admin(balancer: str, command: str) -> list[str]:
    """A command's answer on HAProxy's admin socket in the `balancer` container, as lines (those
    of "show stat" and "show servers state" start with a header)."""
    shown = docker("exec", balancer, "sh", "-c", f'echo "{command}" | socat stdio {ADMIN_SOCKET}')
    return [line for line in shown.stdout.splitlines() if line.strip()]


def address(container: str) -> str:
    """The container's address on the stack's network, as HAProxy has it."""
    return docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
    ).stdout.strip()


def wait_in_rotation(stack: Stack, container: str, timeout: float) -> None:
    """Poll HAProxy until it has `container` in rotation; RollFailed after `timeout`."""
    deadline = time.monotonic() + timeout
    while not stack.in_rotation(container):
        if time.monotonic() > deadline:
            raise RollFailed(
                f"{container[:12]} was not in rotation within {timeout:g} s: it runs beside "
                f"the old instances, which all still serve ({stack.balancer_states()})"
            )
        time.sleep(0.5)


def roll(stack: Stack, log: Callable[[str], None] = print) -> list[str]:
    """Replace each running instance of the app by a new one, one at a time; returns the new
    instances' ids. Raises RollFailed when a new instance does not get in rotation, leaving it
    and the old instances not yet replaced running."""
    old = stack.instances()
    if not old:
        raise RollFailed(f"no instance of {SERVICE} runs: start the stack first (make up)")
    scale = f"{SERVICE}={len(old) + 1}"
    for container in old:
        before = set(stack.instances())
        stack.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", scale, SERVICE)
        (new,) = set(stack.instances()) - before
        wait_in_rotation(stack, new, IN_ROTATION_WITHIN_S)
        log(f"{new[:12]} in rotation; stopping {container[:12]} (SIGTERM: it drains)")
        docker("stop", "--time", str(STOP_TIMEOUT_S), container, timeout=STOP_TIMEOUT_S + 30)
        docker("rm", container)
    return stack.instances()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="the compose project (default: docker-compose's)")
    args = parser.parse_args()
    try:
        new = roll(Stack(args.project))
    except RollFailed as exc:
        sys.exit(str(exc))
    print(f"rolled: {len(new)} new instances in rotation")


if __name__ == "__main__":
    main()
