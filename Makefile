# Two commands for a newcomer; each sets up .venv first if it is missing or stale.
#   make demo   -> trains Ark on the built-in offline demo federation (synthetic data)
#   make test   -> runs the test suite (what CI runs) in two pytest-xdist workers, a test module's tests together
#                  in one (module-scoped federations), the 15 slowest tests listed at the end
#   make test-fast -> the unit tests only (-m "not slow": no training runs, no federation processes)
# `make test` also installs the system packages tests need (nginx, for tests/federation/test_security_nginx.py;
# chromium and chromium-driver, for the console's browser tests in tests/console/) with apt-get when it runs as
# root and they are missing (CI); otherwise those tests skip and say why (as root a missing one fails them).
VENV ?= .venv
PYTHON ?= python3
SYSTEM_PACKAGES ?= nginx chromium chromium-driver

.PHONY: demo test test-fast bench system-packages

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	$(VENV)/bin/python -c "import arkfed, torch, timm, flwr"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/arkfed train

test: $(VENV)/.installed system-packages
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

# quiet, and never fails the run: without root or apt-get the tests that need a package skip
system-packages:
	@missing=""; for pkg in $(SYSTEM_PACKAGES); do \
		dpkg -s $$pkg >/dev/null 2>&1 || command -v $$pkg >/dev/null 2>&1 || test -x /usr/sbin/$$pkg || missing="$$missing $$pkg"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing (apt-get; tests need it)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends $$missing; } \
			>/dev/null 2>&1 || echo "could not install$$missing; the tests that need it will skip"; \
	else echo "not installed:$$missing (make test installs it as root with apt-get); the tests that need it will skip"; fi

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=10

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/throughput.py
