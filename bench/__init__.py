"""`make bench`: the service against the ways one might serve Flask from PostgreSQL instead.

`python -m bench.run --help` from the repository root. Everything runs on this machine: a
throwaway PostgreSQL, the servers under test on 127.0.0.1, and wrk or pgbench as the load.
"""
