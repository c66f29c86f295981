"""``lmul demo``: the contract's golden values and L-Mul's error against fp8 multiplies.

The error summary multiplies ``n`` pairs of standard-normal operands and reports the relative
error ``|P - xy| / |xy|`` of each arm against the float64 product of the unrounded operands
(paper §2.3.1 / Figure 3: L-Mul with a 4-bit mantissa vs fp8 e4m3, 3-bit vs e5m2).
"""

from __future__ import annotations

import argparse

import torch

from lmul.ops import mul

# (x, y, note) rows of docs/semantics.md's golden table
GOLDEN_INPUTS = [
    (3.0, 4.0, ""), (1.5, 1.5, ""), (1.5, 1.75, "mantissa carry"), (1.0, 1.0, ""),
    (-2.0, 3.0, "sign"), (1.875, 1.875, "carry"), (0.0, 5.0, "zero"), (448.0, 2.0, "beyond e4m3 max"),
    (2.0**-6, 2.0**-6, "small"), (1.9921875, 1.9921875, "s >= 2 in bf16"),
]
GOLDEN_ARMS = [("bf16", "bit"), ("bf16", "formula"), ("e4m3", "bit"), ("e4m3", "formula"), ("e5m2", "bit")]
ERROR_ARMS = [
    ("fp8 e4m3 multiply", "e4m3", "exact"), ("fp8 e5m2 multiply", "e5m2", "exact"),
    ("L-Mul 2-bit (e8m2)", "e8m2", "bit"), ("L-Mul 3-bit (e8m3)", "e8m3", "bit"),
    ("L-Mul 4-bit (e8m4)", "e8m4", "bit"), ("L-Mul bf16", "bf16", "bit"),
    ("bf16 multiply", "bf16", "exact"),
]


def golden_table() -> str:
    x = torch.tensor([r[0] for r in GOLDEN_INPUTS])
    y = torch.tensor([r[1] for r in GOLDEN_INPUTS])
    cols = [mul(x, y, fmt, mode) for fmt, mode in GOLDEN_ARMS]
    head = "| x × y | " + " | ".join(f"{f} {m}" for f, m in GOLDEN_ARMS) + " | note |"
    lines = [head, "|" + "---|" * (len(GOLDEN_ARMS) + 2)]
    for i, (a, b, note) in enumerate(GOLDEN_INPUTS):
        vals = " | ".join(f"{c[i].item():.9g}" for c in cols)
        lines.append(f"| {a:g} × {b:g} | {vals} | {note} |")
    return "\n".join(lines)


def error_table(n: int = 1_000_000, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    exact = x * y
    lines = [f"relative error |P - xy| / |xy| over {n} N(0,1) pairs (seed {seed})", "",
             "| arm | mean | rms | max | bias (mean signed) |", "|---|---|---|---|---|"]
    for label, fmt, mode in ERROR_ARMS:
        rel = (mul(x, y, fmt, mode).double() - exact) / exact.abs()
        lines.append(
            f"| {label} | {rel.abs().mean():.4%} | {rel.pow(2).mean().sqrt():.4%} | "
            f"{rel.abs().max():.4%} | {rel.mean():+.4%} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print("L-Mul golden values (docs/semantics.md §3)\n")
    print(golden_table())
    print()
    print(error_table(args.n, args.seed))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmul.cli import int_arg

    p = sub.add_parser("demo", help="print the golden table and an error summary")
    p.add_argument("--n", type=int_arg(1), default=1_000_000, help="operand pairs for the error summary")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=run)
