"""``results.json`` from the run's parts, and ``report.md`` + PNG plots from ``results.json``.

Tables follow the layout of the paper's Tables 2 (common-sense tasks, one row per arithmetic),
3 (MMLU / GSM8K) and 5 (L-Mul operand mantissa bits k against fp8), with our accuracy ± standard
error, paired differences against the exact arm ("difference ± half-width of the 95% paired
bootstrap CI", McNemar's exact p), and the divergence metrics the paper does not report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmul.eval import stats, store
from lmul.eval.tasks import TASKS

# The paper's published numbers (arXiv:2410.00907 v2, Tables 2, 3, 5) as {(table, model, arm, task): acc}.
# Only numbers checked against the paper belong here; this session could not open the paper's tables,
# so it is empty and the report says "n/a" rather than quoting numbers from memory.
PAPER: dict[tuple[str, str, str, str], float] = {}
PAPER_NOTE = ("Paper rows: the published numbers of arXiv:2410.00907 (Tables 2, 3, 5; billion-parameter models, "
              "not this one) could not be checked against the paper when this tool was written, so they are "
              "shown as n/a rather than quoted from memory; verified numbers go in `lmul.eval.report.PAPER`. "
              "The table layouts (which tasks and arms go in which table) follow the project's issue text.")

TABLE2_TASKS = ("arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa")
TABLE3_TASKS = ("mmlu", "gsm8k")
TABLE5_ARMS = ("e5m2", "e4m3", "lmul-k2", "lmul-k3", "lmul-k4", "lmul")
BOOT_ITERS = 10_000


def _col(task: str) -> str:
    return TASKS[task].paper or task if task in TASKS else task


def assemble(run_dir: Path) -> dict:
    """Gather config + parts into ``results.json`` (written atomically) and return it."""
    run_dir = Path(run_dir)
    meta = store.read_json(run_dir / "config.json")
    seed = meta["config"]["seed"]
    acc_parts = store.load_parts(run_dir, "acc")
    div_parts = store.load_parts(run_dir, "div")
    tasks: dict = {}
    for (arm, task), part in acc_parts.items():
        scores = [it["acc"] for it in part["items"]]
        m, se = stats.mean_se(scores)
        entry = {"n": len(scores), "acc": m, "se": se, "seconds": part["seconds"],
                 "items": [{k: v for k, v in it.items() if k not in ("context", "gold")} for it in part["items"]]}
        norm = [it["acc_norm"] for it in part["items"] if "acc_norm" in it]
        if norm and len(norm) == len(scores):
            entry["acc_norm"], entry["acc_norm_se"] = stats.mean_se(norm)
        tasks.setdefault(task, {})[arm] = entry
    paired: dict = {}
    for task, arms in tasks.items():
        if "exact" not in arms:
            continue
        base = {it["doc_id"]: it["acc"] for it in arms["exact"]["items"]}
        for arm, entry in arms.items():
            if arm == "exact":
                continue
            ids = [it["doc_id"] for it in entry["items"] if it["doc_id"] in base]
            mine = {it["doc_id"]: it["acc"] for it in entry["items"]}
            p = stats.paired([base[i] for i in ids], [mine[i] for i in ids], BOOT_ITERS, seed)
            paired.setdefault(task, {})[arm] = {"diff": p.diff, "lo": p.lo, "hi": p.hi, "n": p.n,
                                                "b": p.b, "c": p.c, "p_mcnemar": p.p_mcnemar}
    div: dict = {}
    for (arm, task), part in div_parts.items():
        items = part["items"]
        if not items:
            continue
        n_bytes = sum(it["n_bytes"] for it in items)
        ll = sum(it["ll"] for it in items)
        kl_m, kl_se = stats.mean_se([it["kl"] for it in items])
        t1_m, t1_se = stats.mean_se([it["top1"] for it in items])
        div.setdefault(task, {})[arm] = {
            "n": len(items), "kl": kl_m, "kl_se": kl_se, "top1": t1_m, "top1_se": t1_se,
            "ll_mean": ll / len(items), "bpb": -ll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
            "seconds": part["seconds"], "items": items}
    results = {**meta, "seed": seed, "tasks": tasks, "paired_vs_exact": paired, "divergence": div,
               "bootstrap_iters": BOOT_ITERS}
    store.write_json(run_dir / "results.json", results)
    return results


def _pct(x: float, se: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if se is None or math.isnan(se):
        return f"{100 * x:.1f}"
    return f"{100 * x:.1f} ± {100 * se:.1f}"


def _arms(results: dict) -> list[str]:
    order = results["config"]["arms"]
    present = {a for t in results["tasks"].values() for a in t}
    return [a for a in order if a in present]


def _paper_rows(table: str, tasks: tuple[str, ...]) -> list[str]:
    """Rows of published numbers for ``table`` (from :data:`PAPER`), or one n/a row."""
    keys = sorted({(m, a) for (t, m, a, _) in PAPER if t == table})
    tail = " | n/a |" if len(tasks) > 1 else " |"
    if not keys:
        return ["| *paper* | " + " | ".join("n/a" for _ in tasks) + tail]
    return [f"| *paper: {m}, {a}* | " + " | ".join(_pct(PAPER[(table, m, a, t)]) if (table, m, a, t) in PAPER
                                                  else "n/a" for t in tasks) + tail for m, a in keys]


def _fmt_paired(p: stats.Paired) -> str:
    return p.fmt() + (f" (p={p.p_mcnemar:.2g}, {p.b}/{p.c})" if p.b >= 0 else "")


def pooled_paired(results: dict, tasks: tuple[str, ...], arm: str) -> stats.Paired | None:
    """``arm`` against ``exact`` on the items of all ``tasks`` together (pairs matched by task and
    doc_id), with the run's bootstrap settings; None unless both arms have every task."""
    per = results["tasks"]
    if not all("exact" in per[t] and arm in per[t] for t in tasks):
        return None
    base, mine = [], []
    for t in tasks:
        ref = {it["doc_id"]: it["acc"] for it in per[t]["exact"]["items"]}
        for it in per[t][arm]["items"]:
            if it["doc_id"] in ref:
                base.append(ref[it["doc_id"]])
                mine.append(it["acc"])
    return stats.paired(base, mine, BOOT_ITERS, results["seed"])


def _acc_table(results: dict, tasks: tuple[str, ...], title: str, table: str = "") -> list[str]:
    tasks = tuple(t for t in tasks if t in results["tasks"])
    if not tasks:
        return []
    arms = _arms(results)
    head = "| arm | " + " | ".join(_col(t) for t in tasks) + (" | Avg |" if len(tasks) > 1 else " |")
    lines = [f"### {title}", "", "Accuracy in % ± standard error (n items per task in the header row below).", "",
             head, "|" + "---|" * (len(tasks) + 1 + (len(tasks) > 1))]
    lines.append("| n | " + " | ".join(str(results["tasks"][t].get("exact", next(iter(results["tasks"][t].values())))
                                           ["n"]) for t in tasks) + (" | |" if len(tasks) > 1 else " |"))
    for arm in arms:
        cells, vals = [], []
        for t in tasks:
            e = results["tasks"][t].get(arm)
            cells.append(_pct(e["acc"], e["se"]) if e else "–")
            if e:
                vals.append(e["acc"])
        avg = f" | {_pct(float(np.mean(vals)))}" if len(tasks) > 1 and len(vals) == len(tasks) else (
            " | –" if len(tasks) > 1 else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + avg + " |")
    lines += _paper_rows(table, tasks)
    pooled = len(tasks) > 1
    lines += ["", "Paired difference against `exact` in percentage points: diff ± half-width of the 95% paired "
              f"bootstrap CI ({BOOT_ITERS} resamples, seed {results['seed']}); McNemar exact p; "
              "b/c = items only exact / only the arm got right"
              + ("; *all items*: the tasks' items pooled (item-weighted)." if pooled else "."), "",
              "| arm | " + " | ".join(_col(t) for t in tasks) + (" | *all items* |" if pooled else " |"),
              "|" + "---|" * (len(tasks) + 1 + pooled)]
    for arm in arms:
        if arm == "exact":
            continue
        cells = []
        for t in tasks:
            p = results["paired_vs_exact"].get(t, {}).get(arm)
            if not p:
                cells.append("–")
                continue
            pp = stats.Paired(p["diff"], p["lo"], p["hi"], p["n"], p["b"], p["c"], p["p_mcnemar"])
            cells.append(_fmt_paired(pp))
        if pooled:
            pp = pooled_paired(results, tasks, arm)
            cells.append(_fmt_paired(pp) if pp else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def subgroup_accuracy(results: dict, task: str) -> dict[str, dict[str, tuple[int, float]]]:
    """{subgroup: {arm: (n, accuracy)}} of ``task`` from its per-item ``subgroup`` records (MMLU subjects)."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for arm, entry in results["tasks"].get(task, {}).items():
        groups: dict[str, list[float]] = {}
        for it in entry["items"]:
            if "subgroup" in it:
                groups.setdefault(it["subgroup"], []).append(it["acc"])
        for g, accs in groups.items():
            out.setdefault(g, {})[arm] = (len(accs), float(np.mean(accs)))
    return dict(sorted(out.items()))


def _subgroup_tables(results: dict) -> list[str]:
    lines: list[str] = []
    arms = _arms(results)
    for task in results["tasks"]:
        per = subgroup_accuracy(results, task)
        if not per:
            continue
        lines += [f"### {_col(task)} by {TASKS[task].subgroup_field if task in TASKS else 'subgroup'}", "",
                  "Accuracy in % per subgroup (n items); small subgroups are noisy (se ≈ 50/√n points).", "",
                  "| subgroup | n | " + " | ".join(arms) + " |", "|" + "---|" * (len(arms) + 2)]
        for g, by_arm in per.items():
            n = next(iter(by_arm.values()))[0]
            lines.append(f"| {g} | {n} | " + " | ".join(_pct(by_arm[a][1]) if a in by_arm else "–" for a in arms)
                         + " |")
        lines.append("")
    return lines


def _table5(results: dict) -> list[str]:
    arms = [a for a in TABLE5_ARMS if a in _arms(results)]
    if not any(a.startswith("lmul-k") for a in arms):
        return []
    tasks = [t for t in results["tasks"]]
    lines = ["### Operand precision (layout of the paper's Table 5: L-Mul with k mantissa bits vs fp8)", "",
             "Mean accuracy over the tasks of this run (%), and mean KL(exact ‖ arm) over the divergence tasks.", "",
             "| arm | operands | mean acc | mean KL (nats) | paper |", "|---|---|---|---|---|"]
    ops = {"e5m2": "fp8 e5m2, exact", "e4m3": "fp8 e4m3, exact", "lmul-k2": "e8m2 (k=2), L-Mul",
           "lmul-k3": "e8m3 (k=3), L-Mul", "lmul-k4": "e8m4 (k=4), L-Mul", "lmul": "bf16 (k=7), L-Mul"}
    for a in arms:
        accs = [results["tasks"][t][a]["acc"] for t in tasks if a in results["tasks"][t]]
        kls = [results["divergence"][t][a]["kl"] for t in results["divergence"] if a in results["divergence"][t]]
        lines.append(f"| {a} | {ops[a]} | {_pct(float(np.mean(accs))) if accs else '–'} | "
                     f"{f'{np.mean(kls):.3g}' if kls else '–'} | n/a |")
    return lines + [""]


def _div_table(results: dict) -> list[str]:
    div = results.get("divergence") or {}
    if not div:
        return []
    lines = ["### Divergence from the exact model on the gold sequences", "",
             "Mean over items of the per-position KL(exact ‖ arm) in nats, top-1 agreement with the exact model "
             "(%), and the gold continuation's log-likelihood (nats, mean per item) and bits per UTF-8 byte.", "",
             "| task | arm | n | KL | top-1 agree | gold ll | bpb |", "|---|---|---|---|---|---|---|"]
    arms = results["config"]["arms"]
    for t, per in div.items():
        for a in arms:
            d = per.get(a)
            if d:
                lines.append(f"| {_col(t)} | {a} | {d['n']} | {d['kl']:.3g} ± {d['kl_se']:.2g} | "
                             f"{_pct(d['top1'], d['top1_se'])} | {d['ll_mean']:.3f} | {d['bpb']:.4f} |")
    return lines + [""]


def plots(results: dict, out: Path) -> list[Path]:
    """accuracy.png (accuracy per arm and task, ±1.96 se, chance level dashed) and kl.png (mean KL per
    arm and task, ±1.96 se); an arm has the same colour in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    arms = _arms(results)
    color = {a: f"C{i}" for i, a in enumerate(arms)}  # the same colour for an arm in both plots
    tasks = list(results["tasks"])
    if tasks and arms:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
        w = 0.8 / len(arms)
        for i, a in enumerate(arms):
            x = np.arange(len(tasks)) + (i - (len(arms) - 1) / 2) * w
            y = [100 * results["tasks"][t][a]["acc"] if a in results["tasks"][t] else np.nan for t in tasks]
            e = [196 * results["tasks"][t][a]["se"] if a in results["tasks"][t] else np.nan for t in tasks]
            ax.bar(x, y, w, yerr=np.nan_to_num(e), capsize=2, label=a, color=color[a])
        for j, t in enumerate(tasks):  # chance level: mean over items of 1 / number of choices
            items = next(iter(results["tasks"][t].values()))["items"]
            if items and all("lls" in it for it in items):
                chance = 100 * float(np.mean([1 / len(it["lls"]) for it in items]))
                ax.hlines(chance, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1,
                          label="chance" if j == 0 else None)
        ax.set_xticks(np.arange(len(tasks)), [_col(t) for t in tasks])
        ax.set_ylabel("accuracy (%), 95% CI")
        ax.set_title(results.get("model_desc", results["config"]["model"]).split(" (")[0], fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "accuracy.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    div = results.get("divergence") or {}
    darms = [a for a in arms if a != "exact" and any(a in d for d in div.values())]
    if div and darms:
        dtasks = list(div)
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(dtasks)), 4))
        w = 0.8 / len(darms)
        for i, a in enumerate(darms):
            x = np.arange(len(dtasks)) + (i - (len(darms) - 1) / 2) * w
            y = [div[t][a]["kl"] if a in div[t] else np.nan for t in dtasks]
            e = [1.96 * div[t][a]["kl_se"] if a in div[t] else np.nan for t in dtasks]
            ax.bar(x, y, w, yerr=np.nan_to_num(e), capsize=2, label=a, color=color[a])
        ax.set_xticks(np.arange(len(dtasks)), [_col(t) for t in dtasks])
        ax.set_yscale("log")
        ax.set_ylabel("mean KL(exact ‖ arm), nats, 95% CI")
        ax.set_title(results.get("model_desc", results["config"]["model"]).split(" (")[0], fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "kl.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def render(results: dict) -> str:
    c = results["config"]
    v = results.get("versions", {})
    wall = sum(e["seconds"] for t in results["tasks"].values() for e in t.values()) + sum(
        d["seconds"] for t in results.get("divergence", {}).values() for d in t.values())
    lines = [f"# lmul eval: {results.get('model_desc', c['model'])}", "",
             f"- arms: {', '.join(c['arms'])}; tasks: {', '.join(c['tasks'])}",
             f"- items per task: {c['limit'] or 'all'} (first N of each split); divergence items: "
             f"{c['div_limit'] if c['div_limit'] is not None else c['limit'] or 'all'}; seed {c['seed']}; "
             f"world size {results.get('world_size', 1)}",
             f"- started {results.get('started')}, finished {results.get('finished', '–')}; "
             f"compute {wall / 60:.1f} min (sum over units) + model load {results.get('model_load_seconds', 0):.0f} s",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("lmul", "lmul_git", "torch", "transformers",
                                                                  "lm_eval", "datasets") if k in v),
             f"- machine: {v.get('platform', '?')}, {v.get('torch_threads', '?')} torch threads, device {c['device']}",
             "", PAPER_NOTE, ""]
    lines += _acc_table(results, TABLE2_TASKS, "Common-sense reasoning (layout of the paper's Table 2)", "2")
    lines += _acc_table(results, TABLE3_TASKS, "MMLU and GSM8K (layout of the paper's Table 3)", "3")
    others = tuple(t for t in results["tasks"] if t not in TABLE2_TASKS + TABLE3_TASKS)
    lines += _acc_table(results, others, "Other tasks")
    lines += _table5(results)
    lines += _div_table(results)
    lines += _subgroup_tables(results)
    lines += ["Plots: `accuracy.png`, `kl.png`. Rebuild this report with `lmul report <this folder>`.", ""]
    return "\n".join(lines)


def build(run_dir: Path, reassemble: bool = True) -> Path:
    """(Re)build results.json (from parts, when present) and report.md + plots (from results.json)."""
    run_dir = Path(run_dir)
    if reassemble and (run_dir / "parts").is_dir() and (run_dir / "config.json").exists():
        results = assemble(run_dir)
    elif (run_dir / "results.json").exists():
        results = store.read_json(run_dir / "results.json")
    elif (run_dir / "results.json.gz").exists():
        results = store.read_json(run_dir / "results.json.gz")
    else:
        raise FileNotFoundError(f"{run_dir} has neither results.json(.gz) nor config.json + parts/: not a run folder")
    plots(results, run_dir)
    store.write_atomic(run_dir / "report.md", render(results))
    return run_dir / "report.md"
