"""wrk, the HTTP load generator: its command line and the figures read from its report.

wrk runs a closed loop: each of its connections sends a request, waits for the answer, sends
the next. `--latency` adds the percentile table; `--timeout` is set far above any fair wait,
because wrk counts a slower answer as a timeout and leaves it out of the latency table.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

THREADS = 2  # one per core: more threads only fight the servers for the same two cores
TIMEOUT_S = 30
INSTALL_HINT = (
    "wrk was not found. Install it with `apt-get install wrk` (Debian/Ubuntu, as root; "
    "`make bench` does this for you) or `brew install wrk` (macOS)."
)

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed a report this module cannot read."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float  # every answer, whatever its status, as wrk counts them
    p50_ms: float
    p99_ms: float
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    non_2xx: int = 0  # wrk's "Non-2xx or 3xx responses": statuses 400 and up

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def ok_rps(self) -> float:
        """Answers below 400 per second: the throughput that counts."""
        return self.rps * (self.requests - self.non_2xx) / self.requests if self.requests else 0.0


def find_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkError(INSTALL_HINT)
    return path


def command(
    url: str, connections: int, duration_s: float, script: Path | None, args: list[str]
) -> list[str]:
    cmd = [
        find_wrk(),
        f"-t{min(THREADS, connections)}",
        f"-c{connections}",
        f"-d{int(duration_s)}s",
        f"--timeout={TIMEOUT_S}s",
        "--latency",
    ]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if args:
        cmd += ["--", *args]
    return cmd


def run(cmd: list[str]) -> tuple[WrkResult, str]:
    """Run wrk to the end and return its figures and its report as printed.

    wrk stops by itself after its duration; the subprocess timeout is only a guard.
    """
    duration = float(next(a[2:-1] for a in cmd if a.startswith("-d")))
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + TIMEOUT_S + 60, check=False
    )
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    return parse(done.stdout), done.stdout


def parse(report: str) -> WrkResult:
    """The figures of one wrk report; raises WrkError naming what is missing."""
    done = re.search(r"^\s*(\d+) requests in " + _TIME, report, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", report, re.M)
    if not done or not rps:
        raise WrkError(f"not a wrk report:\n{report}")
    requests = int(done[1])
    fields = {
        "requests": requests,
        "duration_s": _seconds(done[2], done[3]),
        "rps": float(rps[1]),
        # With no answer at all wrk prints a table of zeros: no latency was measured.
        "p50_ms": _percentile_ms(report, "50") if requests else math.nan,
        "p99_ms": _percentile_ms(report, "99") if requests else math.nan,
    }
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report
    )
    if errors:
        fields.update(
            connect_errors=int(errors[1]),
            read_errors=int(errors[2]),
            write_errors=int(errors[3]),
            timeouts=int(errors[4]),
        )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    if non_2xx:
        fields["non_2xx"] = int(non_2xx[1])
    return WrkResult(**fields)


def _percentile_ms(report: str, percent: str) -> float:
    """A latency percentile in ms; NaN when wrk recorded no latency (nothing completed)."""
    found = re.search(rf"^\s*{percent}(?:\.0+)?%\s+{_TIME}", report, re.M)
    if not found:
        if "Latency Distribution" not in report:
            raise WrkError(f"the report has no latency table: run wrk with --latency\n{report}")
        return float("nan")
    return _seconds(found[1], found[2]) * 1000


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNITS_S[unit]
