# Two entry points (see README): `make run` and `make test`. Both create .venv if absent.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
EXTRAS  ?= test,eval

.PHONY: run demo test install lint bench clean

# `make run`: the embedded default evaluation (docs/eval.md). Assets go to a git-ignored folder;
# rerunning resumes (finished (arm, task) results are skipped). RUN_LIMIT=all evaluates every item.
LMUL_HOME ?= $(CURDIR)/.cache/lmul
export LMUL_HOME
RUN_LIMIT ?= 30
RUN_OUT   ?= results/default-limit$(RUN_LIMIT)
# one torch thread: on a 2-core machine shared with other work it is 4-10x faster than two (docs/eval.md)
RUN_ARGS  ?= --threads 1

$(VENV)/bin/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/lmul fetch
	$(VENV)/bin/lmul eval --model smollm2 --tasks commonsense --arms exact,e4m3,e5m2,lmul \
		--limit $(RUN_LIMIT) --out $(RUN_OUT) $(RUN_ARGS)
	@echo "report: $(RUN_OUT)/report.md (plots and results.json beside it)"

demo: install
	$(VENV)/bin/lmul demo

test: install
	$(VENV)/bin/ruff check lmul tests benchmarks
	$(PYTHON) -m pytest -q -n 2

lint: install
	$(VENV)/bin/ruff check lmul tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
