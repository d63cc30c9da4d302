# The two commands of the README: `make up` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
RELEASE_BINARIES := -p command-api -p projector -p query-api -p ticketing-bench
BENCH := target/release/onsale
BENCH_OUT = bench/results/$$(date -u +%Y%m%dT%H%M%SZ)-$$(git rev-parse --short HEAD)

.PHONY: help up down status test lint infra tools release bench

help:
	@echo "make up      build, start Postgres, Kafka (Tansu), MongoDB (SecantusDB) and the three services"
	@echo "make down    stop everything make up started"
	@echo "make test    bring the servers up, build, lint and run every test (end to end included)"
	@echo "make bench   a short on-sale against the running system; JSON in bench/results/"
	@echo "make status  what runs"

up: infra release
	scripts/services.sh up

down:
	scripts/services.sh down
	scripts/infra.sh down

status:
	scripts/infra.sh status
	scripts/services.sh status

infra:
	scripts/infra.sh up

release:
	cargo build --release --locked $(RELEASE_BINARIES)

# The end-to-end tests start the release binaries themselves, on their own
# ports and databases, so a running `make up` and `make test` do not meet.
# Lint first: it is the cheapest failure. nextest prints the test summary.
test: infra tools lint release
	cargo nextest run --workspace --all-targets --no-fail-fast

# The test runner, the shell linter, the browser the seat map is tested in
# and the OpenAPI checkers, installed once when this machine lacks them.
tools:
	cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
	command -v shellcheck >/dev/null || scripts/infra.sh apt shellcheck
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || scripts/infra.sh apt chromium chromium-driver
	scripts/infra.sh api-checkers

lint: tools
	shellcheck scripts/*.sh .ci/run
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# Two short runs against what `make up` started: an on-sale of 64 buyers on
# 2,000 seats watched live by 1,000 subscribers, and 1,000 buyers racing for
# 10 seats.
bench: up
	$(BENCH) --name onsale-64x2000 --clients 64 --seats 2000 --seconds 10 --watchers 1000 --out $(BENCH_OUT)-onsale.json
	$(BENCH) --name race-1000x10 --clients 1000 --seats 10 --hot-seats 1 --max-seats 1 --holds 0 --cancels 0 --once --out $(BENCH_OUT)-race.json
