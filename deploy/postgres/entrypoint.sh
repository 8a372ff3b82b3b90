#!/bin/sh
# First start (an empty PGDATA), one of two:
# - a primary: a cluster with scram-sha-256 for every TCP connection and the superuser's password
#   from POSTGRES_PASSWORD, then the init scripts in /docker-entrypoint-initdb.d in name order:
#   *.sql run by psql as the superuser, *.sh run by sh with PGDATA set (to edit pg_hba.conf,
#   say), all before the cluster's first real start;
# - with PRIMARY_CONNINFO (a libpq connection string naming a role with REPLICATION): a
#   streaming replica of that primary, copied by `pg_basebackup -R -X stream`, which writes the
#   connection string into postgresql.auto.conf and creates standby.signal.
# Every start: postgres as PID 1, listening on all addresses of the container's network.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ] && [ -n "${PRIMARY_CONNINFO:-}" ]; then
    pg_basebackup -d "$PRIMARY_CONNINFO" -D "$PGDATA" -R -X stream -c fast
    chmod 700 "$PGDATA"
elif [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set for the first start}"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U postgres -A scram-sha-256 --pwfile="$pwfile" -E UTF8 >/dev/null
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" -w start >/dev/null
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sql) PGPASSWORD="$POSTGRES_PASSWORD" psql -h /tmp -U postgres -v ON_ERROR_STOP=1 -q -f "$script" postgres ;;
            *.sh) PGDATA="$PGDATA" sh "$script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
