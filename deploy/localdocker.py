"""A Docker engine and the base images the project's Dockerfiles start from, on a machine that
may have neither a running engine nor a reachable registry.

`Engine.ensure()` uses the engine that answers `docker info`; when none does and this process
is root with `dockerd` installed, it starts one (`dockerd --storage-driver=overlay2`, no init
system needed) and `stop()` later stops that daemon, by its pid, and only that one. Otherwise it
raises `Unavailable` saying what is missing.

`base_image()` makes sure `debian:bookworm-slim` is there: already pulled or made, pulled from
the registry when one answers, or else made here with `debootstrap --variant=minbase bookworm`
and `docker import`. A locally made base holds this host's CA bundle and tells pip and Python
to use it, so that a build behind a TLS-inspecting proxy trusts what the host trusts; it carries
the label `made-by=deploy/localdocker.py`. The project's Dockerfiles install everything else
from Debian's archive and PyPI, so they build unchanged from either kind of base.

`python -m deploy.localdocker` does both and leaves the engine running (it prints its pid).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "debian:bookworm-slim"
MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENGINE_START_S = 30.0
PULL_TIMEOUT_S = 60.0
DEBOOTSTRAP_TIMEOUT_S = 600.0
SOURCES = f"""\
deb {MIRROR} bookworm main
deb {MIRROR} bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
"""


class Unavailable(RuntimeError):
    """No Docker engine can be had here; the message says why."""


def docker(*args: str, timeout: float = 120.0, check: bool = True, **kwargs):
    """`docker ARGS`, its output captured as text; CalledProcessError when it fails (check)."""
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check, **kwargs
    )


def answers() -> bool:
    """Whether a Docker engine answers the `docker` client."""
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Engine:
    """The engine the `docker` client talks to; started here when none answered."""

    def __init__(self, process: subprocess.Popen | None, log_path: Path | None) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def started_here(self) -> bool:
        return self.process is not None

    @classmethod
    def ensure(cls) -> Engine:
        if answers():
            return cls(None, None)
        if shutil.which("docker") is None:
            raise Unavailable("no docker client (Debian: apt-get install docker.io)")
        dockerd = _find("dockerd")
        if dockerd is None:
            raise Unavailable(
                "no engine answers and dockerd is not installed (apt-get install docker.io)"
            )
        if os.geteuid() != 0:
            raise Unavailable("no engine answers, and starting dockerd needs root")
        log_path = Path(tempfile.mkstemp(prefix="dockerd-", suffix=".log")[1])
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [dockerd, "--storage-driver=overlay2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        engine = cls(process, log_path)
        deadline = time.monotonic() + ENGINE_START_S
        while not answers():
            if process.poll() is not None or time.monotonic() > deadline:
                engine.stop()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise Unavailable(f"dockerd did not come up within {ENGINE_START_S:g} s:\n{tail}")
            time.sleep(0.2)
        return engine

    def stop(self) -> None:
        """Stop the daemon started here (SIGTERM, then SIGKILL after 30 s); nothing otherwise."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _find(program: str) -> str | None:
    """`program` on PATH, or in /usr/sbin where Debian puts daemons (not on a user's PATH)."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    return found


def has_image(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def base_image(tag: str = BASE) -> str:
    """Make sure `tag` (Debian bookworm, minimal) is in the engine; say where it came from."""
    if has_image(tag):
        return "present"
    try:
        if docker("pull", tag, timeout=PULL_TIMEOUT_S, check=False).returncode == 0:
            return "pulled"
    except subprocess.TimeoutExpired:
        pass
    make_base(tag)
    return "made here"


def make_base(tag: str = BASE) -> None:
    """`debootstrap --variant=minbase bookworm`, with the host's CA bundle, imported as `tag`."""
    debootstrap = _find("debootstrap")
    if debootstrap is None:
        raise Unavailable(
            "no registry answers and debootstrap is missing (apt-get install debootstrap)"
        )
    if os.geteuid() != 0:
        raise Unavailable("no registry answers, and debootstrap needs root")
    root = Path(tempfile.mkdtemp(prefix="bookworm-"))
    try:
        subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", str(root), MIRROR],
            check=True,
            capture_output=True,
            timeout=DEBOOTSTRAP_TIMEOUT_S,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
        )
        (root / "etc/apt/sources.list").write_text(SOURCES)
        # As in Docker's own Debian images: no package caches or lists kept.
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        changes = ['CMD ["bash"]', "LABEL made-by=deploy/localdocker.py"]
        if HOST_CA_BUNDLE.exists():
            # Kept through Debian's ca-certificates package, which rebuilds the bundle from
            # Mozilla's list and /usr/local/share/ca-certificates.
            local = root / "usr/local/share/ca-certificates/host-bundle.crt"
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, local)
            bundle = root / "etc/ssl/certs/ca-certificates.crt"
            bundle.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, bundle)
            changes += [
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            ]
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        args = [arg for change in changes for arg in ("--change", change)]
        docker("import", *args, "-", tag, stdin=tar.stdout, timeout=DEBOOTSTRAP_TIMEOUT_S)
        tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    try:
        engine = Engine.ensure()
        origin = base_image()
    except Unavailable as exc:
        sys.exit(str(exc))
    where = f"started here, pid {engine.process.pid}" if engine.started_here else "already running"
    print(f"engine: {where}; {BASE}: {origin}")


if __name__ == "__main__":
    main()
