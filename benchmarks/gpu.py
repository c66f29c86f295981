"""GPU speed of the L-Matmul backends against native matmuls (issue #16):
``python benchmarks/gpu.py [--out DIR] [--dry-run]``.

Shapes: 4096^3, and attention at batch x heads 64, sequence 2048, head dim 64 and 128 (Q K^T:
[64, 2048, d] x [64, d, 2048]; P V: [64, 2048, 2048] x [64, 2048, d]). Arms, timed in the same run
with CUDA events (warm-up, then the median of repeated calls): native bf16 ``torch.matmul``,
float32 ``torch.matmul`` with TF32 off, and the backends' functions on float32 operands
(operand preparation included: quantization, split, fix-up checks): ``triton-tc`` formula bf16,
``triton-tc`` bit e4m3/e5m2, ``triton`` (CUDA cores) bit bf16 / e4m3, ``decompose`` formula bf16
and bit e4m3. ``lmul.matmul`` (the public call, which feeds backends 2^22-element pieces) is timed
for triton-tc formula too. Then a SmolLM2-135M-config model (random weights) forward at batch
16 x 512, exact against L-Mul attention (``lmul``: bf16 bit; ``lmul-formula``: bf16 formula).

Targets (issue #16): triton-tc formula >= 45% of native bf16 throughput, bit m <= 3 >= 10% of
bf16, bit bf16 >= 40% of fp32 (TF32 off), patched forward <= 1.3x the exact one.

Writes ``gpu.json`` and ``gpu.md`` (GPU model, driver, versions, date, tables, target ratios) to
``--out`` (default ``results/gpu-bench``). Without CUDA it exits with a message unless
``--dry-run``, which runs the same code at tiny shapes on the CPU (triton kernels in Triton's
interpreter, which has to be enabled before triton is imported: this script sets it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name: ([B, M, K], [B, K, N])
    "4096^3": ((1, 4096, 4096), (1, 4096, 4096)),
    "attn QK^T d64": ((64, 2048, 64), (64, 64, 2048)),
    "attn PV d64": ((64, 2048, 2048), (64, 2048, 64)),
    "attn QK^T d128": ((64, 2048, 128), (64, 128, 2048)),
    "attn PV d128": ((64, 2048, 2048), (64, 2048, 128)),
}
DRY_SHAPES = {
    "64^3": ((1, 64, 64), (1, 64, 64)),
    "attn QK^T d16": ((2, 48, 16), (2, 16, 48)),
    "attn PV d16": ((2, 48, 48), (2, 48, 16)),
}
# arm: (backend, spec name) — None backend: a native torch matmul
ARMS = {
    "native bf16": (None, "bf16"),
    "native fp32 (TF32 off)": (None, "fp32"),
    "triton-tc formula bf16": ("triton-tc", "bf16-formula"),
    "triton-tc formula bf16 (lmul.matmul)": ("api", "bf16-formula-triton-tc"),
    "triton-tc bit e4m3": ("triton-tc", "e4m3-bit"),
    "triton-tc bit e5m2": ("triton-tc", "e5m2-bit"),
    "triton bit bf16": ("triton", "bf16-bit"),
    "triton bit e4m3": ("triton", "e4m3-bit"),
    "decompose formula bf16": ("decompose", "bf16-formula"),
    "decompose bit e4m3": ("decompose", "e4m3-bit"),
}
# (target name, arm, baseline arm, minimum throughput ratio arm/baseline)
TARGETS = [
    ("formula >= 45% of native bf16", "triton-tc formula bf16", "native bf16", 0.45),
    ("bit m<=3 >= 10% of native bf16", "triton-tc bit e4m3", "native bf16", 0.10),
    ("bit bf16 >= 40% of fp32 (TF32 off)", "triton bit bf16", "native fp32 (TF32 off)", 0.40),
]
FORWARD_TARGET = 1.3  # patched forward / exact forward


def _timer(device: torch.device):
    """``time(fn, warmup, reps, budget_s) -> list of ms``: CUDA events on a GPU, perf_counter on CPU;
    repetitions stop early when ``budget_s`` is spent (slow arms)."""
    def run(fn, warmup: int = 3, reps: int = 10, budget_s: float = 5.0) -> list[float]:
        for _ in range(warmup):
            fn()
        times, spent = [], 0.0
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                ms = (time.perf_counter() - t0) * 1e3
            times.append(ms)
            spent += ms / 1e3
            if spent > budget_s:
                break
        return times
    return run


def _arm_fn(arm: str, a: torch.Tensor, b: torch.Tensor):
    from lmul import kernels
    from lmul.matmul import matmul
    from lmul.spec import LMulSpec

    backend, name = ARMS[arm]
    if backend is None:
        if name == "bf16":
            a16, b16 = a.bfloat16(), b.bfloat16()
            return lambda: torch.matmul(a16, b16)
        return lambda: torch.matmul(a, b)
    spec = LMulSpec.from_name(name)
    if backend == "api":
        return lambda: matmul(a, b, spec=spec)
    entry = kernels.get("matmul", backend)
    why = entry.unavailable(a, spec.replace(backend=backend))
    if why:
        return why
    return lambda: entry.fn(a, b, spec)


def bench_matmuls(device: torch.device, shapes: dict, warmup: int, reps: int, budget_s: float) -> list[dict]:
    timer = _timer(device)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape, (sa, sb) in shapes.items():
        a = torch.randn(sa, generator=gen, device=device)
        b = torch.randn(sb, generator=gen, device=device)
        flops = 2.0 * sa[0] * sa[1] * sa[2] * sb[2]
        for arm in ARMS:
            fn = _arm_fn(arm, a, b)
            if isinstance(fn, str):
                rows.append(dict(shape=shape, arm=arm, skipped=fn))
                print(f"{shape:16s} {arm:40s} skipped: {fn}", flush=True)
                continue
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 arm (and decompose sets it itself)
            try:
                ms = timer(fn, warmup, reps, budget_s)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
            med = statistics.median(ms)
            rows.append(dict(shape=shape, arm=arm, a=list(sa), b=list(sb), median_ms=med, min_ms=min(ms), reps=len(ms),
                             tflops=flops / med / 1e9))
            print(f"{shape:16s} {arm:40s} {med:10.3f} ms  {flops / med / 1e9:8.2f} TFLOP/s", flush=True)
        del a, b
    return rows


def _smollm2(device: torch.device, dry: bool):
    import transformers as T

    if dry:
        cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # SmolLM2-135M's config, random weights
        cfg = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                            max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to(device).eval()


def bench_forward(device: torch.device, dry: bool, reps: int, budget_s: float) -> list[dict]:
    """Exact forward against L-Mul attention (presets lmul and lmul-formula), batch 16 x 512."""
    import lmul
    from lmul import kernels
    from lmul.spec import PRESETS, LMulSpec

    model = _smollm2(device, dry)
    batch, seq = (2, 16) if dry else (16, 512)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    timer = _timer(device)
    rows = []
    with torch.no_grad():
        exact = statistics.median(timer(lambda: model(ids).logits, 1, reps, budget_s))
        rows.append(dict(arm="exact (sdpa, fp32)", median_ms=exact, ratio=1.0, batch=batch, seq=seq))
        print(f"forward exact {exact:.1f} ms", flush=True)
        for preset in ("lmul", "lmul-formula"):
            spec = LMulSpec(**PRESETS[preset][0])
            backend = kernels.select("matmul", torch.zeros(1, 1, 1, device=device), spec).name
            with lmul.patch(model, preset):
                ms = statistics.median(timer(lambda: model(ids).logits, 1, reps, budget_s))
            rows.append(dict(arm=f"{preset} (attention, {spec.name}, auto -> {backend})", median_ms=ms,
                             ratio=ms / exact))
            print(f"forward {preset} {ms:.1f} ms = {ms / exact:.2f}x exact ({backend})", flush=True)
    return rows


def machine_info(device: torch.device) -> dict:
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, python=platform.python_version(), device=str(device))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["driver"] = f"unknown ({err})"
    else:
        info["gpu"] = "none (dry run on CPU: Triton interpreter, numbers meaningless)"
    return info


def targets(rows: list[dict], forward: list[dict]) -> list[dict]:
    """Per shape, throughput ratio arm/baseline against each target; and the forward ratios."""
    by = {(r["shape"], r["arm"]): r for r in rows if "median_ms" in r}
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for name, arm, base, need in TARGETS:
            if (shape, arm) in by and (shape, base) in by:
                ratio = by[(shape, base)]["median_ms"] / by[(shape, arm)]["median_ms"]
                out.append(dict(target=name, shape=shape, ratio=ratio, need=need, met=ratio >= need))
    for r in forward[1:]:
        out.append(dict(target=f"patched forward <= {FORWARD_TARGET}x exact", shape=r["arm"], ratio=r["ratio"],
                        need=FORWARD_TARGET, met=r["ratio"] <= FORWARD_TARGET))
    return out


def markdown(info: dict, rows: list[dict], forward: list[dict], goals: list[dict]) -> str:
    lines = ["## GPU (issue #16): `python benchmarks/gpu.py`", "",
             f"{info['date']}; GPU {info['gpu']}" + (f" ({info.get('capability')}, driver {info.get('driver')}, "
                                                      f"CUDA {info.get('cuda')})" if "driver" in info else "")
             + f"; torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}. "
             "Medians of CUDA-event timings after warm-up; L-Mul arms on float32 operands, preparation included.",
             "", "| shape | arm | median ms | TFLOP/s (2MNK) |", "|---|---|---|---|"]
    for r in rows:
        if "median_ms" in r:
            lines.append(f"| {r['shape']} | {r['arm']} | {r['median_ms']:.3f} | {r['tflops']:.2f} |")
        else:
            lines.append(f"| {r['shape']} | {r['arm']} | skipped: {r['skipped']} | |")
    if forward:
        shape = f"batch {forward[0]['batch']} x {forward[0]['seq']}"
        lines += ["", f"| forward, {shape}, SmolLM2-135M config (random weights) | median ms | / exact |",
                  "|---|---|---|"]
    lines += [f"| {r['arm']} | {r['median_ms']:.1f} | {r['ratio']:.2f}x |" for r in forward]
    lines += ["", "| target | shape / arm | measured | needed | met |", "|---|---|---|---|---|"]
    for g in goals:
        met = "yes" if g["met"] else "no"
        lines.append(f"| {g['target']} | {g['shape']} | {g['ratio']:.3f} | {g['need']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu-bench", help="folder for gpu.json and gpu.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per arm (after warm-up)")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per arm at most")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per arm first")
    parser.add_argument("--skip-forward", action="store_true", help="matmuls only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False). Run it on a GPU "
              "machine, or pass --dry-run to check the code path at tiny shapes on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    info = machine_info(device)
    print(json.dumps(info), flush=True)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    warmup = 1 if args.dry_run else args.warmup
    rows = bench_matmuls(device, shapes, warmup, 2 if args.dry_run else args.reps, args.budget)
    forward = [] if args.skip_forward else bench_forward(device, args.dry_run, 2 if args.dry_run else 5, 20.0)
    goals = targets(rows, forward)
    from lmul.files import atomic_write

    out = Path(args.out)
    atomic_write(out / "gpu.json", json.dumps(dict(machine=info, matmul=rows, forward=forward, targets=goals),
                                              indent=1) + "\n")
    md = markdown(info, rows, forward, goals)
    atomic_write(out / "gpu.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:] and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.exit(main())
