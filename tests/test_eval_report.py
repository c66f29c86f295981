"""Report pieces on hand-made results: the per-subgroup (MMLU subject) breakdown."""

from __future__ import annotations

import pytest

from lmul.eval import report


def _results():
    items = {
        "exact": [("law", 1), ("law", 0), ("law", 1), ("math", 0)],
        "lmul": [("law", 1), ("law", 1), ("law", 1), ("math", 1)],
    }
    tasks = {"mmlu": {a: {"n": 4, "acc": sum(x for _, x in v) / 4, "se": 0.2, "seconds": 1.0,
                          "items": [{"doc_id": i, "acc": float(x), "subgroup": g} for i, (g, x) in enumerate(v)]}
                      for a, v in items.items()}}
    return {"config": {"arms": ["exact", "lmul"], "model": "m", "limit": None, "div_limit": None, "seed": 0,
                       "tasks": ["mmlu"], "device": "cpu"},
            "seed": 0, "tasks": tasks, "paired_vs_exact": {}, "divergence": {}}


def test_subgroup_accuracy():
    per = report.subgroup_accuracy(_results(), "mmlu")
    assert list(per) == ["law", "math"]
    assert per["law"]["exact"] == (3, pytest.approx(2 / 3)) and per["law"]["lmul"] == (3, 1.0)
    assert per["math"] == {"exact": (1, 0.0), "lmul": (1, 1.0)}
    assert report.subgroup_accuracy(_results(), "piqa") == {}


def test_render_has_the_subject_table():
    text = report.render(_results())
    assert "### MMLU by subject" in text
    assert "| law | 3 | 66.7 | 100.0 |" in text and "| math | 1 | 0.0 | 100.0 |" in text


def test_pooled_paired_matches_items_by_task_and_doc():
    """Two tasks with clashing doc_ids: pairs are matched within a task; diff = (c - b) / n."""
    def entry(accs):
        return {"n": len(accs), "acc": 0.0, "se": 0.0, "seconds": 0.0,
                "items": [{"doc_id": i, "acc": float(x)} for i, x in enumerate(accs)]}
    res = {"seed": 3, "tasks": {"t1": {"exact": entry([1, 1, 0, 0]), "lmul": entry([1, 0, 1, 1])},
                                "t2": {"exact": entry([0, 1]), "lmul": entry([0, 0])}}}
    p = report.pooled_paired(res, ("t1", "t2"), "lmul")
    assert (p.n, p.b, p.c) == (6, 2, 2) and p.diff == 0.0
    res["tasks"]["t2"]["lmul"] = entry([1, 1])
    p = report.pooled_paired(res, ("t1", "t2"), "lmul")
    assert (p.b, p.c) == (1, 3) and p.diff == pytest.approx(2 / 6) and p.lo <= p.diff <= p.hi
    del res["tasks"]["t2"]["lmul"]
    assert report.pooled_paired(res, ("t1", "t2"), "lmul") is None


def _table2_results(with_norm: bool):
    """Hand-made piqa (2 choices, acc_norm) and commonsense_qa (5 choices, acc only) results."""
    def entry(accs, norms, n_choices):
        items = [{"doc_id": i, "acc": float(a), "lls": [0.0] * n_choices} for i, a in enumerate(accs)]
        if norms is not None:
            for it, v in zip(items, norms, strict=True):
                it["acc_norm"] = float(v)
        e = {"n": len(accs), "acc": sum(accs) / len(accs), "se": 0.1, "seconds": 1.0, "items": items}
        if norms is not None:
            e["acc_norm"], e["acc_norm_se"] = sum(norms) / len(norms), 0.1
        return e
    tasks = {
        "piqa": {"exact": entry([1, 0, 1, 0], [1, 1, 1, 0] if with_norm else None, 2),
                 "lmul": entry([1, 0, 0, 0], [1, 1, 0, 0] if with_norm else None, 2),
                 "e5m2": entry([1, 1, 1, 0], [0, 0, 0, 0] if with_norm else None, 2)},
        "commonsense_qa": {"exact": entry([1, 0], None, 5), "lmul": entry([1, 1], None, 5),
                           "e5m2": entry([0, 0], None, 5)},
    }
    from lmul.eval.results import paired_vs_exact

    return {"config": {"arms": ["exact", "e5m2", "lmul"], "model": "m", "limit": None, "div_limit": None, "seed": 0,
                       "tasks": list(tasks), "device": "cpu"},
            "seed": 0, "tasks": tasks, "paired_vs_exact": paired_vs_exact(tasks, 0), "divergence": {}}


def test_acc_norm_leads_where_defined_and_chance_is_stated():
    text = report.render(_table2_results(with_norm=True))
    assert "| arm | CSQA | PIQA (acc_norm) | Avg |" in text
    assert "| *chance* | 20.0 | 50.0 | |" in text
    assert "| exact | 50.0 ± 10.0 | 75.0 ± 10.0 (50.0) | 62.5 |" in text  # acc_norm first, acc beside it
    # paired: PIQA's headline is acc_norm (lmul 2/4 vs exact 3/4 -> -25 points); acc in the second table
    assert "| lmul | +50.0" in text and "-25.0" in text
    assert "The same comparison for `acc` of the tasks that lead with `acc_norm`" in text
    plain = report.render(_table2_results(with_norm=False))
    assert "(acc_norm)" not in plain and "| exact | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 |" in plain


def test_paper_rows_and_difference_of_differences():
    text = report.render(_table2_results(with_norm=False))
    # the paper's absolute rows for the tasks it has (Table 2), and n/a-free rendering of the others
    assert "| *paper: Mistral, bf16* | 71.42 | 80.74 | |" in text
    assert "| *paper: Llama, lmul* | 74.28 | 83.30 | |" in text
    # ours (acc) vs the paper's arm - BFloat16 row; e5m2 on PIQA: ours +25 [CI], Mistral -0.98, Llama -2.93
    row = next(line for line in text.splitlines() if line.startswith("| e5m2 | ") and "·" in line)
    assert "L -0.98" not in row and "M -0.98" in row and "L -2.93" in row
    # PIQA: ours +25 [0, +75] on one changed answer of 4, CSQA -50 on one of 2: neither can place the
    # paper's differences outside anything (issue 25: a † there claimed a disagreement the data cannot show)
    piqa, csqa = row.rstrip(" |").split(" | ")[2], row.split(" | ")[1]
    assert "†" not in piqa + csqa
    assert piqa.endswith("*(too few items to resolve)*") and csqa.endswith("*(too few items to resolve)*")


def _many_items(flips: int, n: int = 40):
    """PIQA only, n items, exact right on the first half; e5m2 additionally right on ``flips`` of the
    others (b = 0, c = flips)."""
    from lmul.eval.results import paired_vs_exact

    exact = [1] * (n // 2) + [0] * (n - n // 2)
    arm = [1] * (n // 2) + [1] * flips + [0] * (n - n // 2 - flips)
    tasks = {"piqa": {a: {"n": n, "acc": sum(v) / n, "se": 0.1, "seconds": 1.0,
                          "items": [{"doc_id": i, "acc": float(x), "lls": [0.0, 0.0]} for i, x in enumerate(v)]}
                      for a, v in (("exact", exact), ("e5m2", arm))}}
    return {"config": {"arms": ["exact", "e5m2"], "model": "m", "limit": None, "div_limit": None, "seed": 0,
                       "tasks": ["piqa"], "device": "cpu"},
            "seed": 0, "tasks": tasks, "paired_vs_exact": paired_vs_exact(tasks, 0), "divergence": {}}


def test_dagger_only_where_the_comparison_can_resolve():
    """† (a paper difference outside our 95% CI) needs a CI with width and >= 6 changed answers
    (McNemar's smallest p on b + c items is 2·2^-(b+c), < 0.05 only from 6 on); with fewer the cell
    says *too few items to resolve*. 8 items gained of 40: ours +20 [+7.5, +32.5] or so, and the
    paper's -0.98 / -2.93 are outside; 5 items gained: no verdict either way."""
    def cell(flips):
        text = report.render(_many_items(flips))
        row = next(line for line in text.splitlines() if line.startswith("| e5m2 | ") and "·" in line)
        return row.rstrip(" |").split(" | ")[1]

    resolved = cell(8)
    assert resolved.count("†") == 2 and "too few" not in resolved, resolved
    assert resolved.startswith("+20.0 [+")
    unresolved = cell(5)
    assert "†" not in unresolved and unresolved.endswith("*(too few items to resolve)*"), unresolved


def test_paper_note_and_legend_name_only_what_the_report_shows():
    """A common-sense-only report names Table 2 and the two models of Table 2, not Tables 3 / 5 or
    Gemma2 (issue 25); a GSM8K report names Table 3 and Gemma2."""
    text = report.render(_table2_results(with_norm=False))
    note = next(line for line in text.splitlines() if line.startswith("Paper rows:"))
    assert "(Table 2:" in note and "Table 3" not in note and "Table 5" not in note and "Gemma" not in note
    legend = next(line for line in text.splitlines() if line.startswith("Ours against the paper"))
    assert "M: Mistral-7b-Instruct-v0.3, L: Llama-3.1-8B-Instruct)" in legend and "G:" not in legend
    res = _table2_results(with_norm=False)
    res["tasks"] = {"gsm8k": res["tasks"]["commonsense_qa"]}
    res["paired_vs_exact"] = {"gsm8k": res["paired_vs_exact"]["commonsense_qa"]}
    text = report.render(res)
    assert "(Table 3: Mistral-7b-Instruct-v0.3, Llama-3.1-8B-Instruct, Gemma2-2b-It;" in text
    assert "G: Gemma2-2b-It" in text and "Table 2" not in text.split("### GSM8K")[0]
    assert "Paper rows" not in report.render(_many_items(8) | {"tasks": {"winogrande": _many_items(8)["tasks"]["piqa"]},
                                                               "paired_vs_exact": {}})


def test_summary_says_what_ran_what_it_found_and_how_sure():
    res = _many_items(8)
    res["config"]["limit"] = 40
    text = report.render(res)
    assert text.index("### Summary") < text.index("### Run") < text.index("### Common-sense")
    summary = text.split("### Summary")[1].split("### Run")[0]
    assert "on 1 task (PIQA), 40 items (the first 40 of each task), under 2 arithmetic arms" in summary
    assert "`e5m2` +20.0 points [+" in summary and "a resolvable gain" in summary
    assert "With 40 items per task the pooled accuracy CIs are ±" in summary
    few = report.render(_many_items(2)).split("### Run")[0]
    assert "too few items to resolve (2 of 40 answers changed)" in few


def test_summary_orders_arms_by_kl_only_where_intervals_separate():
    res = _table5_results()
    text = report.render(res).split("### Run")[0]
    # KL 0.02, 0.03, ... with se 0.001: every neighbour is 95% apart
    assert "`e4m3` 0.02 < `e5m2` 0.03 < `lmul-k4` 0.04 < `lmul-k3` 0.05 < `lmul-k2` 0.06" in text
    res["divergence"]["mmlu"]["e5m2"]["kl_se"] = 0.01
    assert "`e4m3` 0.02 ≈ `e5m2` 0.03 ≈ `lmul-k4` 0.04 < `lmul-k3`" in report.render(res)


def _bars(results):
    """The bars and error bars accuracy.png draws, read back from the figure before it is closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    close = plt.close

    def keep(fig=None):
        figs.append(fig)
        close(fig)

    plt.close = keep
    try:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            report.plots(results, Path(d))
    finally:
        plt.close = close
    ax = figs[0].axes[0]
    heights = [r.get_height() for r in ax.patches]
    segs = [seg for coll in ax.collections if hasattr(coll, "get_segments") for seg in coll.get_segments()
            if len(seg) == 2 and seg[0][0] == seg[1][0]]  # vertical error-bar segments
    return ax, heights, segs


def _wilson_by_search(k, n, z=1.959963984540054):
    """Independent oracle: the p in [0, 1] (grid of 10^-6) where the score test does not reject."""
    import numpy as np

    p = np.linspace(0, 1, 1_000_001)
    ok = np.abs(k / n - p) <= z * np.sqrt(p * (1 - p) / n)
    return float(p[ok].min()), float(p[ok].max())


def test_accuracy_plot_draws_the_headline_metric_with_wilson_intervals():
    """OBQA-like: acc_norm 8/30 = 26.7% while acc is 3/30 = 10.0%; the table leads with acc_norm, so
    the bar must be 26.7, the axis must say which metric, and the interval must be Wilson's, inside
    [0, 100] (issue 25: the plot drew acc with ±1.96 se reaching below 0)."""
    n = 30
    items = [{"doc_id": i, "acc": float(i < 3), "acc_norm": float(i < 8), "lls": [0.0] * 4} for i in range(n)]
    zero = [{"doc_id": i, "acc": 0.0, "acc_norm": 0.0, "lls": [0.0] * 4} for i in range(n)]
    tasks = {"openbookqa": {"exact": {"n": n, "acc": 0.1, "se": 0.0557, "acc_norm": 8 / 30, "acc_norm_se": 0.08,
                                      "seconds": 1.0, "items": items},
                            "lmul": {"n": n, "acc": 0.0, "se": 0.0, "acc_norm": 0.0, "acc_norm_se": 0.0,
                                     "seconds": 1.0, "items": zero}}}
    res = {"config": {"arms": ["exact", "lmul"], "model": "m", "limit": 30, "div_limit": None, "seed": 0,
                      "tasks": ["openbookqa"], "device": "cpu"}, "seed": 0, "tasks": tasks, "divergence": {}}
    ax, heights, segs = _bars(res)
    assert heights == pytest.approx([100 * 8 / 30, 0.0])
    assert "acc_norm" in ax.get_ylabel() + " ".join(t.get_text() for t in ax.get_xticklabels())
    assert "Wilson" in ax.get_ylabel()
    spans = sorted((min(s[0][1], s[1][1]), max(s[0][1], s[1][1])) for s in segs)
    want = sorted(tuple(100 * v for v in _wilson_by_search(k, n)) for k in (8, 0))
    assert spans == [pytest.approx(w, abs=1e-3) for w in want]
    assert all(lo >= 0 and hi <= 100 for lo, hi in spans)


def test_paper_rows_render_for_tasks_the_paper_lacks():
    res = _results()  # MMLU only: in the layout of the paper's Table 2, where the paper has MMLU
    text = report.render(res)
    assert "### MMLU and common-sense reasoning (layout of the paper's Table 2)" in text and "Table 3)" not in text
    assert "| *paper: Mistral, bf16* | 62.20 |" in text
    res["tasks"]["winogrande"] = res["tasks"].pop("mmlu")  # a task the paper does not have: no paper rows
    assert "*paper" not in report.render(res)


def _table5_results():
    """MMLU, 4 items, the arms of the paper's Table 5; lmul-k2 swaps all four answers, the others none."""
    from lmul.eval.results import paired_vs_exact

    ref = [1, 1, 0, 0]
    arms = {"exact": ref, "e4m3": ref, "e5m2": ref, "lmul-k4": ref, "lmul-k3": ref, "lmul-k2": [0, 0, 1, 1]}
    tasks = {"mmlu": {a: {"n": 4, "acc": sum(v) / 4, "se": 0.25, "seconds": 1.0,
                          "items": [{"doc_id": i, "acc": float(x), "lls": [0.0] * 4, "subgroup": "law"}
                                    for i, x in enumerate(v)]} for a, v in arms.items()}}
    div = {"mmlu": {a: {"n": 4, "kl": 0.01 * (i + 1), "kl_se": 0.001, "top1": 0.9, "top1_se": 0.01, "ll_mean": -1.0,
                        "bpb": 1.0, "seconds": 1.0, "items": []} for i, a in enumerate(arms)}}
    return {"config": {"arms": list(arms), "model": "m", "limit": None, "div_limit": None, "seed": 0,
                       "tasks": ["mmlu"], "device": "cpu"}, "model_desc": "Tiny (x)",
            "seed": 0, "tasks": tasks, "paired_vs_exact": paired_vs_exact(tasks, 0), "divergence": div}


def test_mmlu_in_the_layout_of_table5():
    text = report.render(_table5_results())
    assert "### MMLU with k-bit operands (layout of the paper's Table 5)" in text
    lines = text.splitlines()
    i = lines.index("| model | exact (paper: BF16) | e4m3 | e5m2 | L-Mul k=4 | k=3 | k=2 |")
    assert lines[i + 2] == "| ours: Tiny | " + " | ".join(["50.0 ± 25.0"] * 6) + " |"
    # the paper's Table 5 rows; its BF16 MMLU is Table 2's
    assert lines[i + 3] == "| *paper: Mistral-7b-Instruct-v0.3* | 62.20 | 62.18 | 61.75 | 62.16 | 62.06 | 61.08 |"
    assert lines[i + 4] == "| *paper: Llama-3.1-8B-Instruct* | 68.86 | 68.16 | 66.61 | 68.43 | 68.12 | 66.67 |"
    ours = lines[i + 5]
    assert ours.startswith("| ours: arm − exact [95% CI] | | +0.0 [+0.0, +0.0] | ")
    # paper differences against BF16, never † here: four arms change no answer (CI [0, 0]) and k=2 swaps
    # only 4 (b + c < 6), so no comparison can place the paper's difference outside anything
    u = " *(too few items to resolve)*"
    assert lines[i + 6] == f"| *paper: Mistral arm − BF16* | | -0.02{u} | -0.45{u} | -0.04{u} | -0.14{u} | -1.12{u} |"
    assert lines[i + 7] == f"| *paper: Llama arm − BF16* | | -0.70{u} | -2.25{u} | -0.43{u} | -0.74{u} | -2.19{u} |"
    assert lines[i + 8].startswith("| ours: KL(exact ‖ arm), nats | | 0.02 ± 0.001 | 0.03 ± 0.001 | ")
    assert lines[i + 9].startswith("| ours: top-1 agreement | | 90.0 ± 1.0 |")
    res = _table5_results()  # no L-Mul k arm and no fp8 arm: no Table 5 layout
    for a in ("e4m3", "e5m2", "lmul-k4", "lmul-k3", "lmul-k2"):
        del res["tasks"]["mmlu"][a]
    assert "Table 5)" not in report.render(res)


def test_table2_avg_is_over_the_common_sense_tasks_when_mmlu_joins():
    res = _table2_results(with_norm=False)
    res["tasks"]["mmlu"] = {a: {"n": 2, "acc": 0.0, "se": 0.0, "seconds": 1.0,
                                "items": [{"doc_id": i, "acc": 0.0, "lls": [0.0] * 4} for i in range(2)]}
                            for a in ("exact", "e5m2", "lmul")}
    text = report.render(res)
    assert "| arm | MMLU | CSQA | PIQA | Avg |" in text and "Avg: the common-sense tasks only" in text
    assert "| exact | 0.0 ± 0.0 | 50.0 ± 10.0 | 50.0 ± 10.0 | 50.0 |" in text  # Avg of CSQA and PIQA
    assert "| *paper: Mistral, bf16* | 62.20 | 71.42 | 80.74 | |" in text


def test_wall_time_of_the_sessions():
    res = _results()
    assert "wall time" not in report.render(res)  # runs from before sessions were recorded
    res["sessions"] = [{"started": "a", "finished": "b", "wall_seconds": 60.0, "units": 2}]
    assert "; wall time 1.0 min\n" in report.render(res)
    res["sessions"].append({"started": "c", "finished": "d", "wall_seconds": 120.0, "units": 3})
    assert "; wall time 3.0 min in 2 processes (1.0, 2.0 min)\n" in report.render(res)


def test_divergence_table_gives_the_paired_bpb_difference():
    """Δ bpb vs exact: the mean of the per-item differences (matched by doc_id, not position) with a
    bootstrap CI around it; the exact row has none."""
    res = _table5_results()
    exact_bpb = [0.5, 0.7, 0.9, 1.1]
    shifted = [b + d for b, d in zip(exact_bpb, [0.1, 0.3, 0.2, 0.2], strict=True)]  # mean +0.2
    res["divergence"]["mmlu"]["exact"]["items"] = [{"doc_id": i, "bpb": b} for i, b in enumerate(exact_bpb)]
    res["divergence"]["mmlu"]["e4m3"]["items"] = [{"doc_id": i, "bpb": shifted[i]} for i in (3, 2, 1, 0)]
    rows = {r.split(" | ")[1]: r for r in report.render(res).splitlines() if r.startswith("| MMLU | ")}
    assert rows["exact"].endswith("| – |")
    cell = rows["e4m3"].split(" | ")[-1].rstrip(" |")
    diff, ci = cell.split(" ", 1)
    lo, hi = (float(x) for x in ci.strip("[]").split(", "))
    assert float(diff) == pytest.approx(0.2, abs=1e-4) and 0.1 <= lo < 0.2 < hi <= 0.3
    assert rows["e5m2"].endswith("| – |")  # no per-item records


def test_generation_agreement_matches_outputs_by_doc_id():
    """Greedy outputs compared with exact's item by item (by doc_id, not position): identical
    outputs, changed exact-match scores and mean length; the table lists exact without a count."""
    def entry(outs, accs, order):
        items = [{"doc_id": i, "acc": float(accs[i]), "output": outs[i]} for i in order]
        return {"n": len(items), "acc": sum(accs) / len(accs), "se": 0.0, "seconds": 1.0, "items": items}
    exact = ["a. So the answer is 3.", "b", "So the answer is 7.", "dd"]
    lmul_out = ["a. So the answer is 3.", "b!", "So the answer is 8.", "dd"]
    res = _results()
    res["config"]["arms"], res["config"]["tasks"] = ["exact", "lmul"], ["gsm8k"]
    res["tasks"] = {"gsm8k": {"exact": entry(exact, [1, 0, 1, 0], range(4)),
                              "lmul": entry(lmul_out, [1, 0, 0, 0], (3, 1, 0, 2))}}
    g = report.generation_agreement(res, "gsm8k", "lmul")
    assert g == {"n": 4, "identical": 2, "score_changed": 1, "mean_chars": pytest.approx(sum(map(len, lmul_out)) / 4)}
    assert report.generation_agreement(res, "gsm8k", "e4m3") is None
    assert report.generation_agreement(_results(), "mmlu", "lmul") is None  # no outputs: not a generation task
    text = report.render(res)
    assert "### Greedy generations against the exact model's" in text
    assert "| GSM8K | lmul | 4 | 2 / 4 | 1 | 11 |" in text and "| GSM8K | exact | 4 | – | – | 11 |" in text
    assert "### Greedy generations" not in report.render(_results())


def test_scaled_operands_table_names_format_scaling_and_product():
    """Issue 27: with a scaled arm in the run, one row per arm: operands, scaling, product, the pooled
    acc change against exact, mean KL and top-1; without one, no such section."""
    from lmul.eval.results import paired_vs_exact

    res = _table5_results()
    assert "### Scaled operands" not in report.render(res)
    for a, kl in (("e4m3-mx", 0.5), ("lmul-mxfp4", 0.25)):
        res["config"]["arms"].append(a)
        res["tasks"]["mmlu"][a] = res["tasks"]["mmlu"]["lmul-k2"]
        res["divergence"]["mmlu"][a] = dict(res["divergence"]["mmlu"]["e4m3"], kl=kl, top1=0.5)
    res["paired_vs_exact"] = paired_vs_exact(res["tasks"], 0)
    text = report.render(res)
    assert "### Scaled operands (fp8 / fp4 as really run)" in text
    rows = {r.split(" | ")[0][2:]: r for r in text.split("### Scaled operands")[1].split("###")[0].splitlines()
            if r.startswith("| ") and not r.startswith("| arm") and not r.startswith("|---")}
    assert list(rows) == ["e4m3", "e5m2", "lmul-k4", "lmul-k3", "lmul-k2", "e4m3-mx", "lmul-mxfp4"]
    assert rows["e4m3"] == "| e4m3 | fp8 e4m3 | none | exact | +0.0 [+0.0, +0.0] (0/0) | 0.02 ± 0.001 | 90.0 |"
    assert rows["lmul-k3"].startswith("| lmul-k3 | e8m3 (k=3), trunc | none | L-Mul | ")
    # lmul-k2's answers (exact 1100, arm 0011): two items lost, two gained
    assert rows["e4m3-mx"].startswith("| e4m3-mx | fp8 e4m3 | per 32 along K (MX) | exact | +0.0 [")
    assert rows["e4m3-mx"].endswith("(2/2) | 0.5 ± 0.001 | 50.0 |")
    assert rows["lmul-mxfp4"].startswith("| lmul-mxfp4 | fp4 e2m1 | per 32 along K (MX) | L-Mul | ")
