# The two commands of the README: `make demo` and `make test`. Both install first if needed.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean-registry

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	./scripts/install.sh
	@touch $@

demo: install
	$(VENV)/bin/ehr-worker demo

test: install
	$(VENV)/bin/python -m pytest

test-fast: install
	$(VENV)/bin/python -m pytest -m "not services and not slow"

# CI runs this before the tests (.ci/run); ruff and mypy are pinned in constraints.txt
lint: install
	$(VENV)/bin/ruff check schemas models connectors workers training
	$(VENV)/bin/python -m mypy

clean-registry:
	rm -rf registry
