# cryptotui: every target does the setup it needs first, so each is one command on a fresh machine.
VENV := .venv
BIN := $(VENV)/bin
CRYPTOTUI := $(BIN)/cryptotui

.PHONY: setup test test-fast test-spark lint docs demo run stack-up stack-down stack-status bench clean

setup:
	bash stack/setup.sh

## The whole suite (the README's test command and what CI runs).
test: setup
	$(BIN)/ruff check cryptotui spark tests
	$(BIN)/pytest -ra

## Everything but the slow Spark-session tests.
test-fast: setup
	$(BIN)/pytest -ra -m "not spark"

## Only the Spark-session tests.
test-spark: setup
	$(BIN)/pytest -ra -m spark

## Regenerate the README's settings table from the code.
docs: setup
	$(BIN)/python stack/update_readme_settings.py

lint: setup
	$(BIN)/ruff check cryptotui spark tests

## The whole pipeline on the built-in market simulator (no internet needed).
demo: setup
	$(CRYPTOTUI) --daemon --source sim

## The whole pipeline on the live Binance feed.
run: setup
	$(CRYPTOTUI) --daemon --source binance

stack-up: setup
	$(CRYPTOTUI) stack up

stack-down: setup
	$(CRYPTOTUI) stack down

stack-status: setup
	$(CRYPTOTUI) stack status

bench: setup
	$(CRYPTOTUI) bench stack --json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
