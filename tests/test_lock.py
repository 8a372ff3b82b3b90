"""The locks: requirements.lock (what the image installs) and requirements-dev.lock (what
`make test` installs) pin, with hashes, versions that satisfy the requirements people read, and
agree with each other; the runtime lock holds no test tool. `make lock` rebuilds both."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def requirements(name: str) -> list[Requirement]:
    lines = (REPO / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def pins(name: str) -> dict[str, tuple[Version, int]]:
    """Package -> (pinned version, how many hashes it carries)."""
    found: dict[str, tuple[Version, int]] = {}
    current = None
    for line in (REPO / name).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            spec = line.split(";")[0].split("\\")[0].strip()
            package, version = spec.split("==")
            current = normalized(package)
            found[current] = (Version(version), 0)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
    return found


RUNTIME = pins("requirements.lock")
DEV = pins("requirements-dev.lock")


@pytest.mark.parametrize(
    ("source", "lock"),
    [("requirements.txt", RUNTIME), ("requirements.txt", DEV), ("requirements-dev.txt", DEV)],
)
def test_every_requirement_is_pinned_to_a_version_it_allows(source, lock):
    for requirement in requirements(source):
        assert normalized(requirement.name) in lock, f"{requirement} is not in the lock"
        version, _ = lock[normalized(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


def test_every_pin_carries_hashes():
    assert all(hashes for _, hashes in RUNTIME.values())
    assert all(hashes for _, hashes in DEV.values())


def test_the_runtime_pins_are_the_same_in_both_locks():
    assert {name: DEV[name] for name in RUNTIME} == RUNTIME


def test_the_runtime_lock_holds_no_test_tool():
    tools = {normalized(r.name) for r in requirements("requirements-dev.txt")}
    assert tools.isdisjoint(RUNTIME), tools & set(RUNTIME)
    assert "pytest" not in RUNTIME
    # Imported at run time by gunicorn's gevent worker, declared by gunicorn only as an extra.
    assert "packaging" in RUNTIME
