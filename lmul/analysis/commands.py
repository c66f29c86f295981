"""``lmul analyze`` and ``lmul energy``: the command-line side of :mod:`lmul.analysis`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmul.cli import CliError, check_out_dir, float_arg, int_arg, seed_arg
from lmul.files import atomic_write

__all__ = ["register"]


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated ints, got {text!r}") from None


def _run_analyze(args: argparse.Namespace) -> int:
    from lmul.analysis.report import AnalyzeConfig, run_analysis

    check_out_dir(args.out)
    try:
        cfg = AnalyzeConfig(out=args.out, seed=args.seed, max_bits=args.max_bits, n_pairs=args.n_pairs,
                            operands=args.operands, model=args.model, prompts=args.prompts,
                            max_prompts=args.max_prompts, max_tokens=args.max_tokens, layers=args.layers)
        run_analysis(cfg)
    except ValueError as err:
        raise CliError(str(err)) from None
    return 0


def _run_energy(args: argparse.Namespace) -> int:
    from lmul.analysis.energy import (
        energy_markdown,
        energy_report,
        model_shape,
        paper_comparison,
        paper_comparison_markdown,
    )
    from lmul.analysis.plots import plot_energy

    if args.out:
        check_out_dir(args.out)
    try:
        shape = model_shape(args.model)
    except (ValueError, OSError, TypeError) as err:  # not a config.json / model folder
        msg = str(err) or type(err).__name__
        raise CliError(msg if msg.startswith("--model") else f"--model {args.model!r}: {msg}; give 'smollm2', "
                       f"a config.json or a model folder holding one") from None
    try:
        rep = energy_report(shape, args.seq, args.scope, args.batch, args.dram_pj_per_byte, args.past)
    except ValueError as err:
        raise CliError(str(err)) from None
    text = energy_markdown(rep) + "\n\n## The paper's gate counts and energy figures beside ours\n\n" + \
        paper_comparison_markdown(paper_comparison(args.seq))
    print(text)
    print(f"\n95%: {rep['claim_95']['steps']}\n80%: {rep['claim_80']['steps']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"energy_{rep['model']['name'].replace('/', '_')}_seq{args.seq}_past{args.past}_{args.scope}"
        for suffix, content in ((".json", json.dumps(rep, indent=1)), (".md", text + "\n")):
            atomic_write(out / (stem + suffix), content)
        plot_energy(rep, out / (stem + ".png"))
        print(f"\nwrote {out / stem}.json/.md/.png")
    return 0


def _run_table7(args: argparse.Namespace) -> int:
    from lmul.analysis.table7 import real_table7, real_table7_markdown

    models = [m for m in args.weights.split(",") if m.strip()]
    try:
        res = real_table7(models)
    except ValueError as err:
        raise SystemExit(f"lmul table7: {err}") from None
    text = real_table7_markdown(res)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, content in (("table7.json", json.dumps(res, indent=1)), ("table7.md", text + "\n")):
            atomic_write(out / name, content)
        print(f"\nwrote {out}/table7.json and table7.md")
    return 0


MAX_PAIRS = 10_000_000  # --n-pairs: a few GB of operands and products
MAX_TOKENS = 1 << 20  # --max-tokens, --seq, --past


def register(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from lmul.analysis.energy import DRAM_PJ_PER_BYTE
    from lmul.analysis.report import AnalyzeConfig

    default = {f.name: f.default for f in fields(AnalyzeConfig)}  # one source for the defaults

    p = sub.add_parser("analyze", help="error statistics, Table 7, Figure 3/4 analogs, gate counts, energy claims",
                       description="Exhaustive and real-operand error analysis of L-Mul; writes analysis.md/.json "
                                   "and PNG figures to --out.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=seed_arg, default=default["seed"], help="random seed (synthetic operands, sampling)")
    p.add_argument("--max-bits", type=int_arg(1, 10), default=default["max_bits"],
                   help="largest mantissa width k enumerated exhaustively (<= 10)")
    p.add_argument("--n-pairs", type=int_arg(100, MAX_PAIRS), default=default["n_pairs"],
                   help=f"operand pairs per real-operand set (100 to {MAX_PAIRS:_})")
    p.add_argument("--operands", help="a .pt file of captured operand pairs (as written to OUT/operands.pt)")
    p.add_argument("--model", help="capture operands from this Hugging Face model directory or .gguf file")
    p.add_argument("--prompts", help="prompts for --model: .jsonl (field question, e.g. GSM8K), .json or .txt")
    p.add_argument("--max-prompts", type=int_arg(1, 100_000), default=default["max_prompts"],
                   help="prompts used for capture")
    p.add_argument("--max-tokens", type=int_arg(1, MAX_TOKENS), default=default["max_tokens"],
                   help="tokens per prompt for capture")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layers to capture, e.g. 0,15,29 (default first/mid/last)")
    p.set_defaults(func=_run_analyze)

    t = sub.add_parser("table7", help="Table 7 (Eq. 4-5) from the mantissa distribution of model weights",
                       description="The paper's Table 7 rows beside ours: Eq. 4-5 for bf16 operands (n = 7) whose "
                                   "mantissa fields follow the even, the log-uniform, or a model's weight "
                                   "distribution.")
    t.add_argument("--weights", default="smollm2",
                   help="comma-separated models: smollm2, gemma3-270m or model folders (default smollm2)")
    t.add_argument("--out", help="directory for table7.json / table7.md")
    t.set_defaults(func=_run_table7)

    e = sub.add_parser("energy", help="multiply/add counts and energy of a forward pass per arithmetic arm",
                       description="Counts the multiplications and additions of a Llama-style forward pass from its "
                                   "config and prices them with the paper's Table 1 (Horowitz 2014), next to a DRAM "
                                   "traffic estimate.")
    e.add_argument("--model", default="smollm2", help="'smollm2' (built-in SmolLM2-135M config), a config.json or a "
                                                      "model directory")
    e.add_argument("--seq", type=int_arg(1, MAX_TOKENS), default=512, help="tokens in the forward pass")
    e.add_argument("--batch", type=int_arg(1, 1_000_000), default=1, help="sequences in the forward pass")
    e.add_argument("--past", type=int_arg(0, MAX_TOKENS), default=0,
                   help="tokens already in the KV cache (--seq 1 --past N: one decode step at context N)")
    e.add_argument("--scope", choices=("attention", "all"), default="attention",
                   help="which multiplications L-Mul replaces (SPEC §5)")
    e.add_argument("--dram-pj-per-byte", type=float_arg(0.0, "a number from 0 to 1e6", hi=1e6),
                   default=DRAM_PJ_PER_BYTE,
                   help="DRAM energy per byte (default: Horowitz 2014, 1.3 nJ per 64-bit access)")
    e.add_argument("--out", help="directory for the .json/.md table and the stacked bar plot")
    e.set_defaults(func=_run_energy)
