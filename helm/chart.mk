# helm/chart.mk: targets of this part (included by the top-level Makefile).
#
#   make chart-deps   helm-python-sdk and kubernetes-validate in .venv, checkov in .venv-checkov
#   make chart-test   the chart's tests alone (tests/chart)
#   make chart-docs   rewrite the values table of docs/kubernetes.md from the schema

CHECKOV_VENV := .venv-checkov
CHECKOV_VERSION := 3.3.30

.PHONY: chart-deps chart-test chart-docs

TEST_DEPS += chart-deps

# checkov gets a venv of its own: it pins (and downgrades) packages the project uses.
chart-deps: $(INSTALLED)
	@$(PY) -c 'import helm_python, kubernetes_validate' >/dev/null 2>&1 || { \
	  echo "==> installing helm-python-sdk and kubernetes-validate (pip, the 'dev' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[dev]'; }
	@if [ ! -x $(CHECKOV_VENV)/bin/checkov ] || \
	    [ "$$($(CHECKOV_VENV)/bin/python -c 'import checkov.version as v; print(v.version)' 2>/dev/null)" != "$(CHECKOV_VERSION)" ]; then \
	  echo "==> installing checkov $(CHECKOV_VERSION) into $(CHECKOV_VENV)"; \
	  rm -rf $(CHECKOV_VENV) && $(PYTHON) -m venv $(CHECKOV_VENV) && \
	  $(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION); \
	fi

chart-test: setup chart-deps
	$(PY) -m pytest -q tests/chart $(PYTEST_ARGS)

chart-docs: chart-deps
	$(PY) helm/values_table.py --write
