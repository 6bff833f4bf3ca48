# operator/operator.mk: targets of this part (included by the top-level Makefile).
#
#   make operator-test   the operator's tests (decisions, kopf + kmock runtime, end to end)
#   make operator-bench  the operator against a Zipf-skewed workload on 4 local shards
#
# kopf and kmock come with the 'dev' extra (kopf alone is the 'operator' extra the image
# installs); operator-deps installs them into .venv where an older install lacks them.

OPERATOR_BENCH_ARGS ?=

.PHONY: operator-deps operator-test operator-bench

operator-deps: $(INSTALLED)
	@$(PY) -c 'import kopf, kmock' >/dev/null 2>&1 || { \
	  echo "==> installing kopf and kmock (pip, the 'dev' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[dev]'; }

TEST_DEPS += operator-deps

operator-test: setup operator-deps
	$(PY) -m pytest -q tests/operator $(PYTEST_ARGS)

operator-bench: setup operator-deps
	$(PY) operator/bench_rebalance.py $(OPERATOR_BENCH_ARGS)
