"""``results.json``: a run's per-(arm, task) parts assembled into accuracies with standard errors,
paired comparisons against ``exact`` (bootstrap CIs, McNemar) and divergence summaries, together with
the config, versions and seed. Rendering it is :mod:`lmul.eval.report`'s job."""

from __future__ import annotations

import math
from pathlib import Path

from lmul.eval import stats, store

__all__ = ["assemble", "paired_vs_exact", "headline", "BOOT_ITERS"]

BOOT_ITERS = 10_000


def headline(task_entries: dict) -> str:
    """The metric a task's table leads with: ``acc_norm`` where lm-eval defines it for the task (every
    arm has it: ARC, OBQA, PIQA, HellaSwag), else ``acc``."""
    return "acc_norm" if task_entries and all("acc_norm" in e for e in task_entries.values()) else "acc"


def paired_vs_exact(tasks: dict, seed: int, metric: str = "acc") -> dict:
    """{task: {arm: paired difference of ``metric`` against exact}} over the items both arms scored
    (bootstrap CI with ``BOOT_ITERS`` resamples and ``seed``, McNemar's exact p)."""
    paired: dict = {}
    for task, arms in tasks.items():
        if "exact" not in arms or any(metric not in it for it in arms["exact"]["items"]):
            continue
        base = {it["doc_id"]: it[metric] for it in arms["exact"]["items"]}
        for arm, entry in arms.items():
            if arm == "exact" or any(metric not in it for it in entry["items"]):
                continue
            ids = [it["doc_id"] for it in entry["items"] if it["doc_id"] in base]
            mine = {it["doc_id"]: it[metric] for it in entry["items"]}
            p = stats.paired([base[i] for i in ids], [mine[i] for i in ids], BOOT_ITERS, seed)
            paired.setdefault(task, {})[arm] = {"diff": p.diff, "lo": p.lo, "hi": p.hi, "n": p.n,
                                                "b": p.b, "c": p.c, "p_mcnemar": p.p_mcnemar}
    return paired


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
    paired = paired_vs_exact(tasks, seed, "acc")
    paired_norm = paired_vs_exact(tasks, seed, "acc_norm")
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
    results = {**meta, "seed": seed, "tasks": tasks, "paired_vs_exact": paired,
               "paired_vs_exact_norm": paired_norm, "divergence": div,
               "bootstrap_iters": BOOT_ITERS}
    store.write_json(run_dir / "results.json", results)
    return results
