"""The ``lmul`` command line. Each subcommand lives beside the code it drives and provides
``register(subparsers)``; this module only collects them."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Optional

# modules that provide register(subparsers) -> adds one or more subcommands
_COMMAND_MODULES = [
    "lmul.demo",
    "lmul.analysis.commands",
    "lmul.hw.cli",
    "lmul.bench",
    "lmul.eval.cli",
]


def build_parser() -> argparse.ArgumentParser:
    from lmul import __version__

    parser = argparse.ArgumentParser(
        prog="lmul",
        description="L-Mul (arXiv:2410.00907): bit-exact emulation, kernels, model patching, "
        "evaluation, error and cost analysis.",
    )
    parser.add_argument("--version", action="version", version=f"lmul {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
