# Two commands do all set-up on a fresh machine:
#   make run   serve through the production command (a throwaway PostgreSQL when DATABASE_URL is unset;
#              make run REPLICAS=2 gives it 2 streaming replicas, in DATABASE_REPLICA_URLS)
#   make test  the system packages the suite needs, then the suite against a throwaway PostgreSQL
#              (or TEST_DATABASE_URL)
# and, while working on the code:
#   make test-quick  the suite but for the tests needing Docker or PgBouncer: no root needed
# and, for performance work:
#   make bench the service against its peers, route by route: bench/RESULTS.md and results.png
# and, for containers:
#   make up    HAProxy in front of 3 instances of the service, PgBouncer, PostgreSQL and a streaming
#              replica (compose.yaml), on one URL; make roll replaces the instances one at a time
#              with no request lost; make down

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-quick system-packages system-packages-quick bench format clean lock up roll down

# The virtualenv holds exactly the locked versions (requirements-dev.lock: the service's
# requirements.lock and the tools), each checked against its hash; it is rebuilt whenever a
# lock changes. `make lock` compiles the locks from requirements.txt and requirements-dev.txt.
$(BIN)/.installed: requirements.lock requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=python3.x)")'
	@$(PYTHON) -m venv $(VENV) || { echo "cannot create a virtualenv: install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-dev.lock
	@touch $@

# Both locks, universal (any platform) with hashes; the runtime pins are the same in both.
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --universal --python-version 3.11
lock: $(BIN)/.installed
	$(UV_COMPILE) requirements.txt -o requirements.lock
	$(UV_COMPILE) requirements.txt requirements-dev.txt -c requirements.lock -o requirements-dev.lock

# REPLICAS: streaming replicas of the throwaway PostgreSQL (refused when DATABASE_URL is set).
REPLICAS ?= 0

run: $(BIN)/.installed
	$(BIN)/python -m deploy.localpg --replicas $(REPLICAS) -- $(BIN)/gunicorn -c gunicorn.conf.py

# The system packages the tests need come first (tests/system-packages): installed from
# Debian as root, else named in one line on which the run stops, before the virtualenv is made.
# The quick loop leaves out the tests that need Docker (image, Compose) or PgBouncer, and so
# needs only PostgreSQL.
test: system-packages $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-quick: system-packages-quick $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not container and not pgbouncer"

system-packages:
	@tests/system-packages

system-packages-quick:
	@tests/system-packages --quick

# make bench   the service against Flask + psycopg 3 (gthread and gevent) and Starlette + asyncpg
#              with the mix and each route alone, and issue 4's variants (a connection per
#              request, /healthz, pgbench), at 50, 500 and 5,000 connections: writes
#              bench/RESULTS.md and results.png (about 1.5 hours)
# BENCH_ARGS passes flags through, e.g. a quick run:
#   make bench BENCH_ARGS="--workloads mix,create --stacks service,peer-gevent --levels 50 --duration 3 --rounds 1"

BENCH_ARGS ?=

$(BIN)/.bench-installed: $(BIN)/.installed bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	@touch $@

bench: $(BIN)/.bench-installed
	@command -v wrk >/dev/null || { \
	    if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; \
	    else \
	        echo "wrk is missing: install it (Debian/Ubuntu: sudo apt-get install wrk;" \
	             "macOS: brew install wrk), then run make bench again"; exit 1; \
	    fi; }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# make up    HAProxy, the stack's one entry point on 127.0.0.1, in front of 3 instances of the
#            service, which write through PgBouncer to PostgreSQL and read on its streaming
#            replica (compose.yaml), on a Docker engine started when none answers; it prints the
#            URL. make down removes the containers.
# make roll  rebuilds the service's image and replaces its instances one at a time, each new one
#            in the balancer's rotation before an old one drains and stops (deploy/rolling.py).
up: $(BIN)/.installed
	$(BIN)/python -m deploy.localdocker
	docker-compose -f compose.yaml up -d --build --scale app=3
	@echo "the service: http://$$(docker-compose -f compose.yaml port lb 8080)"

roll: $(BIN)/.installed
	docker-compose -f compose.yaml build app
	$(BIN)/python -m deploy.rolling

down:
	docker-compose -f compose.yaml down

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .localpg .pytest_cache .ruff_cache
