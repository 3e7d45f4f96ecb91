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
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python bench/bench_validation.py

clean:
	-$(BIN)/certsync-lab down
	rm -rf .certsync
