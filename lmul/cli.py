"""The ``lmul`` command line. Each subcommand lives beside the code it drives and provides
``register(subparsers)``; this module only collects them, and holds what they share: argument
types that reject bad values with one line naming the flag and the valid values, and
:func:`main`, which turns every user error into that one line and exit status 2 (``--debug``
shows the traceback instead)."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Optional

# modules that provide register(subparsers) -> adds one or more subcommands
_COMMAND_MODULES = [
    "lmul.demo",
    "lmul.analysis.commands",
    "lmul.hw.cli",
    "lmul.bench",
    "lmul.eval.cli",
    "lmul.finetune.cli",
]
USAGE_ERROR = 2  # argparse's status for a bad invocation; main uses it for every user error


class CliError(Exception):
    """A bad invocation found after parsing (a bad value, an unusable path); printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``lmul eval: error: argument --limit: ...`` (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def int_arg(lo: Optional[int] = None, hi: Optional[int] = None, also: Sequence[str] = (),
            what: Optional[str] = None) -> Callable[[str], object]:
    """An argparse type: an integer in [lo, hi] (either end open when None), or one of the words
    in ``also`` (returned as is); the error names the valid values."""
    if what is None:
        if lo is not None and hi is not None:
            what = f"an integer from {lo} to {hi}"
        elif lo == 1:
            what = "a positive integer"
        elif lo == 0:
            what = "an integer >= 0"
        elif lo is not None:
            what = f"an integer >= {lo}"
        else:
            what = "an integer"
        if also:
            what += " or " + " or ".join(repr(w) for w in also)

    def parse(text: str) -> object:
        if text in also:
            return text
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = "int"
    return parse


def float_arg(lo: float = 0.0, what: str = "a number >= 0", hi: Optional[float] = None,
              above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float with ``lo <= v`` (``lo < v`` when ``above``) and ``v <= hi``
    (when given); inf and nan are refused."""
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (above and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v

    parse.__name__ = "float"
    return parse


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds share this range
MAX_THREADS = 1024  # --threads of every subcommand
seed_arg = int_arg(0, SEED_MAX)  # the --seed of every subcommand


def device_arg(text: str) -> str:
    """An argparse type: a torch device that can run here (cpu; cuda/cuda:N only with CUDA)."""
    from lmul.eval.models import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--device {text!r}: ").removeprefix("--device ")) \
            from None
    return text


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or lies under one (CliError)."""
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {out} is a file; give a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"{flag} {out}: {parent} is a file, so no folder can be made under it")
            break


def build_parser() -> argparse.ArgumentParser:
    from lmul import __version__

    parser = Parser(
        prog="lmul",
        description="L-Mul (arXiv:2410.00907): bit-exact emulation, kernels, model patching, "
        "evaluation, error and cost analysis.",
    )
    parser.add_argument("--version", action="version", version=f"lmul {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():  # `lmul eval --debug ...` works as well as `lmul --debug eval ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "bad input" (exit 2, one line); anything else is a bug (exit 1)."""
    errors: list[type[BaseException]] = [CliError, ValueError, OSError]
    for mod, names in (("lmul.eval.assets", ("AssetError",)), ("lmul.eval.store", ("RunBusy",))):
        m = sys.modules.get(mod)
        errors += [getattr(m, n) for n in names if m is not None and hasattr(m, n)]
    return tuple(errors)


def _terminate(signum: int, frame) -> NoReturn:
    """SIGTERM / SIGHUP -> SystemExit, so ``finally`` blocks (temporary folders, locks) run."""
    raise SystemExit(128 + signum)


INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's status for a process ended by Ctrl-C


def _interrupt_again(signum: int, frame) -> NoReturn:
    """A second Ctrl-C while the first one's cleanup runs (or while Python shuts down): exit 130 now.
    Without this the second KeyboardInterrupt escapes ``main`` and Python dies of SIGINT (status -2).
    What cleanup is skipped is safe to skip: the kernel drops the run lock, and scratch folders of
    dead processes are swept by the next run (:func:`lmul.eval.store.sweep_scratch`)."""
    os.write(2, b"lmul: interrupted again; exiting now\n")
    os._exit(INTERRUPTED)


def _interrupt(signum: int, frame) -> NoReturn:
    """The first Ctrl-C: KeyboardInterrupt as usual, so ``finally`` blocks clean up; later ones exit 130."""
    signal.signal(signal.SIGINT, _interrupt_again)
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    # offline from the first line: huggingface_hub reads these when first imported (users may set them to 0)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    if argv is None:
        import threading

        if threading.current_thread() is threading.main_thread():  # the real command line, not a test
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    signal.signal(sig, _terminate)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    prog = f"lmul {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if signal.getsignal(signal.SIGINT) is _interrupt:  # raised by code, not by Ctrl-C: later Ctrl-Cs exit 130
            signal.signal(signal.SIGINT, _interrupt_again)
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if args.debug:
            raise
        msg = one_line(e) or type(e).__name__
        if isinstance(e, _user_errors()):
            if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
                    and e.filename and str(e.filename) not in msg:
                msg += f": {e.filename}"
            print(f"{prog}: error: {msg}", file=sys.stderr)
            return USAGE_ERROR
        print(f"{prog}: internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
