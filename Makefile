# Two entry points (see README): `make run` and `make test`. Both create .venv if absent.
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
EXTRAS  ?= test,eval

.PHONY: run demo test test-cpu-paths install lint bench clean hw-deps hw-verify hw-table gpu-check

# `make run`: the embedded default evaluation (docs/eval.md). Assets go where `lmul` keeps them
# ($LMUL_HOME, default ~/.cache/lmul; `lmul fetch --where`); rerunning resumes (finished (arm, task)
# results are skipped). RUN_LIMIT=all evaluates every item.
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

# The suite again on other CPU code paths (CI's second leg, issue 25): MKL's AVX2 kernels (another
# GEMM blocking, as on an AMD CPU), ATen's non-vectorised kernels, one thread. An assertion that
# depends on the CPU it runs on (bit-for-bit against torch's kernels on other shapes, a guessed
# tolerance) fails here on any machine, not only on the next one. The hardware tests are left out
# (no torch numerics).
CPU_PATHS_ENV := MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1
test-cpu-paths: install
	env $(CPU_PATHS_ENV) $(PYTHON) -m pytest -q -n 2 --ignore=tests/test_hw.py

lint: install
	$(VENV)/bin/ruff check lmul tests benchmarks

# hardware (lmul.hw, docs/hardware.md): Icarus Verilog + Yosys from Debian; tests/test_hw.py skips without them
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
hw-deps:
	command -v iverilog >/dev/null && command -v yosys >/dev/null || \
		($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iverilog yosys)

# every operand pair of e4m3/e5m2, 10^6 random pairs of bf16/fp16, each unit and MAC lane against its oracle
hw-verify: install hw-deps
	for f in e4m3 e5m2 bf16 fp16; do for u in lmul fpmul; do \
		$(VENV)/bin/lmul rtl --fmt $$f --unit $$u --verify --n 1000000 || exit 1; done; done
	for f in e4m3 e5m2; do for o in "--rounding rne" "--rounding rne --flush-subnormals"; do \
		$(VENV)/bin/lmul rtl --fmt $$f --unit fpmul $$o --verify || exit 1; done; done
	for f in e4m3 e5m2 fp16; do for u in lmul fpmul; do \
		$(VENV)/bin/lmul rtl --fmt $$f --unit $$u --mac --verify --n 1000000 || exit 1; done; done

# the synthesis table of docs/hardware.md
hw-table: install hw-deps
	$(VENV)/bin/lmul rtl --synth-table docs/hardware_table.md

# GPU check (issue #16, docs/kernels.md "GPU"): system python3, PYTHONPATH=. (no venv, no install):
# Triton tests on the device, benchmarks/gpu.py, patched-model check, eval cuda vs cpu on synthetic
# assets (scripts/gpu_eval_check.py); all under $$OUT or results/gpu-check.
# DRY=1 (or GPU_CHECK_DRY=1): the same steps at tiny sizes on the CPU (Triton interpreter).
DRY ?= $(GPU_CHECK_DRY)
gpu-check:
	GPU_CHECK_DRY=$(if $(filter 1,$(DRY)),1,0) PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
