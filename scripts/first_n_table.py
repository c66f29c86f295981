"""Put arms of different `lmul eval` runs side by side on the same first items (issue 27).

The committed full run (every item) holds per-item records; this keeps only the items with doc_id
< N (accuracy) and < M (divergence) of each task, recomputes each arm's pooled acc change against
that run's own `exact` (the report's paired bootstrap), mean KL(exact ‖ arm) and mean top-1
agreement over the tasks, and prints the rows of the report's "Scaled operands" table.

    python scripts/first_n_table.py --limit 50 --div-limit 40 \
        docs/results/smollm2-commonsense-full docs/results/smollm2-commonsense-scaled
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from lmul.eval import report, store


def first_n(results: dict, n: int, m: int) -> dict:
    """``results`` with only doc_id < n per accuracy task and doc_id < m per divergence task."""
    out = dict(results, tasks={}, divergence={})
    for t, arms in results["tasks"].items():
        out["tasks"][t] = {a: dict(e, items=[i for i in e["items"] if i["doc_id"] < n]) for a, e in arms.items()}
    for t, arms in (results.get("divergence") or {}).items():
        out["divergence"][t] = {}
        for a, e in arms.items():
            items = [i for i in e["items"] if i["doc_id"] < m]
            kl, top = np.array([i["kl"] for i in items]), np.array([i["top1"] for i in items])
            se = (lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0)
            out["divergence"][t][a] = dict(e, items=items, n=len(items), kl=float(kl.mean()), kl_se=se(kl),
                                           top1=float(top.mean()), top1_se=se(top))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (results.json or results.json.gz)")
    ap.add_argument("--limit", type=int, required=True)
    ap.add_argument("--div-limit", type=int, required=True)
    a = ap.parse_args()
    header = None
    for run in a.runs:
        f = run / "results.json" if (run / "results.json").exists() else run / "results.json.gz"
        res = first_n(store.read_json(f), a.limit, a.div_limit)
        ns = {t: len(e["exact"]["items"]) for t, e in res["tasks"].items()}
        ms = {t: e["exact"]["n"] for t, e in res["divergence"].items()}
        print(f"<!-- {run.name}: accuracy items per task {ns}; divergence items per task {ms} -->")
        lines = report._scaled_table(res, always=True)
        rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| arm ")]
        if header is None:
            header = [ln for ln in lines if ln.startswith("| arm ") or ln.startswith("|---")]
            print("\n".join(header))
        for r in rows:
            print(r.replace("| ", f"| {run.name}: ", 1))


if __name__ == "__main__":
    main()
