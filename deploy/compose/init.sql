-- compose.yaml's database: the role the service logs in as (through PgBouncer to the primary,
-- directly to the replica), its database, and its statement timeout set on the server, so that
-- no SET LOCAL is sent per transaction (docs/scaling.md, "The statement timeout behind
-- PgBouncer"); the replica has them all from the primary.
CREATE ROLE app LOGIN PASSWORD 'compose-app-password';
CREATE DATABASE app OWNER app;
ALTER ROLE app IN DATABASE app SET statement_timeout = 5000;
-- The role `db-replica` streams the WAL as (pg_basebackup, then its walreceiver); pg_hba.conf
-- admits it from the stack's network (replication.sh).
CREATE ROLE replicator LOGIN REPLICATION PASSWORD 'compose-replication-password';
