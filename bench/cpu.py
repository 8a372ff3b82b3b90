"""Where the two cores went during one measurement: server, database, load generator, others.

The machine is shared, so each figure comes with the CPU that processes outside the bench
used meanwhile ("other"): a cell measured while others were busy says so. The CPU of a process
tree is read from /proc: each live process's own time plus the time of the children it has
reaped (cutime, cstime), so backends that exit during the window still count. The load
generator is a reaped child of this process: its time comes from getrusage.
"""

from __future__ import annotations

import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuUse:
    wall_s: float
    server_s: float
    database_s: float
    load_s: float
    other_s: float  # busy time of the machine not accounted for by the bench

    @property
    def other_cores(self) -> float:
        return self.other_s / self.wall_s if self.wall_s else 0.0


@dataclass(frozen=True)
class _Snapshot:
    wall: float
    busy_s: float
    server_s: float
    database_s: float
    children_s: float
    self_s: float


class CpuMeter:
    """Measures from `start()` to `stop()`; `server_pid` is None when no HTTP server runs."""

    def __init__(self, database_pid: int, server_pid: int | None = None):
        self._database_pid = database_pid
        self._server_pid = server_pid
        self._start: _Snapshot | None = None

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> CpuUse:
        end, start = self._snapshot(), self._start
        assert start is not None, "start() first"
        server = end.server_s - start.server_s
        database = end.database_s - start.database_s
        load = end.children_s - start.children_s
        ours = server + database + load + (end.self_s - start.self_s)
        return CpuUse(
            wall_s=end.wall - start.wall,
            server_s=server,
            database_s=database,
            load_s=load,
            other_s=max(0.0, end.busy_s - start.busy_s - ours),
        )

    def _snapshot(self) -> _Snapshot:
        trees = _tree_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return _Snapshot(
            wall=time.monotonic(),
            busy_s=_machine_busy_s(),
            server_s=trees(self._server_pid) if self._server_pid else 0.0,
            database_s=trees(self._database_pid),
            children_s=children.ru_utime + children.ru_stime,
            self_s=own.ru_utime + own.ru_stime,
        )


@dataclass(frozen=True)
class Busy:
    """CPU seconds since boot at one moment: the machine's busy time, and a process tree's."""

    wall: float
    machine_s: float
    tree_s: float

    def others_cores(self, since: Busy) -> float:
        """Cores kept busy on average, between `since` and this moment, by processes outside
        the tree: other people's work on a shared machine."""
        wall = self.wall - since.wall
        others = (self.machine_s - since.machine_s) - (self.tree_s - since.tree_s)
        return max(0.0, others) / wall if wall > 0 else 0.0


def busy(root: int) -> Busy:
    """Now, for the tree under `root` (say the bench itself, with every server, PostgreSQL and
    load generator it started): its live processes' own time and their reaped children's."""
    return Busy(time.monotonic(), _machine_busy_s(), _tree_times()(root))


def _machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idling, since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) * _TICK_S


def _tree_times():
    """A function giving the CPU seconds of the process tree under a pid, from one /proc read."""
    children: dict[int, list[int]] = defaultdict(list)
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited since the listing
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        children[int(fields[1])].append(pid)
        times[pid] = sum(int(f) for f in fields[11:15]) * _TICK_S  # utime stime cutime cstime

    def tree(root: int) -> float:
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            total += times.get(pid, 0.0)
            stack.extend(children.get(pid, ()))
        return total

    return tree
