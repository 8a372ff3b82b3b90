"""What a variant costs the database: its server connections and their memory, sampled.

A thread polls `pg_stat_activity` for the client backends of the bench database, five times a
second, and reads each backend's resident memory from /proc. It keeps the sample with the most
connections (the one with more memory on a tie): "peak connections" and "RSS at peak".

RSS counts the pages of shared_buffers a backend has touched, so the sum over backends counts
those pages more than once; `anon_mb` (RssAnon, the backend's private memory) does not.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psycopg2

INTERVAL_S = 0.2
_BACKENDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"
)


@dataclass(frozen=True)
class Peak:
    connections: int = 0
    rss_mb: float = 0.0
    anon_mb: float = 0.0


class BackendSampler:
    """Samples one database's backends from `start()` until `stop()`, which returns the peak.

    Connects to the `postgres` database, so its own backend is never counted. A backend that
    exits between the query and the read of /proc is skipped.
    """

    def __init__(self, admin_dsn: str, dbname: str):
        self._conn = psycopg2.connect(admin_dsn, application_name="bench-sampler")
        self._conn.autocommit = True
        self._dbname = dbname
        self._peak = Peak()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._peak = Peak()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="backend-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Peak:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        return self._peak

    def count(self) -> int:
        return len(self._pids())

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the database has no client backend left; False if some remain."""
        deadline = time.monotonic() + timeout_s
        while self._pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(INTERVAL_S)
        return True

    def close(self) -> None:
        self._conn.close()

    def _loop(self) -> None:
        while not self._stopping.wait(INTERVAL_S):
            sample = self._sample()
            if (sample.connections, sample.rss_mb) > (self._peak.connections, self._peak.rss_mb):
                self._peak = sample

    def _pids(self) -> list[int]:
        with self._conn.cursor() as cur:
            cur.execute(_BACKENDS, (self._dbname,))
            return [pid for (pid,) in cur.fetchall()]

    def _sample(self) -> Peak:
        pids = self._pids()
        rss_kb = anon_kb = 0
        for pid in pids:
            memory = _memory_kb(pid)
            rss_kb += memory.get("VmRSS", 0)
            anon_kb += memory.get("RssAnon", 0)
        return Peak(len(pids), rss_kb / 1024, anon_kb / 1024)


def _memory_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.read().splitlines()
    except OSError:  # the backend exited since the query
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            found[key] = int(value.split()[0])
    return found
