"""Peak extra memory of ``lmul.matmul`` / ``lmul.mul`` against torch on the shapes of issue #17.

Each (case, implementation) runs in a fresh interpreter: the inputs are built, the peak resident
set (VmHWM) is reset to the current RSS, the operation runs once, and the peak above the level
before it is reported (MiB), together with the wall time of that one call and the size of the
inputs and of the output. lmul's bound (``docs/kernels.md``): a constant (backend workspace for
pieces of ``lmul.matmul.MATMUL_CHUNK`` elements) plus at most one copy of the inputs and of the
output. Prints the table; ``--out benchmarks/RESULTS.md`` writes it into that file's ``memory`` section.

    python benchmarks/memory.py --cases matvec                  # print only
    python benchmarks/memory.py --out benchmarks/RESULTS.md     # every case, into the committed results
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CASES = {  # name: (description, operands builder source, lmul call, torch call)
    "matvec": ("matrix-vector (3, 2^24) @ (2^24,)", "a, b = torch.randn(3, 2**24), torch.randn(2**24)",
               "lmul.matmul(a, b)", "torch.matmul(a, b)"),
    "broadcast": ("broadcast batch (512, 4096) @ (3072, 4096, 1)",
                  "a, b = torch.randn(512, 4096), torch.randn(3072, 4096, 1)",
                  "lmul.matmul(a, b)", "torch.matmul(a, b)"),
    "attention": ("attention Q·Kᵀ (64, 2048, 64) @ (64, 64, 2048)",
                  "a, b = torch.randn(64, 2048, 64), torch.randn(64, 64, 2048)",
                  "lmul.matmul(a, b)", "torch.matmul(a, b)"),
    "square": ("square (2048, 2048) @ (2048, 2048)", "a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)",
               "lmul.matmul(a, b)", "torch.matmul(a, b)"),
    "mul-broadcast": ("mul broadcast (2^14, 1) * (1, 2^14): 1 GiB result",
                      "a, b = torch.randn(2**14, 1), torch.randn(1, 2**14)", "lmul.mul(a, b)", "a * b"),
    "reference": ("reference backend (256, 256) @ (256, 256), bit mode",
                  "a, b = torch.randn(256, 256), torch.randn(256, 256)",
                  "lmul.matmul(a, b, backend='reference')", "torch.matmul(a, b)"),
}

_CHILD = """
import json, time, torch, lmul
from pathlib import Path
from lmul.kernels.cpu_ext import load, release_workspace
torch.set_num_threads({threads})
torch.manual_seed(0)
{build}
{call}  # warm-up: compile the kernels, fault in the allocator, then free the workspace
release_workspace()
def rss(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
Path("/proc/self/clear_refs").write_text("5")
before = rss("VmRSS")
t = time.perf_counter()
out = {call}
seconds = time.perf_counter() - t
peak = rss("VmHWM")
print(json.dumps(dict(extra_mib=(peak - before) / 1024, seconds=seconds, out_mib=out.numel() * 4 / 2**20,
                      in_mib=(a.numel() + b.numel()) * 4 / 2**20)))
"""


def measure(case: str, impl: str, threads: int) -> dict:
    _, build, ours, theirs = CASES[case]
    code = _CHILD.format(threads=threads, build=build, call=ours if impl == "lmul" else theirs)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="also write the section into this file (benchmarks/RESULTS.md: the "
                   "committed results); default: print only")
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = []
    for name in names:
        res = {impl: measure(name, impl, args.threads) for impl in ("lmul", "torch")}
        rows.append((name, res))
        print(name, json.dumps(res))
    lines = ["| case | inputs MiB | output MiB | lmul extra peak MiB | torch extra peak MiB | lmul s | torch s |",
             "|---|---|---|---|---|---|---|"]
    for name, res in rows:
        mine, ref = res["lmul"], res["torch"]
        if "error" in mine or "error" in ref:
            lines.append(f"| {CASES[name][0]} | | | {mine.get('error', '')} | {ref.get('error', '')} | | |")
            continue
        lines.append(f"| {CASES[name][0]} | {mine['in_mib']:.0f} | {mine['out_mib']:.1f} | {mine['extra_mib']:.0f} | "
                     f"{ref['extra_mib']:.0f} | {mine['seconds']:.2f} | {ref['seconds']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        from lmul.bench import machine_line
        from lmul.files import replace_section

        head = (f"Machine: {machine_line('cpu')}, Python {platform.python_version()}. Command: "
                f"`python benchmarks/memory.py --threads {args.threads}`. Extra peak = VmHWM during the one call "
                "minus VmRSS before it (output included), fresh process per row, after a warm-up call.")
        replace_section(Path(args.out), "memory", "Memory: peak extra RSS against torch", head + "\n\n" + table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
