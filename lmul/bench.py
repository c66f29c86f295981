"""``lmul bench``: time L-Matmul backends against the native matmul in the same run.

Each case times ``lmul.matmul`` (quantize + prepare + multiply + fix-up: the whole call) and
``torch.matmul`` on float32 operands of the same shape, interleaved, and reports the ratio of the
best times (our time / native time), TFLOP/s-equivalent (2 M N K / time) and the peak extra
resident memory of the call (CPU: peak RSS above the level before it, via /proc; CUDA: peak
allocated). The naive broadcast emulation, ``mul(a[..., :, :, None], b[..., None, :, :]).sum(-2)``,
is timed on one small size for the ">= 100x faster" row.

The table goes to stdout; ``--out FILE`` also writes it into a marked section of FILE (replaced
atomically; other sections are kept): ``--out benchmarks/RESULTS.md`` updates the committed
results, which a run without ``--out`` never touches. The recorded command holds the options
given on the command line (not the defaults). A row is *untrusted* (no met/missed verdict) when
fewer than 3 repeats were timed, the baseline's best time is under 20 µs (timer and call overhead
dominate), or a timing's median repeat is more than 1.5x its best (the machine was busy).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmul import kernels
from lmul.elementwise import mul
from lmul.files import replace_section
from lmul.matmul import matmul
from lmul.spec import LMulSpec

__all__ = ["Case", "TARGETS", "run", "register"]

# spec names (lmul.spec) of the target table: CPU ratio targets vs torch fp32 matmul
TARGETS = {
    "bf16-formula": 2.5, "e4m3-formula": 2.5,
    "e4m3-bit": 12.0, "e8m3-bit": 12.0,
    "bf16-bit": 6.0, "fp16-bit": 6.0, "fp32-bit": 6.0,
    "bf16-exact": None,
}
NAIVE_TARGET = 100.0


@dataclass(frozen=True)
class Case:
    """One timed shape: ``a`` [batch, m, k] @ ``b`` [batch, k, n] (batch 0: plain 2-D)."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    targeted: bool = True  # the ratio targets (TARGETS) were set for this kind of shape

    def operands(self, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        lead = (self.batch,) if self.batch else ()
        a = torch.randn(*lead, self.m, self.k, generator=gen)
        b = torch.randn(*lead, self.k, self.n, generator=gen)
        return a.to(device), b.to(device)

    @property
    def flops(self) -> int:
        return 2 * max(1, self.batch) * self.m * self.k * self.n


KINDS = ("square", "attn", "decode")


def cases(sizes: Sequence[int], seqs: Sequence[int], head_dims: Sequence[int], heads: int,
          decode_lens: Sequence[int] = (), kinds: Sequence[str] = KINDS) -> list[Case]:
    """The timed shapes: square ``s^3``; attention ``Q K^T`` ([s, d] @ [d, s]) and ``P V``
    ([s, s] @ [s, d]) over ``heads`` batches; decoding steps, one query row against ``t`` cached
    keys (``[1, d] @ [d, t]`` and ``[1, t] @ [t, d]``), where preparing the cache is the whole cost
    (no ratio target: the issue's targets were set for the first two kinds)."""
    out = [Case(f"square {s}", 0, s, s, s) for s in sizes] if "square" in kinds else []
    for d in head_dims:
        if "attn" in kinds:
            for s in seqs:
                out.append(Case(f"attn QK^T bh={heads} s={s} d={d}", heads, s, d, s))
                out.append(Case(f"attn PV bh={heads} s={s} d={d}", heads, s, s, d))
        if "decode" in kinds:
            for t in decode_lens:
                out.append(Case(f"decode QK^T bh={heads} t={t} d={d}", heads, 1, d, t, targeted=False))
                out.append(Case(f"decode PV bh={heads} t={t} d={d}", heads, 1, t, d, targeted=False))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak memory of ``fn()`` above the level before it, in MiB (None where not measurable)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from lmul.kernels.cpu_ext import release_workspace

    release_workspace()  # count the scratch buffers as this call's extra memory
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    result = fn()
    peak = _rss_kib("VmHWM")
    del result
    return None if before is None or peak is None else max(0, peak - before) / 1024


MIN_REPS = 3  # fewer timed repeats: one scheduler hiccup decides the result
MIN_BASELINE_S = 20e-6  # a faster baseline is mostly timer and Python call overhead
MAX_SPREAD = 1.5  # median / best of one function's repeats; more: the machine was busy


@dataclass(frozen=True)
class Timing:
    """The repeats of one timed function: best and median seconds, and how many were timed."""

    best: float
    median: float
    reps: int

    @property
    def spread(self) -> float:
        return self.median / self.best if self.best > 0 else float("inf")


def timings(fns: list[Callable[[], object]], device: str, reps: int, min_time: float) -> list[Timing]:
    """Time each function ``reps`` times (more, up to 4x, until ``min_time`` seconds have passed),
    interleaved so load changes hit all alike, after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    r = 0
    while r < reps or (time.perf_counter() - start < min_time and r < 4 * reps):
        for i, fn in enumerate(fns):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t)
        r += 1
    return [Timing(min(ts), float(sorted(ts)[len(ts) // 2]), len(ts)) for ts in times]


def best_times(fns: list[Callable[[], object]], device: str, reps: int, min_time: float) -> list[float]:
    """Best-of-``reps`` seconds for each function (:func:`timings`)."""
    return [t.best for t in timings(fns, device, reps, min_time)]


def untrusted(times: Sequence[Timing], baseline: Timing) -> str:
    """Why a measurement is too short or too noisy for a verdict ('' when it is fine)."""
    reps = min(t.reps for t in times)
    if reps < MIN_REPS:
        return f"{reps} repeat{'s' * (reps != 1)} (< {MIN_REPS})"
    if baseline.best < MIN_BASELINE_S:
        return f"baseline {baseline.best * 1e6:.0f} µs (< {MIN_BASELINE_S * 1e6:.0f} µs)"
    worst = max(times, key=lambda t: t.spread)
    if worst.spread > MAX_SPREAD:
        return f"median/best {worst.spread:.1f} (> {MAX_SPREAD})"
    return ""


def run(configs: list[LMulSpec], backends: list[str], case_list: list[Case], device: str = "cpu",
        reps: int = 3, min_time: float = 0.0, naive_size: int = 128,
        progress: Callable[[str], None] = print) -> list[dict]:
    """Time every spec x backend x case; return result rows (dicts)."""
    rows = []
    for case in case_list:
        a, b = case.operands(device)
        for spec in configs:
            mode, fmt = spec.mode, spec.fmt.name
            for backend in backends:
                try:
                    entry = kernels.select("matmul", a, spec.replace(backend=backend))
                except (RuntimeError, ValueError) as err:
                    progress(f"skip {case.name} {spec.name} {backend}: {err}")
                    continue
                name = entry.name
                run_spec = spec.replace(backend=name)
                ours = lambda a=a, b=b, run_spec=run_spec: matmul(a, b, spec=run_spec)
                native = lambda a=a, b=b: torch.matmul(a, b)
                tim_ours, tim_nat = timings([ours, native], device, reps, min_time)
                t_ours, t_nat = tim_ours.best, tim_nat.best
                mem = peak_extra_mib(ours, device)
                target = TARGETS.get(spec.name) if device == "cpu" and case.targeted else None
                row = {"case": case.name, "mode": mode, "format": fmt, "backend": backend if backend != "auto"
                       else f"auto->{name}", "time_ms": t_ours * 1e3, "native_ms": t_nat * 1e3,
                       "ratio": t_ours / t_nat, "tflops": case.flops / t_ours / 1e12, "mem_mib": mem,
                       "operands_mib": (a.numel() + b.numel() + case.flops // (2 * case.k)) * 4 / 2**20,
                       "target": target, "untrusted": untrusted([tim_ours, tim_nat], tim_nat)}
                rows.append(row)
                progress(_format_row(row))
    if naive_size:
        rows.extend(_naive_rows(configs, naive_size, device, progress))
    return rows


def _naive_rows(configs, size: int, device: str, progress) -> list[dict]:
    """The naive broadcast emulation vs the auto backend at ``size``^3."""
    a, b = Case("", 0, size, size, size).operands(device)
    rows = []
    for spec in configs:
        mode, fmt = spec.mode, spec.fmt.name
        naive = lambda spec=spec: mul(a[:, :, None], b[None, :, :], spec=spec).sum(-2)
        ours = lambda spec=spec: matmul(a, b, spec=spec)
        tim_naive = timings([naive], device, MIN_REPS, 0.0)[0]
        tim_ours = timings([ours], device, 10, 1.0)[0]
        t_naive, t_ours = tim_naive.best, tim_ours.best
        row = {"case": f"naive broadcast {size}^3", "mode": mode, "format": fmt,
               "backend": f"auto->{kernels.select('matmul', a, spec).name}", "time_ms": t_ours * 1e3,
               "native_ms": t_naive * 1e3, "ratio": t_naive / t_ours, "tflops": 2 * size**3 / t_ours / 1e12,
               "mem_mib": None, "operands_mib": None, "naive": True,
               "target": NAIVE_TARGET if mode != "exact" else None,  # the target is for L-Mul modes
               "untrusted": untrusted([tim_naive, tim_ours], tim_ours)}
        rows.append(row)
        progress(_format_row(row))
    return rows


def _verdict(row: dict) -> str:
    t = row["target"]
    if t is None:
        return ""
    if row.get("untrusted"):
        return f"no verdict: {row['untrusted']}"
    if row.get("naive"):
        return "met" if row["ratio"] >= t else f"MISSED ({t / row['ratio']:.1f}x short)"
    return "met" if row["ratio"] <= t else f"MISSED by {row['ratio'] / t:.2f}x"


def _format_row(row: dict) -> str:
    mem = "-" if row["mem_mib"] is None else f"{row['mem_mib']:.0f}"
    if row.get("naive"):
        ratio = f"{row['ratio']:.0f}x faster"
        base = f"naive {row['native_ms']:.1f} ms"
    else:
        ratio = f"{row['ratio']:.2f}x"
        base = f"native {row['native_ms']:.1f} ms"
    tgt = "" if row["target"] is None else (f">= {row['target']:.0f}x" if row.get("naive") else f"<= {row['target']}x")
    return (f"| {row['case']} | {row['mode']} | {row['format']} | {row['backend']} | {row['time_ms']:.1f} ms "
            f"| {base} | {ratio} | {row['tflops']:.3f} | {mem} | {tgt} | {_verdict(row)} |")


HEADER = ("| case | mode | format | backend | time | baseline | ratio | TFLOP/s-eq | peak extra MiB | target (CPU) "
          "| verdict |\n|---|---|---|---|---|---|---|---|---|---|---|")


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name()
    else:
        dev = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{dev}, {torch.get_num_threads()} threads, torch {torch.__version__}{load}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def write_results(rows: list[dict], path: Path, command: str, device: str, key: str = "main") -> None:
    """Replace the section marked ``key`` of ``path`` (created if absent) atomically."""
    body = "\n".join([
        f"Machine: {machine_line(device)}. Command: `{command}`.",
        "Ratio = lmul.matmul time (whole call: quantize, prepare, multiply, fix-up) / torch.matmul fp32 time, "
        "best of interleaved repeats in the same run; naive rows: naive time / lmul time.",
        "",
        HEADER,
        *[_format_row(r) for r in rows],
    ])
    replace_section(path, key, f"L-Matmul kernels: `{key}`", body)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _int_list(flag: str, lo: int = 1, hi: int = 16384) -> Callable[[str], str]:
    """argparse type: comma-separated integers in [lo, hi] (the text is kept, ``_ints`` reads it)."""
    def parse(text: str) -> str:
        try:
            vals = _ints(text)
        except ValueError:
            vals = []
        if not vals or min(vals) < lo or max(vals) > hi:
            raise argparse.ArgumentTypeError(f"takes comma-separated integers from {lo} to {hi}, e.g. 512,1024; "
                                             f"got {text!r}")
        return text
    return parse


def _kinds_arg(text: str) -> str:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(f"takes case kinds from {', '.join(KINDS)}, comma separated; got {text!r}")
    return ",".join(kinds)


def _configs_arg(text: str) -> str:
    """argparse type: comma-separated names :meth:`lmul.spec.LMulSpec.from_name` takes."""
    names = [c for c in text.split(",") if c]
    if not names:
        raise argparse.ArgumentTypeError(f"takes spec or preset names, e.g. bf16-bit,e4m3-formula; got {text!r}")
    for c in names:
        try:
            LMulSpec.from_name(c)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{c!r}: {e}") from None
    return text


def _backends_arg(text: str) -> str:
    """argparse type: 'auto' and/or matmul backend names of :data:`lmul.kernels.BACKENDS`
    (whether one can run a case is checked per case, which is skipped with the reason)."""
    names = [b for b in text.split(",") if b]
    valid = ["auto", *dict.fromkeys(b.name for b in kernels.BACKENDS if b.op == "matmul")]
    bad = [b for b in names if b not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad or [text]}; valid: {', '.join(valid)}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lmul.cli import MAX_THREADS, device_arg, float_arg, int_arg

    p.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", type=_int_list("--sizes"), default="512,1024,2048",
                   help="square sizes, at most 16384 (CPU default caps at 2048)")
    p.add_argument("--seqs", type=_int_list("--seqs"), default="512,1024", help="attention sequence lengths (<= 16384)")
    p.add_argument("--head-dims", type=_int_list("--head-dims", hi=1024), default="64,128",
                   help="attention head dims (<= 1024)")
    p.add_argument("--heads", type=int_arg(1, 256), default=8,
                   help="batch*heads of the attention and decode cases (<= 256)")
    p.add_argument("--decode-lens", type=_int_list("--decode-lens", hi=1 << 20), default="1024",
                   help="cached sequence lengths of the decode cases (one query row; <= 1048576)")
    p.add_argument("--kinds", type=_kinds_arg, default=",".join(KINDS),
                   help=f"case kinds to time, comma separated: {', '.join(KINDS)}")
    p.add_argument("--configs", type=_configs_arg, default=",".join(TARGETS),
                   help="spec or preset names (lmul.LMulSpec.from_name: bf16-bit, e4m3-formula, lmul-k3, ...), "
                        "comma separated")
    p.add_argument("--backends", type=_backends_arg, default="auto",
                   help="'auto' and/or matmul backend names (reference, cpu, decompose, triton), comma separated")
    p.add_argument("--reps", type=int_arg(1, 1000), default=3, help="interleaved repeats (best time kept)")
    p.add_argument("--min-time", type=float_arg(0.0, "a number from 0 to 3600", hi=3600), default=1.0,
                   help="keep repeating (up to 4x reps) until this many seconds per case have passed")
    p.add_argument("--naive-size", type=int_arg(0, 2048), default=128, help="size of the naive emulation row (0: skip)")
    p.add_argument("--out", default="", help="also write the table into the --section of this Markdown file "
                   "(benchmarks/RESULTS.md: the committed results); default: stdout only")
    p.add_argument("--threads", type=int_arg(0, MAX_THREADS), default=0, help="torch/OpenMP threads (0: torch default)")
    p.add_argument("--section", default="cpu", help="key of the RESULTS.md section this run replaces")


def _check_out(text: str) -> None:
    """Refuse an --out that cannot be written, before the (minutes of) timing."""
    from lmul.cli import CliError

    out = Path(text)
    if out.is_dir():
        raise CliError(f"--out {text} is a folder; give a Markdown file (or '' to skip writing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"--out {text}: {parent} is a file, so no file can be made under it")
            if not os.access(parent, os.W_OK):
                raise CliError(f"--out {text}: {parent} is not writable")
            break


def main(args: argparse.Namespace) -> int:
    if args.out:
        _check_out(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [LMulSpec.from_name(c) for c in args.configs.split(",") if c]
    case_list = cases(_ints(args.sizes), _ints(args.seqs), _ints(args.head_dims), args.heads,
                      _ints(args.decode_lens), tuple(args.kinds.split(",")))
    print(f"# {machine_line(args.device)}\n{HEADER}")
    rows = run(configs, [b for b in args.backends.split(",") if b], case_list, args.device, args.reps,
               args.min_time, naive_size=args.naive_size)
    shaky = [r for r in rows if r.get("untrusted") and r["target"] is not None]
    if shaky:
        print(f"note: {len(shaky)} of {len(rows)} rows have no verdict (too few repeats, a baseline under "
              f"{MIN_BASELINE_S * 1e6:.0f} µs or noisy repeats); rerun with more --reps / --min-time on a quiet "
              "machine")
    if args.out:
        write_results(rows, Path(args.out), command(args), args.device, args.section)
        print(f"wrote {args.out}")
    return 0


def ratio_script_parser(doc: str, configs: str) -> argparse.ArgumentParser:
    """The parser of a ratio benchmark script (``benchmarks/acc.py``, ``benchmarks/scaling.py``) with
    the options they share: ``--size`` (M = K = N), ``--configs`` (``mode:format`` pairs, default
    ``configs``), ``--threads``, ``--reps`` and ``--out``; each script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="M = K = N")
    p.add_argument("--configs", default=configs, help="mode:format,...")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("-"), help="also write the section into this file "
                   "(benchmarks/RESULTS.md: the committed results); default '-': print only")
    return p


def parse_ratio_script(p: argparse.ArgumentParser, argv: Optional[list[str]]
                       ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """``(args, [(mode, format), ...])`` of a :func:`ratio_script_parser` parser; sets the torch
    thread count (``--threads``, 0 leaves it)."""
    import torch

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    if any(len(c) != 2 for c in configs):
        p.error(f"--configs takes mode:format pairs, got {args.configs!r}")
    return args, configs


def command(args: argparse.Namespace, prog: str = "lmul bench") -> str:
    """``prog`` and the options of ``args`` that differ from the parser's defaults, in the parser's
    order and as given (list options keep their text); --out, --section and --debug are left out."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = []
    for act in parser._actions:
        if not act.option_strings or act.dest in ("help", "out", "section") or not hasattr(args, act.dest):
            continue
        v = getattr(args, act.dest)
        if v != act.default:
            opts.append(f"{act.option_strings[0]} {v}")
    return " ".join([prog, *opts])


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time L-Matmul backends against torch.matmul",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main)
