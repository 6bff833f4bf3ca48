# dashboards/observe.mk: targets of this part (included by the top-level Makefile).
#
#   make dashboards       compile dashboards/*.json and the chart's copy of the alert rules
#   make observe          Prometheus next to a running `make run` cluster, with the rules
#   make dashboard-plots  a short run of its own cluster, plotted to docs/images/ (PNG)
#   make prometheus-deps  Debian's prometheus (and promtool) when missing, the Python extras

OBSERVE_ARGS ?=
DASHBOARDS_PY := PYTHONPATH=dashboards $(PY)

.PHONY: dashboards observe dashboard-plots prometheus-deps

dashboards: $(INSTALLED)
	@$(DASHBOARDS_PY) -m engram_dashboards.build

# Reads the cluster's process list (.engram/cluster.json, as `engram status --json` shows
# it); Ctrl-C stops Prometheus. OBSERVE_ARGS='--port 9091 --data-dir /path' to change them.
observe: prometheus-deps
	@$(DASHBOARDS_PY) -m engram_dashboards.observe --data-dir .engram $(OBSERVE_ARGS)

dashboard-plots: prometheus-deps proto
	@$(PY) -c 'import matplotlib' >/dev/null 2>&1 || { \
	  echo "==> installing the 'bench' extra (matplotlib)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[bench]'; }
	@$(DASHBOARDS_PY) -m engram_dashboards.plot

# prometheus and promtool from Debian (apt-get when root and missing), for make observe and
# the tests of tests/dashboards (a real Prometheus scraping a local cluster).
prometheus-deps: $(INSTALLED)
	@have() { [ -x "$$(command -v "$$1" 2>/dev/null)" ]; }; \
	if ! have prometheus || ! have promtool; then \
	  if [ "$$(id -u)" = 0 ] && have apt-get; then \
	    echo "==> installing prometheus (apt-get)"; \
	    apt-get update -qq && $(APT_INSTALL) --no-install-recommends prometheus >/dev/null || exit 1; \
	  else \
	    echo "error: prometheus not found (sudo apt-get install prometheus)"; exit 1; \
	  fi; \
	fi
	@$(PY) -c 'import grafana_foundation_sdk' >/dev/null 2>&1 || { \
	  echo "==> installing the dashboards' Python packages (the 'dev' extra)"; \
	  $(PIP) install -q --disable-pip-version-check -e '.[dev]'; }

TEST_DEPS += prometheus-deps
