"""``lmul analyze`` and ``lmul energy``: the command-line side of :mod:`lmul.analysis`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmul.cli import CliError, check_out_dir, float_arg, int_arg

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
    from lmul.analysis.energy import energy_markdown, energy_report, model_shape
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
    text = energy_markdown(rep)
    print(text)
    print(f"\n95%: {rep['claim_95']['steps']}\n80%: {rep['claim_80']['steps']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"energy_{rep['model']['name'].replace('/', '_')}_seq{args.seq}_past{args.past}_{args.scope}"
        for suffix, content in ((".json", json.dumps(rep, indent=1)), (".md", text + "\n")):
            tmp = out / (stem + suffix + ".tmp")
            tmp.write_text(content)
            tmp.replace(out / (stem + suffix))
        plot_energy(rep, out / (stem + ".png"))
        print(f"\nwrote {out / stem}.json/.md/.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from lmul.analysis.energy import DRAM_PJ_PER_BYTE
    from lmul.analysis.report import AnalyzeConfig

    default = {f.name: f.default for f in fields(AnalyzeConfig)}  # one source for the defaults

    p = sub.add_parser("analyze", help="error statistics, Table 7, Figure 3/4 analogs, gate counts, energy claims",
                       description="Exhaustive and real-operand error analysis of L-Mul; writes analysis.md/.json "
                                   "and PNG figures to --out.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=default["seed"], help="random seed (synthetic operands, sampling)")
    p.add_argument("--max-bits", type=int_arg(1, 10), default=default["max_bits"],
                   help="largest mantissa width k enumerated exhaustively (<= 10)")
    p.add_argument("--n-pairs", type=int_arg(100), default=default["n_pairs"],
                   help="operand pairs per real-operand set (>= 100)")
    p.add_argument("--operands", help="a .pt file of captured operand pairs (as written to OUT/operands.pt)")
    p.add_argument("--model", help="capture operands from this Hugging Face model directory or .gguf file")
    p.add_argument("--prompts", help="prompts for --model: .jsonl (field question, e.g. GSM8K), .json or .txt")
    p.add_argument("--max-prompts", type=int_arg(1), default=default["max_prompts"], help="prompts used for capture")
    p.add_argument("--max-tokens", type=int_arg(1), default=default["max_tokens"], help="tokens per prompt for capture")
    p.add_argument("--layers", type=_layers, default=None,
                   help="layers to capture, e.g. 0,15,29 (default first/mid/last)")
    p.set_defaults(func=_run_analyze)

    e = sub.add_parser("energy", help="multiply/add counts and energy of a forward pass per arithmetic arm",
                       description="Counts the multiplications and additions of a Llama-style forward pass from its "
                                   "config and prices them with the paper's Table 1 (Horowitz 2014), next to a DRAM "
                                   "traffic estimate.")
    e.add_argument("--model", default="smollm2", help="'smollm2' (built-in SmolLM2-135M config), a config.json or a "
                                                      "model directory")
    e.add_argument("--seq", type=int_arg(1), default=512, help="tokens in the forward pass")
    e.add_argument("--batch", type=int_arg(1), default=1, help="sequences in the forward pass")
    e.add_argument("--past", type=int_arg(0), default=0,
                   help="tokens already in the KV cache (--seq 1 --past N: one decode step at context N)")
    e.add_argument("--scope", choices=("attention", "all"), default="attention",
                   help="which multiplications L-Mul replaces (SPEC §5)")
    e.add_argument("--dram-pj-per-byte", type=float_arg(0.0), default=DRAM_PJ_PER_BYTE,
                   help="DRAM energy per byte (default: Horowitz 2014, 1.3 nJ per 64-bit access)")
    e.add_argument("--out", help="directory for the .json/.md table and the stacked bar plot")
    e.set_defaults(func=_run_energy)
