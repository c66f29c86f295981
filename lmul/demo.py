"""``lmul demo``: the contract's golden values and L-Mul's error against fp8 multiplies.

The error summary multiplies ``n`` pairs of standard-normal operands and reports the relative
error ``|P - xy| / |xy|`` of each arm against the float64 product of the unrounded operands
(paper §2.3.1 / Figure 3: L-Mul with a 4-bit mantissa vs fp8 e4m3, 3-bit vs e5m2).
"""

from __future__ import annotations

import argparse

import torch

from lmul.elementwise import mul
from lmul.golden import GOLDEN, golden_cases
from lmul.spec import LMulSpec

GOLDEN_SPECS = ["bf16-bit", "bf16-formula", "e4m3-bit", "e4m3-formula", "e5m2-bit"]
ERROR_ARMS = [  # (label, spec name)
    ("fp8 e4m3 multiply", "e4m3-exact"), ("fp8 e5m2 multiply", "e5m2-exact"),
    ("L-Mul 2-bit (e8m2)", "e8m2-bit"), ("L-Mul 3-bit (e8m3)", "e8m3-bit"),
    ("L-Mul 4-bit (e8m4)", "e8m4-bit"), ("L-Mul bf16", "bf16-bit"),
    ("bf16 multiply", "bf16-exact"),
]


def golden_table() -> str:
    """The contract's golden rows (:data:`lmul.golden.GOLDEN`), each product computed by
    :func:`lmul.mul`; a computed value that differs from the contract is flagged with ``≠``."""
    rows = [r for r in GOLDEN if r[3] != "s >= 2 carry, fp32"]
    x = torch.tensor([float(r[0]) for r in rows])
    y = torch.tensor([float(r[1]) for r in rows])
    cols = {s: mul(x, y, spec=LMulSpec.from_name(s)) for s in GOLDEN_SPECS}
    expected = {s: {(a, b): v for a, b, v, _ in golden_cases(s)} for s in GOLDEN_SPECS}
    head = "| x × y | " + " | ".join(s.replace("-", " ") for s in GOLDEN_SPECS) + " | note |"
    lines = [head, "|" + "---|" * (len(GOLDEN_SPECS) + 2)]
    for i, (a, b, _, note) in enumerate(rows):
        cells = []
        for s in GOLDEN_SPECS:
            got, want = cols[s][i].item(), expected[s].get((a, b))
            cells.append(f"{got:.9g}" + ("" if want is None or want == got else f" ≠ {want:g}"))
        lines.append(f"| {a:g} × {b:g} | {' | '.join(cells)} | {note} |")
    return "\n".join(lines)


def error_table(n: int = 1_000_000, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    exact = x * y
    lines = [f"relative error |P - xy| / |xy| over {n} N(0,1) pairs (seed {seed})", "",
             "| arm | mean | rms | max | bias (mean signed) |", "|---|---|---|---|---|"]
    for label, name in ERROR_ARMS:
        rel = (mul(x, y, spec=LMulSpec.from_name(name)).double() - exact) / exact.abs()
        lines.append(
            f"| {label} | {rel.abs().mean():.4%} | {rel.pow(2).mean().sqrt():.4%} | "
            f"{rel.abs().max():.4%} | {rel.mean():+.4%} |"
        )
    return "\n".join(lines)


MAX_N = 10_000_000  # --n: about 2 GB of memory, a few minutes on one core


def run(args: argparse.Namespace) -> int:
    print("L-Mul golden values (docs/semantics.md §3)\n")
    print(golden_table())
    print()
    print(error_table(args.n, args.seed))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmul.cli import int_arg, seed_arg

    p = sub.add_parser("demo", help="print the golden table and an error summary",
                       description="Prints the contract's golden values (docs/semantics.md §3), each product "
                       "recomputed by lmul.mul, and the relative error |P - xy| / |xy| of L-Mul (2/3/4-bit, bf16) "
                       "and of fp8/bf16 multiplies over --n random N(0,1) operand pairs.")
    p.add_argument("--n", type=int_arg(1, MAX_N), default=1_000_000,
                   help=f"operand pairs for the error summary (1 to {MAX_N:_}; about 200 bytes each)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed")
    p.set_defaults(func=run)
