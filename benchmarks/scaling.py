"""Scaled-operand speed (issue 27): a scaled L-Matmul (``scaling="tensor" | "row" | "block" | "mx"``)
against the unscaled one of the same backend, mode and format:
``python benchmarks/scaling.py [--size 1024] [--threads 1]``.

Target: ratio = scaled time / unscaled time (interleaved in the same run, best of ``--reps``) <= 1.15
at 1024^3 on the ``cpu`` and ``decompose`` backends. The scaled time is the whole call: group amax,
scales, element quantization, the wide operands ``q X`` and the kernel. Prints the rows;
``--out benchmarks/RESULTS.md`` writes the "Scaled operands" section there (other sections kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmul.bench import best_times, machine_line, parse_ratio_script, ratio_script_parser
from lmul.files import replace_section
from lmul.matmul import matmul

KEY = "scaling"
TARGET = 1.15


def run(size: int, configs: list[tuple[str, str]], scalings: list[str], backends: list[str],
        reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    rows = []
    for backend in backends:
        for mode, fmt in configs:
            fns = [lambda s=s, fmt=fmt, mode=mode, be=backend: matmul(a, b, fmt, mode, backend=be, scaling=s)
                   for s in ["none", *scalings]]
            times = best_times(fns, "cpu", reps, 0.0)
            for s, t in zip(scalings, times[1:], strict=True):
                rows.append({"backend": backend, "mode": mode, "fmt": fmt, "scaling": s, "base": times[0],
                             "scaled": t, "ratio": t / times[0]})
                print(f"{backend:9s} {mode:8s} {fmt:5s} {s:6s} unscaled {times[0] * 1e3:7.1f} ms  scaled "
                      f"{t * 1e3:7.1f} ms  ratio {t / times[0]:.2f}x", flush=True)
    return rows


def write(rows: list[dict], path: Path, command: str, size: int, threads: int) -> None:
    lines = [f"Machine: {machine_line('cpu')}. Command: `{command}`.",
             f"`a`, `b`: float32 randn [{size}, {size}] (seed 0), torch threads {threads or 'default'}; ratio = "
             "scaled time / unscaled time (same backend, mode, format), best of interleaved repeats, whole call "
             "(amax, scales, element quantization, wide operands, kernel).", "",
             "| backend | mode | format | scaling | unscaled | scaled | ratio | target | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "met" if r["ratio"] <= TARGET else f"MISSED by {r['ratio'] / TARGET:.2f}x"
        lines.append(f"| {r['backend']} | {r['mode']} | {r['fmt']} | {r['scaling']} | {r['base'] * 1e3:.1f} ms "
                     f"| {r['scaled'] * 1e3:.1f} ms | {r['ratio']:.2f}x | <= {TARGET:g}x | {verdict} |")
    body = "\n".join(lines)
    replace_section(path, KEY, "Scaled operands: `scaling`", body)


def main(argv: list[str] | None = None) -> int:
    p = ratio_script_parser(__doc__, "bit:e4m3,exact:e4m3,bit:fp4")
    p.add_argument("--scalings", default="tensor,row,block,mx")
    p.add_argument("--backends", default="cpu,decompose")
    args, configs = parse_ratio_script(p, argv)
    rows = run(args.size, configs, args.scalings.split(","), args.backends.split(","), args.reps)
    if str(args.out) != "-":
        command = "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write(rows, args.out, command.strip(), args.size, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
