-- compose.yaml's database: the role the service logs in as (through PgBouncer), its database,
-- and its statement timeout set on the server, so that no SET LOCAL is sent per transaction
-- (docs/scaling.md, "The statement timeout behind PgBouncer").
CREATE ROLE app LOGIN PASSWORD 'compose-app-password';
CREATE DATABASE app OWNER app;
ALTER ROLE app IN DATABASE app SET statement_timeout = 5000;
