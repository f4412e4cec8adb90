# Two commands for a newcomer; each sets up .venv first if it is missing or stale.
#   make demo   -> trains Ark on the built-in offline demo federation (synthetic data)
#   make test   -> runs the test suite (what CI runs), the 15 slowest tests listed at the end
#   make test-fast -> the unit tests only (-m "not slow": no training runs, no federation processes)
VENV ?= .venv
PYTHON ?= python3

.PHONY: demo test test-fast bench

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	$(VENV)/bin/python -c "import arkfed, torch, timm, flwr"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/arkfed train

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q --durations=15

test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=10

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/throughput.py
