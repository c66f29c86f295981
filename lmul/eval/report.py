"""``report.md`` + PNG plots from ``results.json`` (which :mod:`lmul.eval.results` assembles from the run's parts).

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
from lmul.eval.paper import MODELS, PAPER, paper_delta
from lmul.eval.results import BOOT_ITERS, assemble, headline, paired_vs_exact
from lmul.eval.tasks import TASKS

UNRESOLVED = "too few items to resolve"


def paper_note(tables: set[str]) -> str:
    """The preamble on paper rows, naming only the paper tables (``"table2"``, ...) this report shows."""
    if not tables:
        return ""
    names = sorted(t.removeprefix("table") for t in tables)
    models = sorted({m for (t, m, a, task) in PAPER if t in tables}, key=list(MODELS).index)
    which = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (f"Paper rows: the published accuracies of arXiv:2410.00907 v2 (Table{'s' * (len(names) > 1)} {which}: "
            + ", ".join(MODELS[m] for m in models) + "; `lmul.eval.paper`, checked against the project's "
            "transcription of the PDF). Those models are not this one, so compare *differences*: the paper's arm "
            "minus its own BFloat16 row beside ours against `exact`; † marks a paper difference outside our 95% CI, "
            f"*{UNRESOLVED}* a comparison where our CI has no width or fewer than {stats.MIN_DISCORDANT} items "
            "changed their answer (no test at 5% can resolve anything there).")


def _paper_mark(d: float, p: dict | None) -> str:
    """'†' when the paper's difference ``d`` (points) lies outside our resolvable 95% CI, else ''."""
    if p is None or not _resolvable(p):
        return ""
    return "" if 100 * p["lo"] <= d <= 100 * p["hi"] else "†"


def _resolvable(p: dict) -> bool:
    return stats.resolvable(stats.Paired(p["diff"], p["lo"], p["hi"], p["n"], p["b"], p["c"], p["p_mcnemar"]))

COMMONSENSE = ("arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa")
TABLE2_TASKS = ("mmlu",) + COMMONSENSE  # the paper's Table 2 (its BBH column we do not run); Avg: COMMONSENSE
TABLE3_TASKS = ("gsm8k",)
TABLE5_ARMS = ("e5m2", "e4m3", "lmul-k2", "lmul-k3", "lmul-k4", "lmul")
TABLE5_COLUMNS = (("e4m3", "e4m3"), ("e5m2", "e5m2"), ("lmul-k4", "L-Mul k=4"), ("lmul-k3", "k=3"),
                  ("lmul-k2", "k=2"))  # the paper's Table 5, in its order


def _col(task: str) -> str:
    return TASKS[task].paper or task if task in TASKS else task


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


def _paper_table(task: str) -> str:
    """The paper table that holds ``task`` (MMLU and the common-sense tasks: Table 2; GSM8K: Table 3)."""
    return "table3" if task == "gsm8k" else "table2"


def _paper_rows(tasks: tuple[str, ...]) -> list[str]:
    """The paper's absolute accuracies for ``tasks`` (one row per model and arm), or one n/a row."""
    avg = len(tasks) > 1
    keys = sorted({(m, a) for (t, m, a, task) in PAPER if t in ("table2", "table3") and task in tasks})
    if not keys:
        return ["| *paper* | " + " | ".join("n/a" for _ in tasks) + (" | n/a |" if avg else " |")]
    rows = []
    for m, a in keys:
        cells = [_num(PAPER.get((_paper_table(t), m, a, t))) for t in tasks]
        tail = f" | {_num(PAPER.get(('table2', m, a, 'avg')))} |" if avg and COMMONSENSE == tuple(
            t for t in tasks if t in COMMONSENSE) else (" | |" if avg else " |")
        rows.append(f"| *paper: {MODELS[m].split('-')[0]}, {a}* | " + " | ".join(cells) + tail)
    return rows


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _paper_delta_rows(results: dict, tasks: tuple[str, ...]) -> list[str]:
    """Difference of differences: ours (arm − exact, 95% CI) beside the paper's (arm − BFloat16) per model."""
    arms = [a for a in _arms(results) if a != "exact"
            and any(paper_delta(_paper_table(t), m, a, t) is not None for t in tasks for m in MODELS)]
    if not arms:
        return []
    shown = [m for m in MODELS if any(paper_delta(_paper_table(t), m, a, t) is not None for t in tasks for a in arms)]
    legend = ", ".join(f"{m[0].upper()}: {MODELS[m]}" for m in shown)
    lines = ["", "Ours against the paper, in points (acc): our arm − `exact` [95% CI] · the paper's arm − its "
             f"BFloat16 row per model ({legend}); † = outside our CI; *{UNRESOLVED}*: our CI has no width or fewer "
             f"than {stats.MIN_DISCORDANT} items changed, so it can neither agree nor disagree.", "",
             "| arm | " + " | ".join(_col(t) for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for arm in arms:
        cells = []
        for t in tasks:
            p = results["paired_vs_exact"].get(t, {}).get(arm)
            ours = f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]" if p else "–"
            theirs = []
            for m in MODELS:
                d = paper_delta(_paper_table(t), m, arm, t)
                if d is None:
                    continue
                theirs.append(f"{m[0].upper()} {d:+.2f}{_paper_mark(d, p)}")
            unresolved = f" *({UNRESOLVED})*" if theirs and p is not None and not _resolvable(p) else ""
            cells.append(ours + (" · " + ", ".join(theirs) if theirs else "") + unresolved)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


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


def _chance(results: dict, task: str) -> float | None:
    """Chance accuracy of ``task``: the mean over items of 1 / (number of choices)."""
    entry = results["tasks"][task].get("exact") or next(iter(results["tasks"][task].values()))
    sizes = [len(it["lls"]) for it in entry["items"] if it.get("lls")]
    return float(np.mean([1 / n for n in sizes])) if sizes else None


def _paired_of(results: dict, metric: str) -> dict:
    key = "paired_vs_exact" if metric == "acc" else "paired_vs_exact_norm"
    if key not in results:  # results.json written before acc_norm comparisons existed
        results[key] = paired_vs_exact(results["tasks"], results["seed"], metric)
    return results[key]


def _paired_cells(results: dict, tasks: tuple[str, ...], arm: str, metric_of) -> list[str]:
    cells = []
    for t in tasks:
        p = _paired_of(results, metric_of(t)).get(t, {}).get(arm)
        if not p:
            cells.append("–")
            continue
        cells.append(_fmt_paired(stats.Paired(p["diff"], p["lo"], p["hi"], p["n"], p["b"], p["c"], p["p_mcnemar"])))
    return cells


def _acc_table(results: dict, tasks: tuple[str, ...], title: str, table: str = "") -> list[str]:
    tasks = tuple(t for t in tasks if t in results["tasks"])
    if not tasks:
        return []
    arms = _arms(results)
    metric = {t: headline(results["tasks"][t]) for t in tasks}
    normed = [t for t in tasks if metric[t] == "acc_norm"]
    head = "| arm | " + " | ".join(_col(t) + (" (acc_norm)" if t in normed else "") for t in tasks) + (
        " | Avg |" if len(tasks) > 1 else " |")
    avg_tasks = tuple(t for t in tasks if t in COMMONSENSE) if table == "2" and any(
        t in COMMONSENSE for t in tasks) else tasks
    lines = [f"### {title}", "", "Accuracy in % ± standard error (n items per task in the header row below). "
             + ("Where lm-eval defines `acc_norm` (length-normalised log-likelihood: ARC, OBQA, PIQA, HellaSwag) "
                "the cell leads with it, `acc` in parentheses. " if normed else "")
             + ("Avg: the common-sense tasks only, as the paper's. " if avg_tasks != tasks else "")
             + "*chance*: the mean over items of 1 / number of choices.", "",
             head, "|" + "---|" * (len(tasks) + 1 + (len(tasks) > 1))]
    lines.append("| n | " + " | ".join(str(results["tasks"][t].get("exact", next(iter(results["tasks"][t].values())))
                                           ["n"]) for t in tasks) + (" | |" if len(tasks) > 1 else " |"))
    chance = [_chance(results, t) for t in tasks]
    lines.append("| *chance* | " + " | ".join(_pct(c) if c is not None else "–" for c in chance)
                 + (" | |" if len(tasks) > 1 else " |"))
    for arm in arms:
        cells, vals = [], []
        for t in tasks:
            e = results["tasks"][t].get(arm)
            if not e:
                cells.append("–")
                continue
            if metric[t] == "acc_norm":
                cells.append(f"{_pct(e['acc_norm'], e['acc_norm_se'])} ({_pct(e['acc'])})")
                if t in avg_tasks:
                    vals.append(e["acc_norm"])
            else:
                cells.append(_pct(e["acc"], e["se"]))
                if t in avg_tasks:
                    vals.append(e["acc"])
        avg = f" | {_pct(float(np.mean(vals)))}" if len(tasks) > 1 and len(vals) == len(avg_tasks) else (
            " | –" if len(tasks) > 1 else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + avg + " |")
    lines += _paper_rows(tasks) if table else []
    pooled = len(tasks) > 1
    lines += ["", "Paired difference against `exact` in percentage points (of each column's headline metric): "
              f"diff ± half-width of the 95% paired bootstrap CI ({BOOT_ITERS} resamples, seed {results['seed']}); "
              "McNemar exact p; b/c = items only exact / only the arm got right"
              + ("; *all items*: the tasks' items pooled (item-weighted, acc)." if pooled else "."), "",
              "| arm | " + " | ".join(_col(t) + (" (acc_norm)" if t in normed else "") for t in tasks)
              + (" | *all items* |" if pooled else " |"),
              "|" + "---|" * (len(tasks) + 1 + pooled)]
    for arm in arms:
        if arm == "exact":
            continue
        cells = _paired_cells(results, tasks, arm, lambda t: metric[t])
        if pooled:
            pp = pooled_paired(results, tasks, arm)
            cells.append(_fmt_paired(pp) if pp else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if normed:
        lines += ["", "The same comparison for `acc` of the tasks that lead with `acc_norm`:", "",
                  "| arm | " + " | ".join(f"{_col(t)} (acc)" for t in normed) + " |", "|" + "---|" * (len(normed) + 1)]
        lines += [f"| {arm} | " + " | ".join(_paired_cells(results, tuple(normed), arm, lambda t: "acc")) + " |"
                  for arm in arms if arm != "exact"]
    if table:
        lines += _paper_delta_rows(results, tasks)
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


def _table5_mmlu(results: dict) -> list[str]:
    """MMLU in the layout of the paper's Table 5 (columns e4m3, e5m2, L-Mul k=4, 3, 2; one row per model):
    our accuracies with the paper's rows beneath, then the differences against the exact / BFloat16 row
    (the paper's Table 5 prints no BFloat16 row: its Table 2 MMLU), then our divergence on MMLU."""
    per = results["tasks"].get("mmlu", {})
    cols = [(a, h) for a, h in TABLE5_COLUMNS if a in per]
    if "exact" not in per or not cols:
        return []
    div = (results.get("divergence") or {}).get("mmlu", {})
    paired = results["paired_vs_exact"].get("mmlu", {})
    name = results.get("model_desc", results["config"]["model"]).split(" (")[0]
    n = per["exact"]["n"]
    lines = ["### MMLU with k-bit operands (layout of the paper's Table 5)", "",
             f"Accuracy in % (5-shot, {n} items; ± standard error). The paper's Table 5 prints no BFloat16 column: "
             "its BFloat16 MMLU is Table 2's, shown under *exact*. Differences in points: ours arm − `exact` with the "
             "95% paired bootstrap CI, the paper's arm − its BFloat16; † = a paper difference outside our CI "
             f"(*{UNRESOLVED}*: our CI has no width or fewer than {stats.MIN_DISCORDANT} items changed). "
             "KL and top-1: our divergence pass on MMLU's gold sequences (prompt + correct letter).", "",
             "| model | exact (paper: BF16) | " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * (len(cols) + 2),
             f"| ours: {name} | {_pct(per['exact']['acc'], per['exact']['se'])} | "
             + " | ".join(_pct(per[a]["acc"], per[a]["se"]) for a, _ in cols) + " |"]
    for m in ("mistral", "llama"):
        lines.append(f"| *paper: {MODELS[m]}* | {_num(PAPER.get(('table5', m, 'bf16', 'mmlu')))} | "
                     + " | ".join(_num(PAPER.get(("table5", m, a, "mmlu"))) for a, _ in cols) + " |")
    cells = []
    for a, _ in cols:
        p = paired.get(a)
        cells.append(f"{100 * p['diff']:+.1f} [{100 * p['lo']:+.1f}, {100 * p['hi']:+.1f}]" if p else "–")
    lines.append("| ours: arm − exact [95% CI] | | " + " | ".join(cells) + " |")
    for m in ("mistral", "llama"):
        cells = []
        for a, _ in cols:
            d, p = paper_delta("table5", m, a, "mmlu"), paired.get(a)
            cells.append("–" if d is None else f"{d:+.2f}{_paper_mark(d, p)}"
                         + (f" *({UNRESOLVED})*" if p is not None and not _resolvable(p) else ""))
        lines.append(f"| *paper: {MODELS[m].split('-')[0]} arm − BF16* | | " + " | ".join(cells) + " |")
    if div:
        lines.append("| ours: KL(exact ‖ arm), nats | | " + " | ".join(
            f"{div[a]['kl']:.3g} ± {div[a]['kl_se']:.2g}" if a in div else "–" for a, _ in cols) + " |")
        lines.append("| ours: top-1 agreement | | " + " | ".join(
            _pct(div[a]["top1"], div[a]["top1_se"]) if a in div else "–" for a, _ in cols) + " |")
    return lines + [""]


def _table5(results: dict) -> list[str]:
    arms = [a for a in TABLE5_ARMS if a in _arms(results)]
    if not any(a.startswith("lmul-k") for a in arms):
        return []
    tasks = [t for t in results["tasks"]]
    lines = ["### Operand precision over all tasks of this run (L-Mul with k mantissa bits vs fp8)", "",
             "Mean accuracy over the tasks of this run (%), and mean KL(exact ‖ arm) over the divergence tasks.", "",
             "| arm | operands | mean acc | mean KL (nats) | paper MMLU − BFloat16 (M, L) |", "|---|---|---|---|---|"]
    ops = {"e5m2": "fp8 e5m2, exact", "e4m3": "fp8 e4m3, exact", "lmul-k2": "e8m2 (k=2), L-Mul",
           "lmul-k3": "e8m3 (k=3), L-Mul", "lmul-k4": "e8m4 (k=4), L-Mul", "lmul": "bf16 (k=7), L-Mul"}
    for a in arms:
        accs = [results["tasks"][t][a]["acc"] for t in tasks if a in results["tasks"][t]]
        kls = [results["divergence"][t][a]["kl"] for t in results["divergence"] if a in results["divergence"][t]]
        paper = ", ".join(f"{d:+.2f}" for m in ("mistral", "llama")
                          if (d := paper_delta("table5", m, a, "mmlu")) is not None) or "–"
        lines.append(f"| {a} | {ops[a]} | {_pct(float(np.mean(accs))) if accs else '–'} | "
                     f"{f'{np.mean(kls):.3g}' if kls else '–'} | {paper} |")
    return lines + [""]


_FMT_NAMES = {"e4m3": "fp8 e4m3", "e5m2": "fp8 e5m2", "fp4": "fp4 e2m1", "bf16": "bf16", "e8m2": "e8m2 (k=2)",
              "e8m3": "e8m3 (k=3)", "e8m4": "e8m4 (k=4)"}
_SCALE_NAMES = {"none": "none", "tensor": "per tensor", "row": "per row (rowwise)", "block": "1×128 / 128×128",
                "mx": "per 32 along K (MX)"}


def _operands(arm: str) -> tuple[str, str, str] | None:
    """(operand format, scaling, product) of a preset arm from :data:`lmul.spec.PRESETS`, or None."""
    from lmul.spec import PRESETS

    if arm not in PRESETS or arm == "exact":
        return None
    kw = PRESETS[arm][0]
    fmt = _FMT_NAMES.get(kw["fmt"], kw["fmt"]) + (", trunc" if kw.get("rounding") == "trunc" else "")
    mode = {"exact": "exact", "bit": "L-Mul"}.get(kw["mode"], kw["mode"])
    return fmt, _SCALE_NAMES.get(kw.get("scaling", "none"), kw.get("scaling", "none")), mode


def _scaled_table(results: dict, always: bool = False) -> list[str]:
    """Issue 27: every arm's operands (format, power-of-two scaling, product) beside its pooled
    accuracy change, mean KL and top-1 agreement, shown when the run has a scaled arm (or ``always``)."""
    from lmul.spec import PRESETS

    arms = [a for a in _arms(results) if _operands(a)]
    if not always and not any(PRESETS[a][0].get("scaling", "none") != "none" for a in arms):
        return []
    tasks = tuple(results["tasks"])
    div = results.get("divergence") or {}
    lines = ["### Scaled operands (fp8 / fp4 as really run)", "",
             "Each arm's operands (scales are powers of two; scaled arms sum in float32), its `acc` change against "
             "`exact` on all items pooled [95% paired bootstrap CI] (b/c: items only exact / only the arm got right), "
             "and the mean over the divergence tasks of KL(exact ‖ arm) and of top-1 agreement.", "",
             "| arm | operands | scaling | product | Δ acc vs exact, points | mean KL (nats) | mean top-1 (%) |",
             "|---|---|---|---|---|---|---|"]
    for a in arms:
        fmt, scale, mode = _operands(a)
        pp = pooled_paired(results, tasks, a)
        acc = (f"{100 * pp.diff:+.1f} [{100 * pp.lo:+.1f}, {100 * pp.hi:+.1f}] ({pp.b}/{pp.c})" if pp else "–")
        kl = _kl_mean(results, a)
        top = [d[a]["top1"] for d in div.values() if a in d]
        lines.append(f"| {a} | {fmt} | {scale} | {mode} | {acc} | "
                     + (f"{kl[0]:.3g} ± {kl[1]:.2g}" if kl else "–") + " | "
                     + (_pct(float(np.mean(top))) if top and len(top) == len(div) else "–") + " |")
    return lines + [""]


def _bpb_vs_exact(per: dict, arm: str, seed: int) -> str:
    """Mean over items of the per-item bits-per-byte difference arm − exact, with its paired 95%
    bootstrap CI (items matched by doc_id)."""
    if arm == "exact" or "exact" not in per:
        return "–"
    ref = {it["doc_id"]: it["bpb"] for it in per["exact"]["items"]}
    pairs = [(ref[it["doc_id"]], it["bpb"]) for it in per[arm]["items"] if it["doc_id"] in ref]
    if len(pairs) < 2:
        return "–"
    diff, lo, hi = stats.paired_bootstrap([a for a, _ in pairs], [b for _, b in pairs], BOOT_ITERS, seed)
    return f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def generation_agreement(results: dict, task: str, arm: str) -> dict | None:
    """For a generation task: over the items both ``arm`` and exact generated, how many greedy
    outputs are identical to exact's, how many differ in their exact-match score, and the mean
    output length (characters) of the arm. None when the task has no generated outputs."""
    entries = results["tasks"].get(task, {})
    if arm not in entries or "exact" not in entries:
        return None
    ref = {it["doc_id"]: it for it in entries["exact"]["items"] if "output" in it}
    mine = [it for it in entries[arm]["items"] if "output" in it and it["doc_id"] in ref]
    if not mine:
        return None
    return {"n": len(mine), "identical": sum(it["output"] == ref[it["doc_id"]]["output"] for it in mine),
            "score_changed": sum(it["acc"] != ref[it["doc_id"]]["acc"] for it in mine),
            "mean_chars": sum(len(it["output"]) for it in mine) / len(mine)}


def _generation_table(results: dict) -> list[str]:
    rows = []
    for t in results["tasks"]:
        for a in _arms(results):
            g = generation_agreement(results, t, a)
            if g:
                same = "–" if a == "exact" else f"{g['identical']} / {g['n']}"
                changed = "–" if a == "exact" else str(g["score_changed"])
                rows.append(f"| {_col(t)} | {a} | {g['n']} | {same} | {changed} | {g['mean_chars']:.0f} |")
    if not rows:
        return []
    return ["### Greedy generations against the exact model's", "",
            "Items whose greedy output (up to the task's stop sequences or token limit) is character for "
            "character the exact model's, items whose exact-match score differs from exact's, and the mean "
            "output length in characters.", "",
            "| task | arm | n | output identical to exact | score changed | mean length |",
            "|---|---|---|---|---|---|", *rows, ""]


def _div_table(results: dict) -> list[str]:
    div = results.get("divergence") or {}
    if not div:
        return []
    lines = ["### Divergence from the exact model on the gold sequences", "",
             "Mean over items of the per-position KL(exact ‖ arm) in nats, top-1 agreement with the exact model "
             "(%), and the gold continuation's log-likelihood (nats, mean per item) and bits per UTF-8 byte "
             "(all items' bits over all their bytes); Δ bpb: the mean over items of the per-item bpb difference "
             f"arm − exact [paired 95% bootstrap CI, {BOOT_ITERS} resamples, seed {results['seed']}].", "",
             "| task | arm | n | KL | top-1 agree | gold ll | bpb | Δ bpb vs exact |",
             "|---|---|---|---|---|---|---|---|"]
    arms = results["config"]["arms"]
    for t, per in div.items():
        for a in arms:
            d = per.get(a)
            if d:
                lines.append(f"| {_col(t)} | {a} | {d['n']} | {d['kl']:.3g} ± {d['kl_se']:.2g} | "
                             f"{_pct(d['top1'], d['top1_se'])} | {d['ll_mean']:.3f} | {d['bpb']:.4f} | "
                             f"{_bpb_vs_exact(per, a, results['seed'])} |")
    return lines + [""]


def accuracy_bars(results: dict, task: str, arm: str) -> tuple[str, float, float, float] | None:
    """What accuracy.png draws for one bar: (metric, value, lo, hi) in %, where metric is the one the
    tables lead with (:func:`lmul.eval.results.headline`: ``acc_norm`` where lm-eval defines it, else
    ``acc``), value its mean over items and [lo, hi] the 95% Wilson interval of the k correct of n
    items (:func:`lmul.eval.stats.wilson`; inside [0, 100], unlike value ± 1.96 se). None when the
    arm did not run the task or its items are not scored 0/1."""
    entry = results["tasks"][task].get(arm)
    if not entry:
        return None
    metric = headline(results["tasks"][task])
    scores = [it[metric] for it in entry["items"]]
    if not scores or any(v not in (0, 1) for v in scores):
        return None
    lo, hi = stats.wilson(int(sum(scores)), len(scores))
    return metric, 100 * float(np.mean(scores)), 100 * lo, 100 * hi


def plots(results: dict, out: Path) -> list[Path]:
    """accuracy.png (per arm and task the tables' headline metric with its 95% Wilson interval,
    chance level dashed; :func:`accuracy_bars`) and kl.png (mean KL per arm and task, ±1.96 se);
    an arm has the same colour in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmul.files import save_figure

    made = []
    arms = _arms(results)
    many = len(arms) > 10  # beyond the 10 default colours: tab20, legend beside the axes
    color = {a: plt.get_cmap("tab20")(i % 20) if many else f"C{i}"
             for i, a in enumerate(arms)}  # the same colour for an arm in both plots
    tasks = list(results["tasks"])
    if tasks and arms:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
        w = 0.8 / len(arms)
        for i, a in enumerate(arms):
            x = np.arange(len(tasks)) + (i - (len(arms) - 1) / 2) * w
            bars = [accuracy_bars(results, t, a) for t in tasks]
            y = [b[1] if b else np.nan for b in bars]
            e = np.array([[b[1] - b[2], b[3] - b[1]] if b else [0.0, 0.0] for b in bars]).T  # asymmetric
            ax.bar(x, y, w, yerr=e, capsize=2, label=a, color=color[a])
        for j, t in enumerate(tasks):  # chance level: mean over items of 1 / number of choices
            items = next(iter(results["tasks"][t].values()))["items"]
            if items and all("lls" in it for it in items):
                chance = 100 * float(np.mean([1 / len(it["lls"]) for it in items]))
                ax.hlines(chance, j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1,
                          label="chance" if j == 0 else None)
        ax.set_xticks(np.arange(len(tasks)), [f"{_col(t)}\n({headline(results['tasks'][t])})" for t in tasks])
        ax.set_ylabel("accuracy (%): acc_norm or acc as labelled,\n95% Wilson interval", fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_title(results.get("model_desc", results["config"]["model"]).split(" (")[0], fontsize=10)
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
        fig.tight_layout()
        made.append(out / "accuracy.png")
        save_figure(fig, made[-1], dpi=120)
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
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if many else {}))
        fig.tight_layout()
        made.append(out / "kl.png")
        save_figure(fig, made[-1], dpi=120)
        plt.close(fig)
    return made


def _sessions(results: dict) -> str:
    """'; wall time ...' from config.json's ``sessions`` (one per process that computed units), or ''."""
    ses = results.get("sessions") or []
    if not ses:
        return ""
    total = sum(x["wall_seconds"] for x in ses)
    mins = ", ".join(f"{x['wall_seconds'] / 60:.1f}" for x in ses)
    each = f" in {len(ses)} processes ({mins} min)" if len(ses) > 1 else ""
    return f"; wall time {total / 60:.1f} min{each}"


def _kl_mean(results: dict, arm: str) -> tuple[float, float] | None:
    """Mean over the divergence tasks of the per-task mean KL(exact ‖ arm), and its standard error
    (the tasks' standard errors combined: sqrt(Σ se²) / T); None unless every task has the arm."""
    div = results.get("divergence") or {}
    rows = [d[arm] for d in div.values() if arm in d]
    if not div or len(rows) != len(div):
        return None
    return float(np.mean([r["kl"] for r in rows])), math.sqrt(sum(r["kl_se"] ** 2 for r in rows)) / len(rows)


def summary(results: dict) -> list[str]:
    """A plain-language opening: what was run, what it found, how sure that is.

    Accuracy: each arm against ``exact`` on all items pooled (:func:`pooled_paired`, ``acc``), read
    as a loss or gain only when the 95% paired bootstrap CI excludes 0 and the comparison is
    :func:`lmul.eval.stats.resolvable`. Divergence: arms ranked by mean KL(exact ‖ arm) over the
    divergence tasks; two neighbours count as ordered when their 95% intervals (± 1.96 se) do not
    overlap."""
    c = results["config"]
    tasks = tuple(results["tasks"])
    arms = _arms(results)
    others = [a for a in arms if a != "exact"]
    n_items = sum(next(iter(results["tasks"][t].values()))["n"] for t in tasks)
    per = sorted({next(iter(results["tasks"][t].values()))["n"] for t in tasks})
    which = [f"the first {c['limit']} of each task" if c.get("limit") else "every item"]
    which += [f"MMLU: the first {c['per_subject']} of every subject"] if c.get("per_subject") else []
    items = f"{n_items} items ({'; '.join(which)})"
    name = results.get("model_desc", c["model"]).split(" (")[0]
    lines = ["### Summary", "",
             f"**What was run.** {name} on {len(tasks)} task{'s' * (len(tasks) > 1)} "
             f"({', '.join(_col(t) for t in tasks)}), {items}, under {len(arms)} arithmetic arm"
             f"{'s' * (len(arms) > 1)}: `exact` (the unpatched model, the reference)"
             + (", " + ", ".join(f"`{a}`" for a in others) + " (each with `lmul.patch`'s preset of that name)"
                if others else "") + "."]
    if not others or "exact" not in arms:
        return lines + [""]
    found, widths, compared = [], [], 0
    for a in others:
        pp = pooled_paired(results, tasks, a)
        if pp is None:
            continue
        compared += 1
        if stats.resolvable(pp):
            widths.append(100 * (pp.hi - pp.lo) / 2)
        ci = f"{100 * pp.diff:+.1f} points [{100 * pp.lo:+.1f}, {100 * pp.hi:+.1f}]"
        if not stats.resolvable(pp):
            verdict = f"{UNRESOLVED} ({pp.b + pp.c} of {pp.n} answers changed)"
        elif pp.lo <= 0 <= pp.hi:
            verdict = "no difference resolvable"
        else:
            verdict = "a resolvable " + ("loss" if pp.diff < 0 else "gain")
        found.append(f"`{a}` {ci}: {verdict}")
    finding = ("**Main finding.** Accuracy (`acc`, all items pooled) against `exact`, with 95% paired bootstrap "
               "CIs: " + "; ".join(found) + "." if found else "**Main finding.**")
    kls = {a: k for a in others if (k := _kl_mean(results, a)) is not None}
    if kls:
        order = sorted(kls, key=lambda a: kls[a][0])
        chain = ""
        for i, a in enumerate(order):
            if i:
                (m0, s0), (m1, s1) = kls[order[i - 1]], kls[a]
                chain += " < " if m0 + 1.96 * s0 < m1 - 1.96 * s1 else " ≈ "
            chain += f"`{a}` {kls[a][0]:.3g}"
        finding += (f" Closeness to the exact model's next-token distributions (mean KL(exact ‖ arm) over "
                    f"{len(results['divergence'])} divergence task{'s' * (len(results['divergence']) > 1)}, nats, "
                    f"lower is closer): {chain}" + (" (< : 95% intervals apart, ≈ : overlapping)." if len(order) > 1
                                                    else "."))
    lines += ["", finding]
    if compared:
        sure = f"**How sure.** With {'/'.join(map(str, per))} items per task "
        if widths:
            sure += (f"the pooled accuracy CIs are ±{min(widths):.1f}"
                     + (f" to ±{max(widths):.1f}" if max(widths) - min(widths) >= 0.05 else "")
                     + " points wide: accuracy differences smaller than that (the paper's are mostly below 1 point) "
                     "cannot be seen in this run. ")
        else:
            sure += (f"fewer than {stats.MIN_DISCORDANT} answers changed under every arm: too few to resolve an "
                     "accuracy difference of any size (more items, `--limit`, would). ")
        sure += ("The KL ranking is a finer measure: it compares every position's distribution, not only the "
                 "chosen answer." if kls else "")
        lines += ["", sure.rstrip()]
    return lines + [""]


def render(results: dict) -> str:
    c = results["config"]
    v = results.get("versions", {})
    wall = sum(e["seconds"] for t in results["tasks"].values() for e in t.values()) + sum(
        d["seconds"] for t in results.get("divergence", {}).values() for d in t.values())
    lines = [f"# lmul eval: {results.get('model_desc', c['model'])}", "", *summary(results), "### Run", "",
             f"- arms: {', '.join(c['arms'])}; tasks: {', '.join(c['tasks'])}",
             f"- items per task: {c['limit'] or 'all'} (first N of each split); divergence items: "
             f"{c['div_limit'] if c['div_limit'] is not None else c['limit'] or 'all'}; seed {c['seed']}; "
             f"world size {results.get('world_size', 1)}",
             f"- started {results.get('started')}, finished {results.get('finished', '–')}; "
             f"compute {wall / 60:.1f} min (sum over units) + model load {results.get('model_load_seconds', 0):.0f} s"
             + _sessions(results),
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("lmul", "lmul_git", "torch", "transformers",
                                                                  "lm_eval", "datasets") if k in v),
             f"- machine: {v.get('platform', '?')}, {v.get('torch_threads', '?')} torch threads, device {c['device']}",
             ""]
    t2 = "MMLU and common-sense reasoning" if "mmlu" in results["tasks"] else "Common-sense reasoning"
    body = _acc_table(results, TABLE2_TASKS, f"{t2} (layout of the paper's Table 2)", "2")
    body += _acc_table(results, TABLE3_TASKS, "GSM8K (layout of the paper's Table 3)", "3")
    others = tuple(t for t in results["tasks"] if t not in TABLE2_TASKS + TABLE3_TASKS)
    body += _acc_table(results, others, "Other tasks")
    t5 = _table5_mmlu(results) + _table5(results)
    shown = {"table2"} if any(t in results["tasks"] for t in TABLE2_TASKS) else set()
    shown |= {"table3"} if any(t in results["tasks"] for t in TABLE3_TASKS) else set()
    shown |= {"table5"} if t5 else set()
    note = paper_note(shown)
    lines += ([note, ""] if note else []) + body + t5 + _scaled_table(results)
    lines += _generation_table(results)
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
