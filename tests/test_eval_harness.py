"""Per-item records from lm-eval's logged samples (hand-made samples in lm-eval's log format)."""

from __future__ import annotations

from lmul.eval import harness
from lmul.eval.tasks import TASKS


def _sample(doc_id, doc, args, target, acc, lls):
    return {"doc_id": doc_id, "doc": doc, "arguments": args, "target": target, "acc": acc,
            "resps": [[[ll, False]] for ll in lls]}


def test_mc_records_gold_and_subject():
    args = [("Q?\nAnswer:", " A"), ("Q?\nAnswer:", " B")]
    s = [_sample(1, {"subject": "anatomy"}, args, 1, 1.0, [-3.0, -1.0]),
         _sample(0, {"subject": "virology"}, args, 0, 0.0, [-2.0, -0.5])]
    recs = harness.item_records(TASKS["mmlu"], s)
    assert [r["doc_id"] for r in recs] == [0, 1]
    assert recs[0] == {"doc_id": 0, "context": "Q?\nAnswer:", "gold": " A", "subgroup": "virology", "acc": 0.0,
                       "lls": [-2.0, -0.5]}
    assert recs[1]["gold"] == " B" and recs[1]["subgroup"] == "anatomy"
    assert "subgroup" not in harness.item_records(TASKS["piqa"], s)[0]


def test_multiple_input_gold_comes_from_the_answer_field():
    """WinoGrande: lm-eval logs the shared continuation as the target; the gold prefix is ``answer``."""
    args = [("Ann thanked Bea because Ann", " had helped her."), ("Ann thanked Bea because Bea", " had helped her.")]
    s = [_sample(0, {"answer": "2"}, args, "had helped her.", 1.0, [-9.0, -4.0])]
    (rec,) = harness.item_records(TASKS["winogrande"], s)
    assert rec["context"] == "Ann thanked Bea because Bea" and rec["gold"] == " had helped her."
