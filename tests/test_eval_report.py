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
