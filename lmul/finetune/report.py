"""``results.json``, ``report.md`` and ``loss_curve.png`` of a fine-tuning run (:mod:`lmul.finetune.run`),
assembled from the files the run writes; ``lmul report <out>`` rebuilds them.

Paired comparisons (:mod:`lmul.eval.stats`) are on the same held-out items: bits per byte with the
paired bootstrap, exact match with the paired bootstrap and McNemar's exact test. The paper's
Table 6 (Gemma2-2b-It fine-tuned on GSM8k's train split, zero-shot GSM8k accuracy; ``lmul.eval.paper``)
prints no unquantized row, so its differences are against its e4m3 column, as ours beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmul.eval import stats, store
from lmul.eval.paper import PAPER
from lmul.files import atomic_write, save_figure, write_json
from lmul.spec import PRESETS

PAPER_ARM = {"e4m3-all": "e4m3", "e5m2-all": "e5m2", "lmul-all-k3": "lmul-all"}  # ours -> Table 6's column
T6_REF = "e4m3-all"
READINGS = ("-p", "-row", "-mx", "-row-sacc")  # other readings of a Table 6 arm (lmul.spec.PRESETS): <arm><suffix>


def _family(arm: str) -> tuple[str, str]:
    """``(Table 6 arm, reading suffix)``: ``"lmul-all-k3-p"`` -> ``("lmul-all-k3", "-p")``."""
    for suf in READINGS:
        if arm.endswith(suf) and arm[:-len(suf)] in PAPER_ARM:
            return arm[:-len(suf)], suf
    return arm, ""


def _t6_ref(arm: str) -> str:
    """The e4m3 arm an arm is compared with: the one of the same reading (``e4m3-all-p`` for ``-p``)."""
    return T6_REF + _family(arm)[1]


def _read(path: Path) -> Optional[dict]:
    return store.read_json(path) if path.exists() else None


def _scores(ev: Optional[dict], key: str) -> Optional[dict[int, float]]:
    """Item id -> ``key`` of an evaluation file."""
    if not ev:
        return None
    rows = ev["gold"] if key in ("loss", "bpb") else ev["gen"]
    return {r["id"]: r[key] for r in rows} or None


def _paired(a: Optional[dict], b: Optional[dict], seed: int) -> Optional[dict]:
    """Paired comparison b - a on the items both evaluated (a reading covers the first items only)."""
    if a is None or b is None:
        return None
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    p = stats.paired([a[i] for i in ids], [b[i] for i in ids], iters=10_000, seed=seed)
    return {"diff": p.diff, "lo": p.lo, "hi": p.hi, "n": p.n, "b": p.b, "c": p.c, "p_mcnemar": p.p_mcnemar}


def assemble(out: Path) -> dict:
    """Everything a report shows, from ``config.json``, ``base/``, ``arms/*/`` and ``readings/``."""
    out = Path(out)
    meta = store.read_json(out / "config.json")
    seed = meta["config"]["seed"]
    arms = meta["config"]["arms"]
    base = {p.stem.removeprefix("eval_"): store.read_json(p) for p in sorted((out / "base").glob("eval_*.json"))}
    res = {"config": meta, "base": {}, "arms": {}, "readings": {}}
    ref_bpb = _scores(base.get("exact"), "bpb")
    for name, ev in base.items():
        res["base"][name] = {"loss": ev["loss"], "bpb": ev["bpb"], "em": ev["em"], "wall_s": ev["wall_s"],
                             "bpb_vs_exact": None if name == "exact" else _paired(ref_bpb, _scores(ev, "bpb"), seed)}
    exact_ft = _read(out / "arms" / "exact" / "eval_exact.json")
    same_evs = {}  # arm -> its evaluation under its own arithmetic (exact's: exact), for the Table 6 comparison
    for arm in arms:
        d = out / "arms" / arm
        train = _read(d / "train.json")
        same = _read(d / "eval_same.json") or (_read(d / "eval_exact.json") if arm == "exact" else None)
        exact = _read(d / "eval_exact.json")
        if train is None and same is None:
            continue
        same_evs[arm] = same
        row = {"train": None if train is None else {k: train.get(k) for k in ("steps", "train_wall_s", "train_loss",
                                                                               "resumed_from", "n_train", "log",
                                                                               "skipped_steps")}}
        for which, ev in (("same", same), ("exact", exact)):
            if ev is None:
                row[which] = None
                continue
            ref = exact_ft if not (arm == "exact" and which == "exact") else None  # not the reference itself
            row[which] = {"loss": ev["loss"], "bpb": ev["bpb"], "em": ev["em"], "wall_s": ev["wall_s"],
                          "bpb_vs_exact_ft": _paired(_scores(ref, "bpb"), _scores(ev, "bpb"), seed),
                          "em_vs_exact_ft": _paired(_scores(ref, "em"), _scores(ev, "em"), seed)}
        res["arms"][arm] = row
    for arm, row in res["arms"].items():
        ref_ev = same_evs.get(_t6_ref(arm))
        if row.get("same") is not None and ref_ev is not None and arm != _t6_ref(arm):
            ev = same_evs[arm]
            row["same"]["vs"] = _t6_ref(arm)
            row["same"]["em_vs_e4m3"] = _paired(_scores(ref_ev, "em"), _scores(ev, "em"), seed)
            row["same"]["bpb_vs_e4m3"] = _paired(_scores(ref_ev, "bpb"), _scores(ev, "bpb"), seed)
    reads = {p.stem: store.read_json(p) for p in sorted((out / "readings").glob("*.json"))} \
        if (out / "readings").is_dir() else {}
    for stem, ev in reads.items():
        ref_read = reads.get(f"{_t6_ref(ev['arm'])}-x{ev['acc_block']}")  # e4m3 of the same reading and block
        res["readings"][stem] = {"arm": ev["arm"], "acc_block": ev["acc_block"], "loss": ev["loss"],
                                 "bpb": ev["bpb"], "wall_s": ev["wall_s"],
                                 "bpb_vs_exact": _paired(ref_bpb, _scores(ev, "bpb"), seed),
                                 "bpb_vs_e4m3": None if ref_read is None or ref_read is ev else
                                 _paired(_scores(ref_read, "bpb"), _scores(ev, "bpb"), seed)}
    res["pattern"] = _pattern(same_evs, reads, seed)
    return res


PATTERN_ARMS = ("e4m3-all", "lmul-all-k3", "e5m2-all")  # paper Table 6: e4m3 36.09 ≈ L-Mul 37.91 ≫ e5m2 7.96
SHORT = {"e4m3-all": "e4m3", "lmul-all-k3": "L-Mul", "e5m2-all": "e5m2"}


def _pattern(same_evs: dict, reads: dict, seed: int) -> list[dict]:
    """Per reading (literal, ``-p``, ``-row``, ``-mx``, ``-row-sacc``) and source (the fine-tuned models
    under their own arithmetic; the base model's reading at the arm's own block), when all three Table 6
    arms have it: the three paired bpb differences, the order of the arms (``<`` where the paired 95% CI
    excludes 0, ``≈`` where it does not) and whether the paper's pattern holds: e5m2 worse than both
    e4m3 and L-Mul, each resolvably (the paper's e5m2 is 28 points below both)."""
    rows = []
    for suf in ("", *READINGS):
        names = [a + suf for a in PATTERN_ARMS]
        if not all(n in PRESETS for n in names):
            continue
        sources = (("fine-tuned", [same_evs.get(n) for n in names]),
                   ("base model", [reads.get(f"{n}-x{_own_block(n)}") for n in names]))
        for source, evs in sources:
            if all(evs):
                rows.append({"reading": suf or "literal", "source": source, **_order(evs, seed)})
    return rows


def _own_block(arm: str) -> object:
    """The reading block of an arm's own arithmetic: its acc_block, or "none" (float32 sums)."""
    kw = PRESETS[arm][0]
    return kw.get("acc_block", 1) if kw.get("acc") else "none"


def _order(evs: list, seed: int) -> dict:
    sc = {SHORT[a]: _scores(ev, "bpb") for a, ev in zip(PATTERN_ARMS, evs, strict=True)}
    mean = {k: sum(v.values()) / len(v) for k, v in sc.items()}
    diffs = {f"{b} − {a}": _paired(sc[a], sc[b], seed)
             for a, b in (("e4m3", "e5m2"), ("e4m3", "L-Mul"), ("e5m2", "L-Mul"))}
    order = sorted(mean, key=mean.get)
    text = order[0]
    for a, b in zip(order, order[1:], strict=False):
        p = diffs.get(f"{b} − {a}") or diffs.get(f"{a} − {b}")
        text += (" ≈ " if p is None or p["lo"] <= 0 <= p["hi"] else " < ") + b
    worst = diffs["e5m2 − e4m3"]["lo"] > 0 and diffs["L-Mul − e5m2"]["hi"] < 0
    lm = diffs["L-Mul − e4m3"]
    verdict = ("no" if not worst else "holds: e4m3 ≈ L-Mul ≫ e5m2" if lm["lo"] <= 0 <= lm["hi"]
               else "in part: e5m2 worst, L-Mul resolvably behind e4m3")
    return {"n": len(sc["e4m3"]), "order": text, "diffs": diffs, "holds": worst, "verdict": verdict,
            "gap_ratio": lm["diff"] / diffs["e5m2 − e4m3"]["diff"]}


def _m(s: Optional[dict], scale: float = 1.0, digits: int = 3) -> str:
    if not s:
        return "n/a"
    se = s.get("se")
    tail = f" ± {se * scale:.{digits}f}" if se == se and se is not None else ""
    return f"{s['mean'] * scale:.{digits}f}{tail}"


def _d(p: Optional[dict], scale: float = 1.0, digits: int = 3) -> str:
    if not p:
        return "n/a"
    txt = f"{p['diff'] * scale:+.{digits}f} [{p['lo'] * scale:+.{digits}f}, {p['hi'] * scale:+.{digits}f}]"
    if p.get("b", -1) >= 0:
        txt += f" (b={p['b']}, c={p['c']}, p={p['p_mcnemar']:.2g})"
    return txt


def render(res: dict) -> str:
    meta = res["config"]
    cfg = meta["config"]
    L = ["# Fine-tuning with L-Mul in every multiplication (paper Table 6)", ""]
    L.append(f"Model: {meta.get('model_desc', cfg['model'])}. Data: GSM8K ({meta['split']['rule']}): "
             f"{cfg['n_train']} training items, {cfg['n_eval']} held-out items for loss and bits per byte, the "
             f"first {cfg['n_gen']} of them for greedy zero-shot exact match (up to {cfg['max_new_tokens']} new "
             f"tokens). The paper fine-tunes Gemma2-2b-It on GSM8k's train split and tests on its test split; "
             f"no GSM8k train split is on the package registries, so this run trains and tests on disjoint "
             f"parts of the test split.")
    L.append("")
    L.append(f"Training: transformers Trainer, AdamW, lr {cfg['lr']}, linear schedule with {cfg['warmup_steps']} "
             f"warmup steps, batch {cfg['batch_size']} × accumulation {cfg['grad_accum']}, {cfg['epochs']} "
             f"epoch(s), seed {cfg['seed']}, max length {cfg['max_length']} tokens, device {cfg['device']}.")
    L.append("")
    L.append("Arms (every multiplication: linear layers, attention matmuls, element-wise products, norm scales, "
             "rotary):")
    L.append("")
    for arm, spec in meta["arm_specs"].items():
        if spec == "exact":
            L.append(f"- `{arm}`: float32, unpatched")
        else:
            s = spec["spec"]
            acc = f", accumulator {s['acc']} rounded every {s['acc_block']} products" if _has_acc(spec) else ""
            if s.get("acc_tile"):
                acc += f", one accumulator scale per {s['acc_tile']} × {s['acc_tile']} output tile"
            scaled = f" scaled per {s['scaling']}" if s.get("scaling", "none") != "none" else ""
            L.append(f"- `{arm}`: `{s['name']}` ({s['mode']} mode on {s['fmt']} operands{scaled}{acc}; gradients: "
                     f"{s['backward']})")
    L += ["", "## Paper Table 6 beside ours", ""]
    L.append("GSM8k zero-shot exact match, %, after fine-tuning, evaluated under the arithmetic it was trained "
             "with. Paper: Gemma2-2b-It (`shared/PAPER.md`); ours: this run, ± standard error; Δ: against the "
             "e4m3 column (the paper prints no unquantized row), ours with its paired 95% bootstrap CI, against "
             "the e4m3 arm of the same reading (`e4m3-all`; `e4m3-all-p` for the `-p` arms, `e4m3-all-row` for "
             "`-row`, `e4m3-all-mx` for `-mx`, `e4m3-all-row-sacc` for `-row-sacc`).")
    L.append("")
    L.append("| arm | paper | paper Δ vs e4m3 | ours, EM % | ours Δ EM vs e4m3-all (same reading) | ours, bits per "
             "byte | ours Δ bpb vs e4m3-all (same reading) |")
    L.append("|---|---|---|---|---|---|---|")
    p_ref = PAPER.get(("table6", "gemma2", "e4m3", "gsm8k"))
    all_zero = True
    for arm, row in res["arms"].items():
        pa = PAPER.get(("table6", "gemma2", PAPER_ARM.get(_family(arm)[0], ""), "gsm8k"))
        pd = "" if pa is None or _family(arm)[0] == T6_REF else f"{pa - p_ref:+.2f}"
        same = row.get("same") or {}
        em = same.get("em")
        all_zero &= bool(em) and em["mean"] == 0
        ref = arm == _t6_ref(arm)
        L.append(f"| {arm} | {pa if pa is not None else '—'} | {pd} | {_m(em, 100, 1)} | "
                 f"{'' if ref else _d(same.get('em_vs_e4m3'), 100, 1)} | {_m(same.get('bpb'))} | "
                 f"{'' if ref else _d(same.get('bpb_vs_e4m3'))} |")
    if all_zero and res["arms"]:
        L += ["", f"No arm answers any of the {cfg['n_gen']} exact-match items correctly (zero-shot, after "
              f"{cfg['n_train']} training items), so exact match cannot rank the arms here; the gold answers' "
              f"bits per byte (lower is better) can."]
    if res.get("pattern"):
        L += ["", "## The paper's pattern, reading by reading", ""]
        L.append("Paper (Table 6, Gemma2-2b-It GSM8k): e4m3 36.09 ≈ L-Mul 37.91 ≫ e5m2 7.96. Ours: held-out bits "
                 "per byte (lower is better) of the three Table 6 arms of each reading, fine-tuned (under their own "
                 "arithmetic) and the base model's reading at the arm's own accumulator block; order by mean bpb, "
                 "`<` where the paired 95% bootstrap CI excludes 0, `≈` where it does not. The pattern *holds* "
                 "when e5m2 is resolvably worse than both e4m3 and L-Mul and L-Mul − e4m3 is not resolvable; "
                 "*gap ratio*: (L-Mul − e4m3) / (e5m2 − e4m3), the paper's (36.09 − 37.91) / (36.09 − 7.96) = "
                 "−0.06 in accuracy.")
        L.append("")
        L.append("| reading | source | items | e5m2 − e4m3 | L-Mul − e4m3 | L-Mul − e5m2 | order, best first "
                 "| gap ratio | paper's pattern |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in res["pattern"]:
            d = r["diffs"]
            L.append(f"| {r['reading']} | {r['source']} | {r['n']} | {_d(d['e5m2 − e4m3'])} | "
                     f"{_d(d['L-Mul − e4m3'])} | {_d(d['L-Mul − e5m2'])} | {r['order']} | {r['gap_ratio']:+.2f} | "
                     f"{r['verdict']} |")
    L += ["", "## Every arm: training damage and inference damage apart", ""]
    L.append("Steps: optimizer steps (skipped: steps whose gradients were not finite, not applied). "
             "Held-out gold-answer loss (nats/token), bits per byte and exact match of each fine-tuned model under "
             "its own arithmetic (`same`) and under exact float32 arithmetic (`exact`); Δ bpb against the model "
             "fine-tuned with exact arithmetic, evaluated exactly (paired bootstrap 95% CI).")
    L.append("")
    L.append("| arm | steps | train wall s | eval | loss | bpb | Δ bpb vs exact-ft | EM % |")
    L.append("|---|---|---|---|---|---|---|---|")
    for arm, row in res["arms"].items():
        tr = row.get("train") or {}
        for which in ("same", "exact"):
            ev = row.get(which)
            if ev is None or (arm == "exact" and which == "same"):
                continue
            steps = f"{tr.get('steps', '')}" + (f" ({tr['skipped_steps']} skipped)" if tr.get("skipped_steps") else "")
            L.append(f"| {arm} | {steps} | {tr.get('train_wall_s', 0):.0f} | {which} | "
                     f"{_m(ev['loss'])} | {_m(ev['bpb'])} | {_d(ev.get('bpb_vs_exact_ft'))} | "
                     f"{_m(ev.get('em'), 100, 1)} |")
    if res["base"]:
        L += ["", "## Before fine-tuning", ""]
        L.append("The base model on the same held-out items, under exact arithmetic and under each arm's "
                 "arithmetic (inference only): Δ bpb against exact, paired bootstrap 95% CI.")
        L.append("")
        L.append("| arithmetic | loss | bpb | Δ bpb vs exact | EM % |")
        L.append("|---|---|---|---|---|")
        for name, b in res["base"].items():
            L.append(f"| {name} | {_m(b['loss'])} | {_m(b['bpb'])} | {_d(b.get('bpb_vs_exact'))} | "
                     f"{_m(b.get('em'), 100, 1)} |")
    if res["readings"]:
        L += ["", "## What \"8-bit accumulation\" means: the readings at inference", ""]
        L.append("The base model's held-out loss under each arm with the accumulator rounded every 1, 16 or 128 "
                 "products, only once at the output (`out`: the float32 sum rounded to the format), or never "
                 "(`none`: float32 sums, the operand format alone); Δ bpb against the base model under exact "
                 "arithmetic on the same items, and against the e4m3 arm of the same reading and block. The arms "
                 "of this run use acc block "
                 f"{_arm_blocks(meta)}." + (" Arms with scaled operands and float32 sums (`-row`, `-mx`) are read "
                                            "once, under their own arithmetic, as `none`." if any(
                                                _family(r["arm"])[1] in ("-row", "-mx")
                                                for r in res["readings"].values()) else ""))
        L.append("")
        L.append("| arm | acc block | loss | bpb | Δ bpb vs exact | Δ bpb vs e4m3 | wall s |")
        L.append("|---|---|---|---|---|---|---|")
        for r in sorted(res["readings"].values(), key=lambda r: (r["arm"], _block_key(r["acc_block"]))):
            L.append(f"| {r['arm']} | {r['acc_block']} | {_m(r['loss'])} | {_m(r['bpb'])} | "
                     f"{_d(r.get('bpb_vs_exact'))} | {_d(r.get('bpb_vs_e4m3')) if r.get('bpb_vs_e4m3') else ''} | "
                     f"{r['wall_s']:.0f} |")
    L += ["", "Loss curves: `loss_curve.png`. Every number: `results.json`. Config, versions, seed and the split's "
          "item ids: `config.json`.", ""]
    return "\n".join(L)


def _has_acc(spec: dict) -> bool:
    return spec["spec"].get("acc") not in (None, "fp32")


def _arm_blocks(meta: dict) -> str:
    blocks = sorted({s["spec"]["acc_block"] for s in meta["arm_specs"].values() if s != "exact" and _has_acc(s)})
    return ", ".join(map(str, blocks)) or "n/a"


def _block_key(b) -> int:
    return {"out": 1 << 40, "none": 1 << 41}.get(b) or int(b)


def plot(res: dict, out: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drew = False
    for arm, row in res["arms"].items():
        log = (row.get("train") or {}).get("log") or []
        if log:
            ax.plot([h["step"] for h in log], [h["loss"] for h in log], marker=".", label=arm)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Fine-tuning on GSM8K with every multiplication under each arm")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(out) / "loss_curve.png"
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def is_finetune_run(folder: Path) -> bool:
    p = Path(folder) / "config.json"
    try:
        return p.exists() and store.read_json(p).get("kind") == "finetune"
    except (store.CorruptFile, AttributeError):
        return False


def build(out: Path, reassemble: bool = True) -> Path:
    """(Re)build ``results.json`` (from the run's files; ``reassemble=False``: use it as is),
    ``report.md`` and ``loss_curve.png`` of the run in ``out``."""
    out = Path(out)
    if reassemble or not (out / "results.json").exists():
        res = assemble(out)
        write_json(out / "results.json", res)
    else:
        res = store.read_json(out / "results.json")
    plot(res, out)
    atomic_write(out / "report.md", render(res))
    return out / "report.md"
