"""One decoding step's attention under L-Mul against the exact eager attention, in the same run.

A decoding step multiplies one new query row per head by the whole key/value cache, so the cost of
an L-Matmul there is preparing (quantizing and packing) the cache, which happens again at every
step: ``lmul.nn.lmul_attention`` on grouped-query shapes ([B, H, 1, D] queries, [B, H_kv, T, D]
cache) for each arm, against torch's eager attention (``Q Kᵀ``, softmax, ``A V`` on K/V repeated
per query head, as transformers' eager path). The ``repeated`` column feeds ``lmul_attention`` K/V
already repeated per query head (H_kv = H), the layout before the query heads of a group were
stacked as rows. Ratio = our time / native time, best of interleaved repeats. Prints the table;
``--out benchmarks/RESULTS.md`` writes it into that file's ``decode`` section.

    python benchmarks/decode.py --lens 256                          # print only
    python benchmarks/decode.py --out benchmarks/RESULTS.md         # SmolLM2-135M's shapes, batch 8
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

from lmul.bench import best_times, machine_line
from lmul.config import LMulConfig
from lmul.files import replace_section
from lmul.nn import lmul_attention, repeat_kv


class _Module(torch.nn.Module):  # lmul_attention reads only .training
    pass


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' eager attention: K/V repeated per query head, float32 softmax."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32), v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lens", default="256,1024", help="cache lengths T, comma separated")
    p.add_argument("--arms", default="lmul,e4m3,e5m2,lmul-k3", help="presets (lmul.PRESETS), comma separated")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="also write the section into this file (benchmarks/RESULTS.md: the "
                   "committed results); default: print only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    header = ("| T | arm | lmul_attention | K/V repeated (before) | native eager | ratio | ratio before |\n"
              "|---|---|---|---|---|---|---|")
    rows = []
    print(header)
    for t in (int(x) for x in args.lens.split(",")):
        q = torch.randn(args.batch, args.heads, 1, args.head_dim, generator=gen)
        k = torch.randn(args.batch, args.kv_heads, t, args.head_dim, generator=gen)
        v = torch.randn(args.batch, args.kv_heads, t, args.head_dim, generator=gen)
        mask = torch.zeros(args.batch, 1, 1, t)
        k_rep, v_rep = repeat_kv(k, args.heads // args.kv_heads), repeat_kv(v, args.heads // args.kv_heads)
        for arm in args.arms.split(","):
            cfg = LMulConfig.from_name(arm)
            ours = partial(lmul_attention, _Module(), q, k, v, mask, config=cfg)
            before = partial(lmul_attention, _Module(), q, k_rep, v_rep, mask, config=cfg)
            native = partial(eager_attention, q, k, v, mask)
            t_ours, t_before, t_nat = best_times([ours, before, native], "cpu", args.reps, 0.0)  # warms up first
            row = (f"| {t} | {arm} | {t_ours * 1e3:.2f} ms | {t_before * 1e3:.2f} ms | {t_nat * 1e3:.2f} ms | "
                   f"{t_ours / t_nat:.1f}x | {t_before / t_nat:.1f}x |")
            rows.append(row)
            print(row, flush=True)
    if args.out:
        cmd = "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
        body = "\n".join([
            f"Machine: {machine_line('cpu')}. Command: `{cmd.strip()}`.",
            f"One decoding step's attention (one layer): queries [{args.batch}, {args.heads}, 1, {args.head_dim}], "
            f"K/V cache [{args.batch}, {args.kv_heads}, T, {args.head_dim}]. Best of {args.reps} interleaved repeats.",
            "", header, *rows])
        replace_section(args.out, "decode", "Decoding-step attention: `lmul_attention` vs eager", body)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
