# Two commands do all set-up on a fresh machine:
#   make run   serve through the production command (a throwaway PostgreSQL when DATABASE_URL is unset)
#   make test  run the test suite against a throwaway PostgreSQL (or TEST_DATABASE_URL)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint format clean

# The virtualenv is rebuilt whenever a requirements file changes.
$(BIN)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (set PYTHON=python3.x)")'
	@$(PYTHON) -m venv $(VENV) || { echo "cannot create a virtualenv: install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@touch $@

run: $(BIN)/.installed
	$(BIN)/python -m service.localpg -- $(BIN)/gunicorn -c gunicorn.conf.py

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .localpg .pytest_cache .ruff_cache
