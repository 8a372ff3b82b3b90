#!/bin/sh
# First start: a cluster with scram-sha-256 for every TCP connection, the superuser's password
# from POSTGRES_PASSWORD, then the init scripts. Every start: postgres as PID 1, listening on
# all addresses of the container's network.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set for the first start}"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U postgres -A scram-sha-256 --pwfile="$pwfile" -E UTF8 >/dev/null
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
    for script in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$script" ] && PGPASSWORD="$POSTGRES_PASSWORD" psql -h /tmp -U postgres -v ON_ERROR_STOP=1 -q -f "$script" postgres
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
