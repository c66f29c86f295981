"""Patched-model forward time against the exact model: SmolLM2-135M-sized Llama, random weights.

Targets (issue 6): on CPU, 512 tokens, ``scope="attention"`` bf16 ``bit`` <= 2x the exact model's
forward time, ``scope="all"`` <= 8x. The model is built from its config (hidden 576, 30 layers, 9
heads, 3 kv heads, intermediate 1536, vocab 49152; no download), seeded, fp32, ``torch.no_grad``.

With a slow backend (the float64 reference) a full patched forward takes hours, so
``--patch-layers`` patches only some decoder blocks and the script *extrapolates* the full-model
time linearly in the number of L-Mul products (every block has the same shapes; the lm_head's
products are counted separately). The output JSON says which figures are measured and which
extrapolated. Exact and patched forwards are interleaved (exact, arm 1, arm 2, exact, ...) and the
JSON gives the median ratio, the ratio of the minima and the median of per-repetition ratios: on a
shared machine the minima are the least disturbed figures.

    python benchmarks/patch.py --seq 512 --arms lmul --patch-layers 0
    python benchmarks/patch.py --seq 512 --arms lmul,lmul-all          # full measurement (fast backend)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import lmul
from lmul import kernels
from lmul.config import LMulConfig
from lmul.files import write_json

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0)


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def products(seq: int, scope: str) -> tuple[int, int]:
    """(L-Mul products per decoder block, in the lm_head) of one forward over ``seq`` tokens."""
    c = SMOLLM2_135M
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    attention = 2 * heads * seq * seq * d  # Q·Kᵀ and A·V (full square; the causal half is computed too)
    if scope == "attention":
        return attention, 0
    linear = seq * (h * h * 2 + h * d * kv * 2 + h * inter * 3)
    elementwise = seq * (inter + 2 * 2 * h + 2 * 2 * (heads + kv) * d)  # gate⊙up, 2 norms × 2, rotary q/k × 2
    return attention + linear + elementwise, seq * h * c["vocab_size"]


def timed(model, ids, repeat: int) -> float:
    """Median wall time of ``repeat`` no-grad forwards."""
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512, help="tokens per forward (batch 1)")
    ap.add_argument("--layers", type=int, default=30, help="decoder blocks in the model (SmolLM2-135M: 30)")
    ap.add_argument("--arms", default="lmul,lmul-all", help="comma-separated LMulConfig presets")
    ap.add_argument("--patch-layers", default=None,
                    help="comma-separated block indices to patch (default: all; then nothing is extrapolated)")
    ap.add_argument("--backend", default="auto", help="lmul.matmul backend")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved timed repetitions per arm (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="write the results JSON here (atomically)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.layers)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, args.seq), generator=torch.Generator().manual_seed(1))
    patch_layers = None if args.patch_layers is None else tuple(int(x) for x in args.patch_layers.split(","))
    arms = args.arms.split(",")
    configs = {arm: LMulConfig.from_name(arm, backend=args.backend, layers=patch_layers) for arm in arms}
    timed(model, ids, 1)  # warm-up
    for cfg in configs.values():  # warm-up: one-time costs (compiling a backend) are not timed
        with lmul.patch(model, cfg):
            timed(model, ids[:, :8], 1)
    # interleaved repetitions (exact, arm 1, arm 2, ...) so that machine load affects all alike
    times: dict[str, list[float]] = {"exact": [], **{arm: [] for arm in configs}}
    for _ in range(args.repeat):
        times["exact"].append(timed(model, ids, 1))
        for arm, cfg in configs.items():
            with lmul.patch(model, cfg):
                times[arm].append(timed(model, ids, 1))
    t_exact = statistics.median(times["exact"])
    results = dict(
        model="SmolLM2-135M-sized Llama (random weights)", layers=args.layers, seq=args.seq, dtype="float32",
        device="cpu", threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, transformers=__import__("transformers").__version__, lmul=lmul.__version__,
        seed=0, repeat=args.repeat, patch_layers=patch_layers, exact_s=t_exact,
        exact_all_s=times["exact"], arms={},
    )
    runs = [round(t, 3) for t in times["exact"]]
    print(f"exact forward: {t_exact:.3f} s median of {runs} ({args.layers} layers, {args.seq} tokens, "
          f"{torch.get_num_threads()} threads)")
    for arm, cfg in configs.items():
        backend = kernels.select("matmul", torch.zeros(1, 1), cfg.spec).name
        t_arm = statistics.median(times[arm])
        pairs = [a / e for a, e in zip(times[arm], times["exact"], strict=True)]  # same repetition
        row = dict(config=cfg.tag, config_fields=dataclasses.asdict(cfg), backend=backend, measured_s=t_arm,
                   all_s=times[arm], measured_ratio=t_arm / t_exact,
                   min_ratio=min(times[arm]) / min(times["exact"]), median_paired_ratio=statistics.median(pairs))
        if patch_layers is not None:
            per_block, head = products(args.seq, cfg.scope)
            extra_per_product = (t_arm - t_exact) / (per_block * len(patch_layers))
            full = t_exact + extra_per_product * (per_block * args.layers + head)
            row.update(patched_blocks=list(patch_layers), extrapolated_full_s=full,
                       extrapolated_full_ratio=full / t_exact,
                       extrapolation="linear in L-Mul products: all blocks (+ lm_head for scope all)")
        results["arms"][arm] = row
        print(json.dumps(row))
    results["backends_registered"] = sorted({b.name for b in kernels.BACKENDS if b.op == "matmul"})
    if args.out:
        write_json(args.out, results, indent=2)


if __name__ == "__main__":
    main()
