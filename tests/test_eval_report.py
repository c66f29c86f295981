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
