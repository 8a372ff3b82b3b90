"""This machine: what the report says about it, and the limits that 10,000 sockets meet.

Each connection is a file descriptor in wrk and another in a gunicorn worker, so the open-files
limit must exceed the highest concurrency; a listen backlog is silently cut to
net.core.somaxconn, which decides how many connections may wait to be accepted at once.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from importlib import metadata
from pathlib import Path

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
FD_HEADROOM = 1024  # listeners, logs, pools, libraries


def open_files_needed(concurrency: int, database_connections: int) -> int:
    """A gevent worker may hold every client socket and, per request, a database socket."""
    return concurrency + database_connections + FD_HEADROOM


def raise_open_files(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by every child) to `needed`.

    The hard limit is raised too when running as root; returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed and os.geteuid() == 0:
        hard = needed
    target = needed if hard == resource.RLIM_INFINITY else min(max(soft, needed), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def listen_overflows() -> int:
    """Connections this network namespace dropped because an accept queue was full, since boot
    (TcpExt ListenOverflows): the listen backlog was too short for the burst."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def revision(root: Path) -> str:
    """The commit measured, and whether the work tree had uncommitted changes."""
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _first_line(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return f"{commit} with uncommitted changes" if dirty else commit


def somaxconn() -> int | None:
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None


def describe(postgres_version: str) -> dict[str, str]:
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical CPUs (nproc: {_nproc()})",
        "memory": f"{_mem_total_gib():.1f} GiB",
        "system": f"{platform.system()} {platform.release()}",
        "net.core.somaxconn": str(somaxconn()),
        "open files limit (soft)": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        "Python": platform.python_version(),
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in (
                "gunicorn",
                "gevent",
                "flask",
                "psycopg2-binary",
                "psycopg",
                "psycopg-pool",
                "starlette",
                "uvicorn",
                "uvloop",
                "httptools",
                "asyncpg",
            )
        ),
        "PostgreSQL": postgres_version,
        "wrk": _first_line(["wrk", "--version"]),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nproc() -> str:
    return _first_line(["nproc"]) or "?"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""
    )
