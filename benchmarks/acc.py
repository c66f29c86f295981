"""Reduced-precision accumulation speed: ``acc="e4m3"`` L-Matmul against the same backend's
``acc="fp32"`` time (issue 13): ``python benchmarks/acc.py [--size 1024] [--threads 1]``.

Targets (ratio = acc time / fp32 time of the same backend, mode and format, interleaved in the
same run, best of ``--reps``): <= 2x for ``acc_block`` >= 16, <= 4x for ``acc_block`` = 1. Prints the
rows; ``--out benchmarks/RESULTS.md`` writes the "Reduced-precision accumulation" section there (other
sections kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmul.bench import best_times, machine_line, parse_ratio_script, ratio_script_parser
from lmul.files import replace_section
from lmul.matmul import matmul

KEY = "acc"


def target(block: int) -> float:
    return 4.0 if block == 1 else 2.0 if block >= 16 else float("nan")


def run(size: int, configs: list[tuple[str, str]], blocks: list[int], backend: str, acc: str,
        reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    rows = []
    for mode, fmt in configs:
        fns = [lambda fmt=fmt, mode=mode: matmul(a, b, fmt, mode, backend=backend)]
        fns += [lambda k=k, fmt=fmt, mode=mode: matmul(a, b, fmt, mode, acc=acc, acc_block=k, backend=backend)
                for k in blocks]
        times = best_times(fns, "cpu", reps, 0.0)
        for k, t in zip(blocks, times[1:], strict=True):
            rows.append({"mode": mode, "fmt": fmt, "block": k, "fp32": times[0], "acc": t, "ratio": t / times[0]})
            print(f"{mode:8s} {fmt:5s} acc_block={k:<4d} fp32 {times[0] * 1e3:7.1f} ms  acc={acc} "
                  f"{t * 1e3:7.1f} ms  ratio {t / times[0]:.2f}x", flush=True)
    return rows


def write(rows: list[dict], path: Path, command: str, size: int, backend: str, acc: str) -> None:
    lines = [f"Machine: {machine_line('cpu')}. Command: `{command}`.",
             f"`a`, `b`: float32 randn [{size}, {size}] (seed 0), backend `{backend}`; ratio = "
             f"`acc=\"{acc}\"` time / `acc=\"fp32\"` time (same backend, mode, format), best of interleaved "
             "repeats, whole call (quantize, prepare, multiply, fix-up).", "",
             "| mode | format | acc_block | fp32 time | acc time | ratio | target | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = target(r["block"])
        verdict = "" if t != t else ("met" if r["ratio"] <= t else f"MISSED by {r['ratio'] / t:.2f}x")
        lines.append(f"| {r['mode']} | {r['fmt']} | {r['block']} | {r['fp32'] * 1e3:.1f} ms | {r['acc'] * 1e3:.1f} ms "
                     f"| {r['ratio']:.2f}x | {'' if t != t else f'<= {t:g}x'} | {verdict} |")
    body = "\n".join(lines)
    replace_section(path, KEY, "Reduced-precision accumulation: `acc`", body)


def main(argv: list[str] | None = None) -> int:
    p = ratio_script_parser(__doc__, "bit:bf16,bit:e4m3,formula:e4m3,exact:e4m3")
    p.add_argument("--blocks", default="1,16,128", help="acc_block values")
    p.add_argument("--acc", default="e4m3")
    p.add_argument("--backend", default="cpu")
    args, configs = parse_ratio_script(p, argv)
    blocks = [int(x) for x in args.blocks.split(",")]
    rows = run(args.size, configs, blocks, args.backend, args.acc, args.reps)
    if str(args.out) != "-":
        command = "python benchmarks/acc.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write(rows, args.out, command.strip(), args.size, args.backend, args.acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
