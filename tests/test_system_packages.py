"""tests/system-packages, which `make test` and `make test-quick` run first: what a machine that
cannot install the packages says, and what the quick loop leaves out.

The script runs as a user other than root (nobody, when the tests run as root), so that it
never installs anything here, on a package table of the test's own in place of its real one:
programs that exist on every machine (`sh`) and programs that exist nowhere.
"""

import os
import pwd
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = (REPO / "tests" / "system-packages").read_text()
TABLE = re.compile(r"^PACKAGES='\n(.*?)^'\n", re.MULTILINE | re.DOTALL)
ABSENT = "no-such-program-anywhere"


def run(table: str, *args: str) -> subprocess.CompletedProcess:
    """The script on `table` (rows as in its own), as a user other than root."""
    script, replaced = TABLE.subn(f"PACKAGES='\n{table}'\n", SCRIPT)
    assert replaced == 1, "tests/system-packages has no PACKAGES='...' table"
    nobody = pwd.getpwnam("nobody")
    as_root = os.geteuid() == 0
    not_root = (
        {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []} if as_root else {}
    )
    return subprocess.run(
        ["bash", "-s", "--", *args],
        input=script,
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        timeout=30,
        **not_root,
    )


def markers(table: str) -> set[str]:
    """The markers a package table names (its third column), `-` left out."""
    return {line.split()[2] for line in table.splitlines() if line.strip()} - {"-"}


def test_without_root_it_stops_with_one_line_naming_every_missing_package():
    table = f"""
present  sh           -          found everywhere
server   {ABSENT}     -          needed by every run
engine   sh,{ABSENT}  container  one of its two programs missing
bouncer  {ABSENT}     pgbouncer  needed by marked tests only
"""
    done = run(table)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "missing system packages: server engine bouncer: install them"
        " (Debian/Ubuntu: sudo apt-get install server engine bouncer)\n"
    )


def test_the_quick_loop_asks_only_for_the_packages_every_run_needs():
    table = f"""
present  sh        -          found everywhere
server   {ABSENT}  -          needed by every run
engine   {ABSENT}  container  needed by marked tests only
"""
    done = run(table, "--quick")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("missing system packages: server: install them")


def test_when_only_marked_tests_lack_their_packages_it_points_to_the_quick_loop():
    table = f"""
present  sh        -          found everywhere
engine   {ABSENT}  container  needed by marked tests only
"""
    done = run(table)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.endswith(
        ", or run make test-quick, which leaves out the tests that need them\n"
    )
    assert done.stderr.count("\n") == 1
    quick = run(table, "--quick")
    assert (quick.returncode, quick.stdout, quick.stderr) == (0, "", "")


def test_with_every_package_present_it_says_nothing_and_succeeds():
    table = """
present  sh       -          found everywhere
both     sh,bash  container  found too
"""
    done = run(table)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_quick_loop_leaves_out_exactly_the_markers_whose_packages_it_does_not_install():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test-quick:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "the Makefile has no test-quick target"
    (expression,) = re.findall(r'pytest -m "([^"]+)"', recipe.group(1))
    assert re.fullmatch(r"not \w+( and not \w+)*", expression)
    (table,) = TABLE.findall(SCRIPT)
    assert set(re.findall(r"not (\w+)", expression)) == markers(table)


def test_every_test_that_needs_a_docker_engine_is_marked_container(request):
    """So that `make test-quick` never needs one: checked on the tests this run selected."""
    unmarked = [
        item.nodeid
        for item in request.session.items
        if "docker_engine" in item.fixturenames and item.get_closest_marker("container") is None
    ]
    assert not unmarked
