# Two entry points (see README): `make run` and `make test`. Both create .venv if absent.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
EXTRAS  ?= test,eval

.PHONY: run test install lint bench clean

$(VENV)/bin/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/lmul demo

test: install
	$(VENV)/bin/ruff check lmul tests benchmarks
	$(PYTHON) -m pytest -q -n 2

lint: install
	$(VENV)/bin/ruff check lmul tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
