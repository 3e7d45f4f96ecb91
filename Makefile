# The two commands of the README, and a few for development.
.PHONY: demo test lint format bench setup clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(BIN)/certsync-lab demo

# Two workers: the suites that start servers spend most of their time waiting on them (tests/conftest.py
# keeps each such suite whole on one worker).
test: setup lint
	$(BIN)/python -m pytest -q -n 2

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole cycle at 20,000 and 100,000 users against each stage's limit and a naive baseline, then
# the DAG on the compose stack's Celery profile with one worker and with two at both sizes; writes
# bench/RESULTS.md from all of it. The labs are built once and kept in .certsync/bench-*. Samba's LDAP
# port is fixed, so the cycle gets a network namespace of its own (as root); the compose stack makes
# its own. The 20,000-user cycle is also profiled.
bench: setup
	unshare -n bash -c 'ip link set lo up; $(BIN)/python bench/bench_cycle.py --profile 20000'
	$(BIN)/python bench/bench_workers.py --users 20000
	$(BIN)/python bench/bench_workers.py --users 100000
	$(BIN)/python bench/bench_cycle.py --report-only

clean:
	-$(BIN)/certsync-lab down
	rm -rf .certsync
