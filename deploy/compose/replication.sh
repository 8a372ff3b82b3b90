# compose.yaml's primary admits the `replicator` role (init.sql) for streaming replication from
# the stack's own network alone: `samenet` is any subnet the server's container is on.
echo "host replication replicator samenet scram-sha-256" >> "$PGDATA/pg_hba.conf"
