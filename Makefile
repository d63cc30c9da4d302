# The two commands of the README: `make up` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help up down status test lint

help:
	@echo "make up     bring up Postgres, Tansu (Kafka) and SecantusDB (MongoDB) on 127.0.0.1"
	@echo "make test   bring them up, then lint and run every test against them"
	@echo "make down   stop what make up started"

up:
	scripts/infra.sh up

down:
	scripts/infra.sh down

status:
	scripts/infra.sh status

# Lint first: it is the cheapest failure. nextest prints the test summary.
test: up lint
	cargo nextest run --workspace --all-targets --no-fail-fast

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
