#!/usr/bin/env bash
# `make gpu-check` (issue #16): on a CUDA machine, with the system python and PYTHONPATH=. (no
# install): the Triton test files on the device, benchmarks/gpu.py, the patched-model check
# (scripts/gpu_model_check.py) and `lmul eval --device cuda` against `--device cpu` on synthetic
# assets (scripts/gpu_eval_check.py; the eval step also needs lm_eval), everything written under one
# folder: $OUT if set, else results/gpu-check. At most 6 minutes of GPU time (the steps'
# timeouts: tests 150 + bench 100 + model 50 + eval 60 s; a step that runs out is recorded, the rest go on).
# GPU_CHECK_DRY=1: the same steps on the CPU at tiny sizes (Triton's interpreter).
set -u
cd "$(dirname "$0")/.."
DIR="${OUT:-results/gpu-check}"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY:-0}"
mkdir -p "$DIR"
export PYTHONPATH=.
SUMMARY="$DIR/summary.md"
echo "# gpu-check $(date -u '+%Y-%m-%d %H:%M UTC') (dry=$DRY)" > "$SUMMARY"

missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "triton", "transformers", "pytest", "hypothesis"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu-check: $PY lacks: $missing (install them, or set PYTHON=)" | tee -a "$SUMMARY"
    exit 2
fi

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $DIR/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$DIR/$name.log"
    echo "- $name: rc=$rc ($((SECONDS - t0)) s): \`$*\`" >> "$SUMMARY"
    [ "$rc" = 0 ] || status=1
}

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    step tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_tc.py -k "every_8bit or sums_match or specials"
    step bench 300 "$PY" benchmarks/gpu.py --dry-run --out "$DIR"
    step model 300 "$PY" scripts/gpu_model_check.py --dry-run --out "$DIR"
    step eval 300 "$PY" scripts/gpu_eval_check.py --dry-run --out "$DIR/eval"
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu-check: no CUDA device (torch.cuda.is_available() is False); GPU_CHECK_DRY=1 runs the CPU dry run" \
            | tee -a "$SUMMARY"
        exit 2
    fi
    nvidia-smi > "$DIR/nvidia-smi.txt" 2>&1 || true
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())" >> "$SUMMARY" 2>&1
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_tc.py tests/test_triton_lmul.py \
        --junitxml="$DIR/tests.xml"
    step bench 100 "$PY" benchmarks/gpu.py --out "$DIR" --warmup 2 --reps 5 --budget 1.5
    step model 50 "$PY" scripts/gpu_model_check.py --out "$DIR"
    step eval 60 "$PY" scripts/gpu_eval_check.py --out "$DIR/eval"
fi
echo "- overall: $([ $status = 0 ] && echo PASSED || echo FAILED)" >> "$SUMMARY"
cat "$SUMMARY"
exit $status
