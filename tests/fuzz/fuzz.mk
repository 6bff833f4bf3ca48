# The decoders' fuzzing (tests/fuzz): the gRPC request decoder, the WebSocket frame parser and
# the WAL record reader. `make test` runs tests/fuzz with a short budget (a few dozen examples
# per test); `make fuzz` is the long run: FUZZ_EXAMPLES hypothesis examples per test, then
# FUZZ_SECONDS of atheris (coverage-guided) per target when atheris is installed.
# Crashes and the growing atheris corpus are kept in .engram/fuzz/.

FUZZ_EXAMPLES ?= 20000
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := grpc ws wal

.PHONY: fuzz fuzz-deps

# atheris ships cp311 manylinux wheels; elsewhere it builds from source with clang and may
# fail: then make fuzz runs the hypothesis part only.
fuzz-deps: $(INSTALLED)
	@$(PY) -c 'import atheris' >/dev/null 2>&1 || { \
	  echo "==> installing atheris (pip)"; \
	  $(PIP) install -q --disable-pip-version-check atheris >/dev/null 2>&1 || \
	    echo "warning: atheris did not install (no wheel for this Python/platform, and building it needs clang); make fuzz runs the hypothesis fuzzing only"; }

fuzz: venv proto fuzz-deps
	@echo "==> fuzz: hypothesis, tests/fuzz, $(FUZZ_EXAMPLES) examples per test"
	ENGRAM_FUZZ_PROFILE=long ENGRAM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q \
	  -p no:cacheprovider --timeout=0 --hypothesis-show-statistics tests/fuzz $(PYTEST_ARGS)
	@set -o pipefail; \
	if $(PY) -c 'import atheris' >/dev/null 2>&1; then \
	  for target in $(FUZZ_TARGETS); do \
	    echo "==> fuzz: atheris, target $$target, $(FUZZ_SECONDS) s"; \
	    $(PY) tests/fuzz/atheris_targets.py $$target $(FUZZ_SECONDS) 2>&1 \
	      | { grep -v '^INFO: Instrumenting' || true; } || exit 1; \
	  done; \
	  echo "==> fuzz: done: hypothesis $(FUZZ_EXAMPLES) examples per test; atheris $(FUZZ_SECONDS) s each for $(FUZZ_TARGETS)"; \
	else \
	  echo "==> fuzz: done: hypothesis $(FUZZ_EXAMPLES) examples per test; atheris not installed, skipped"; \
	fi
