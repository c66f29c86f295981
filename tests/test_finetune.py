"""lmul.finetune: the GSM8K split and encoding, a full run on a tiny random Llama (every arm, the
report), resume after a kill ending in the same weights, the readings, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os

import pytest
import torch

from lmul.finetune import data
from lmul.finetune.report import assemble, build, is_finetune_run, render
from lmul.finetune.run import FinetuneConfig, _Interrupt, readings, run
from tests._eval_fixtures import tiny_llama, tiny_tokenizer

QA = [("Kai has 2 and gets 1. How many?", "2 + 1 = 3.", "3"), ("Sam has 4 and loses 1. How many?", "4 - 1 = 3.", "3"),
      ("Ann has 5 and gets 2. How many?", "5 + 2 = 7.", "7"), ("Bea has 6, eats 6. How many?", "6 - 6 = 0.", "0"),
      ("Two twos?", "2 * 2 = 4.", "4"), ("Ten less one?", "10 - 1 = 9.", "9"), ("One and one?", "1 + 1 = 2.", "2"),
      ("Three threes?", "3 * 3 = 9.", "9")]
ITEMS = [data.Item(i, QA[i % len(QA)][0], f"{QA[i % len(QA)][1]} So the answer is {QA[i % len(QA)][2]}.",
                   QA[i % len(QA)][2]) for i in range(24)]
SMALL = dict(n_train=6, n_eval=4, n_gen=2, max_new_tokens=6, batch_size=2, max_length=64, save_steps=1,
             warmup_steps=1, lr=1e-3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def loader_for(tok):
    def loader():
        return tiny_llama(len(tok)), tok, "tiny-llama"
    return loader


# ---- data --------------------------------------------------------------------------------------

def test_split_is_disjoint_and_follows_the_rule():
    train, held = data.split(ITEMS)
    assert {it.id for it in held} == {i for i in range(24) if i % 4 == 0}
    assert {it.id for it in train} == {i for i in range(24) if i % 4 != 0}
    assert not {it.id for it in train} & {it.id for it in held}


def test_load_reads_the_request_dump(tmp_path):
    path = tmp_path / data.REQUESTS
    path.parent.mkdir(parents=True)
    rows = [{"doc_id": i, "doc": {"question": f"q{i}", "choices": [f"c{i} So the answer is {i}."],
                                  "short_answer": i}} for i in (2, 0, 1)]
    rows.append(dict(rows[0]))  # a request repeated for another few-shot set: one item
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    items = data.load(tmp_path)
    assert [(it.id, it.question, it.short) for it in items] == [(0, "q0", "0"), (1, "q1", "1"), (2, "q2", "2")]
    with pytest.raises(FileNotFoundError, match="lmul fetch"):
        data.load(tmp_path / "missing")


def test_encode_masks_the_prompt(tok):
    it = ITEMS[1]
    e = data.encode(tok, it, 256)
    p = tok(it.prompt)["input_ids"]
    a = tok(" " + it.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e["input_ids"] == p + a
    assert e["labels"] == [-100] * len(p) + a
    assert e["n_bytes"] == len((" " + it.answer).encode("utf-8"))
    with pytest.raises(ValueError, match="max_length"):
        data.encode(tok, it, len(p))


@pytest.mark.parametrize("text,gold,ok", [
    (" 2 + 1 = 3. So the answer is 3.", "3", True), (" So the answer is $1,200.", "1200", True),
    (" So the answer is 3.5.", "3.5", True), (" So the answer is 4.", "3", False), (" it is 3", "3", False),
    (" 1 + 1.\n\nQuestion: So the answer is 3.", "3", False), (" So the answer is -2.", "-2", True)])
def test_exact_match(text, gold, ok):
    assert data.correct(text, data.Item(0, "q", "a", gold)) is ok


def test_collate_pads_right(tok):
    enc = [data.encode(tok, it, 64) for it in ITEMS[:3]]
    b = data.collate(0)(enc)
    for i, e in enumerate(enc):
        k = len(e["input_ids"])
        assert b["input_ids"][i, :k].tolist() == e["input_ids"] and b["attention_mask"][i].sum() == k
        assert (b["labels"][i, k:] == -100).all()


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [(dict(arms=("nope",)), "unknown arm"), (dict(arms=()), "no arms"),
                                    (dict(arms=("exact", "exact")), "repeated"), (dict(n_train=0), "n_train"),
                                    (dict(n_gen=9, n_eval=4), "n_gen"), (dict(lr=0.0), "lr"),
                                    (dict(backward="sideways"), "backward")])
def test_config_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FinetuneConfig(**kw)


def test_arm_config_overrides():
    cfg = FinetuneConfig(acc_block=7, backward="same")
    assert cfg.arm_config("exact") is None
    for arm in ("e4m3-all", "e5m2-all", "lmul-all-k3"):
        c = cfg.arm_config(arm)
        assert c.placement.scope == "all" and c.spec.acc_block == 7 and c.spec.backward == "same"
    assert FinetuneConfig().arm_config("lmul-all-k3").spec.fmt.man_bits == 3


# ---- a whole run -------------------------------------------------------------------------------

def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("ft")
    cfg = FinetuneConfig(arms=("exact", "lmul-all-k3"), **SMALL)
    run(cfg, out, loader=loader_for(tok), items=ITEMS)
    return cfg, out


def test_run_writes_every_part(full_run):
    cfg, out = full_run
    for f in ("config.json", "base/eval_exact.json", "base/eval_lmul-all-k3.json", "arms/exact/train.json",
              "arms/exact/eval_exact.json", "arms/lmul-all-k3/eval_same.json", "arms/lmul-all-k3/eval_exact.json"):
        assert (out / f).is_file(), f
    assert not (out / "arms" / "lmul-all-k3" / "checkpoints").exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "finetune" and "finished" in meta and meta["config"]["seed"] == cfg.seed
    assert meta["split"]["held_out_ids"] == [0, 4, 8, 12]
    tr = json.loads((out / "arms" / "lmul-all-k3" / "train.json").read_text())
    assert tr["steps"] == 3 and len(tr["log"]) == 3 and all(math.isfinite(h["loss"]) for h in tr["log"])
    ev = json.loads((out / "arms" / "lmul-all-k3" / "eval_same.json").read_text())
    assert len(ev["gold"]) == 4 and len(ev["gen"]) == 2
    for g in ev["gold"]:  # bpb and loss are the same log-likelihood in two units
        assert g["bpb"] == pytest.approx(-g["ll"] / (math.log(2) * g["n_bytes"]))
        assert g["loss"] == pytest.approx(-g["ll"] / g["n_tokens"])


def test_training_changed_the_weights_and_arms_differ(full_run, tok):
    _, out = full_run
    base = tiny_llama(len(tok)).state_dict()
    w_exact, w_lmul = _weights(out / "arms" / "exact"), _weights(out / "arms" / "lmul-all-k3")
    for k, v in w_lmul.items():  # every parameter the unpatched model trains moved under scope="all"
        assert not torch.equal(v, base[k]), k
    assert any(not torch.equal(w_exact[k], w_lmul[k]) for k in w_exact)


def test_same_and_exact_evaluations_differ(full_run):
    _, out = full_run
    same = json.loads((out / "arms" / "lmul-all-k3" / "eval_same.json").read_text())
    exact = json.loads((out / "arms" / "lmul-all-k3" / "eval_exact.json").read_text())
    assert same["arith"] != "exact" and exact["arith"] == "exact"
    assert [g["ll"] for g in same["gold"]] != [g["ll"] for g in exact["gold"]]


def test_report(full_run):
    _, out = full_run
    path = build(out)
    text = path.read_text()
    assert "Paper Table 6 beside ours" in text and "| lmul-all-k3 | 37.91 |" in text
    assert (out / "loss_curve.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"exact", "lmul-all-k3"}
    assert res["arms"]["lmul-all-k3"]["same"]["bpb_vs_exact_ft"]["n"] == 4
    assert is_finetune_run(out) and render(assemble(out)) == text


def test_report_readings_compare_with_their_own_e4m3_arm():
    from lmul.finetune.report import _family, _t6_ref

    assert _family("lmul-all-k3-p") == ("lmul-all-k3", "-p") and _family("e5m2-all-row") == ("e5m2-all", "-row")
    assert _family("lmul-all-k3") == ("lmul-all-k3", "") and _family("lmul-all-mxfp4") == ("lmul-all-mxfp4", "")
    assert _t6_ref("lmul-all-k3-p") == "e4m3-all-p" and _t6_ref("e4m3-all-mx") == "e4m3-all-mx"
    assert _t6_ref("e5m2-all") == "e4m3-all" and _t6_ref("exact") == "e4m3-all"


def test_rerun_is_a_no_op_and_other_settings_are_refused(full_run, tok):
    cfg, out = full_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "config.json"}
    run(cfg, out, loader=lambda: pytest.fail("a finished run must not load the model"), items=ITEMS)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "config.json"}
    other = FinetuneConfig(arms=cfg.arms, **{**SMALL, "n_train": 5})
    with pytest.raises(ValueError, match=r"different fine-tuning run \(n_train: 6 there, 5 now\)"):
        run(other, out, loader=loader_for(tok), items=ITEMS)


def test_refuses_an_eval_run_folder(tmp_path, tok):
    (tmp_path / "config.json").write_text(json.dumps({"config": {"tasks": ["arc_easy"]}}))
    with pytest.raises(ValueError, match="another kind of run"):
        run(FinetuneConfig(arms=("exact",), **SMALL), tmp_path, loader=loader_for(tok), items=ITEMS)


def test_resume_after_a_kill_ends_with_the_same_weights(full_run, tmp_path, tok):
    cfg, ref = full_run
    out = tmp_path / "killed"
    killed = dataclasses.replace(cfg, arms=("lmul-all-k3",))  # the arm list may change between sessions
    with pytest.raises(_Interrupt):
        run(killed, out, loader=loader_for(tok), items=ITEMS, stop_after_step=2)
    ckpts = sorted(p.name for p in (out / "arms" / "lmul-all-k3" / "checkpoints").iterdir())
    assert "checkpoint-2" in ckpts and not (out / "arms" / "lmul-all-k3" / "train.json").exists()
    run(cfg, out, loader=loader_for(tok), items=ITEMS)
    tr = json.loads((out / "arms" / "lmul-all-k3" / "train.json").read_text())
    assert tr["resumed_from"] == "checkpoint-2"
    for arm in cfg.arms:
        a, b = _weights(ref / "arms" / arm), _weights(out / "arms" / arm)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), arm


def test_a_step_with_non_finite_gradients_is_skipped(tmp_path, tok):
    """An inf gradient on the first step (as fp8 / L-Mul arithmetic can produce) skips that optimizer
    step instead of turning every weight into NaN; later steps train."""
    def loader():
        model = tiny_llama(len(tok))
        calls = []

        def poison(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 1 else grad
        model.model.norm.weight.register_hook(poison)
        return model, tok, "tiny-llama"

    cfg = FinetuneConfig(arms=("exact",), **{**SMALL, "n_gen": 0})
    run(cfg, tmp_path, loader=loader, items=ITEMS)
    tr = json.loads((tmp_path / "arms" / "exact" / "train.json").read_text())
    assert tr["skipped_steps"] == 1 and not math.isfinite(float(tr["log"][0]["grad_norm"]))
    w = _weights(tmp_path / "arms" / "exact")
    base = tiny_llama(len(tok)).state_dict()
    assert all(torch.isfinite(v).all() for v in w.values())
    assert any(not torch.equal(w[k], base[k]) for k in w)


def test_readings(tmp_path, tok):
    cfg = FinetuneConfig(arms=("exact", "e4m3-all", "lmul"), **SMALL)
    with pytest.raises(ValueError, match="blocks"):
        readings(cfg, tmp_path, blocks=(0,), loader=loader_for(tok), items=ITEMS)
    readings(cfg, tmp_path, blocks=(1, "out", "none"), n_items=2, loader=loader_for(tok), items=ITEMS)
    files = sorted(p.name for p in (tmp_path / "readings").glob("*.json"))
    assert files == ["e4m3-all-x1.json", "e4m3-all-xnone.json", "e4m3-all-xout.json"]  # exact, lmul: no acc
    r1, rnone, rout = (json.loads((tmp_path / "readings" / f).read_text()) for f in files)
    assert rnone["arith"]["spec"]["acc"] == "fp32" and rnone["loss"]["mean"] not in (r1["loss"]["mean"],
                                                                                   rout["loss"]["mean"])
    assert r1["acc_block"] == 1 and rout["acc_block"] == "out" and r1["held_out_ids"] == [0, 4]
    assert r1["arith"]["spec"]["acc_block"] == 1 and rout["arith"]["spec"]["acc_block"] >= 1 << 20
    assert r1["loss"]["mean"] != rout["loss"]["mean"]
    with pytest.raises(ValueError, match="has a reduced-precision accumulator"):
        readings(FinetuneConfig(arms=("exact",), **SMALL), tmp_path, loader=loader_for(tok), items=ITEMS)
    # scaled operands without an accumulator: read once, under the arm's own arithmetic (block "none")
    readings(FinetuneConfig(arms=("e4m3-all-row", "e5m2-all-row"), **SMALL), tmp_path / "s", blocks=(128,),
             n_items=2, loader=loader_for(tok), items=ITEMS)
    assert sorted(p.name for p in (tmp_path / "s" / "readings").glob("*.json")) == [
        "e4m3-all-row-xnone.json", "e5m2-all-row-xnone.json"]
    rrow = json.loads((tmp_path / "s" / "readings" / "e4m3-all-row-xnone.json").read_text())
    assert rrow["arith"]["spec"]["scaling"] == "row" and rrow["arith"]["spec"]["acc"] == "fp32"
    # the report compares each reading with the e4m3 arm of the same reading and block
    (tmp_path / "s" / "config.json").write_text(json.dumps({"kind": "finetune", "config": {"seed": 1, "arms": []}}))
    res = assemble(tmp_path / "s")["readings"]
    assert res["e4m3-all-row-xnone"]["bpb_vs_e4m3"] is None and res["e5m2-all-row-xnone"]["bpb_vs_e4m3"]["n"] == 2


# ---- the CLI -----------------------------------------------------------------------------------

def _cli(capsys, *argv):
    from lmul.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr()


def test_cli_errors(tmp_path, capsys):
    rc, cap = _cli(capsys, "finetune", "--arms", "exact,bogus", "--out", str(tmp_path / "a"))
    assert rc == 2 and "unknown arm(s) ['bogus']" in cap.err
    rc, cap = _cli(capsys, "finetune", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "b"),
                   "--no-fetch")
    assert rc == 2 and "no-such-model" in cap.err and not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"kind": "finetune", "config": {"n_train": 1}}))
    rc, cap = _cli(capsys, "finetune", "--out", str(tmp_path / "c"), "--no-fetch")
    assert rc == 2 and "different fine-tuning run" in cap.err
    (tmp_path / "f").write_text("x")
    rc, cap = _cli(capsys, "finetune", "--out", str(tmp_path / "f"), "--no-fetch")
    assert rc == 2 and "is a file" in cap.err
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "finetune", "--blocks", "1,0")
    assert e.value.code == 2 and "blocks are integers >= 1, 'out' or 'none', got '0'" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_cli_refuses_a_read_only_out(tmp_path, capsys):
    from lmul.eval import assets

    if assets.fetch_status(assets.ASSETS["smollm2"]) != "intact":
        pytest.skip("needs the fetched SmolLM2 (the model is resolved before the folder is made)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, cap = _cli(capsys, "finetune", "--out", str(ro / "run"), "--no-fetch")
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "not writable" in cap.err


def test_cli_report_dispatches_to_the_finetune_report(full_run, capsys):
    _, out = full_run
    (out / "report.md").unlink(missing_ok=True)
    rc, cap = _cli(capsys, "report", str(out))
    assert rc == 0 and (out / "report.md").read_text().startswith("# Fine-tuning with L-Mul")


WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from lmul.finetune.run import FinetuneConfig, run
from tests._eval_fixtures import tiny_llama, tiny_tokenizer
from tests.test_finetune import ITEMS, SMALL
tok = tiny_tokenizer()
cfg = FinetuneConfig(arms=("exact", "lmul-all-k3"), **SMALL)
run(cfg, Path(sys.argv[1]), loader=lambda: (tiny_llama(len(tok)), tok, "tiny-llama"), items=ITEMS)
"""


def test_torchrun_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2``: both ranks train each arm together (DDP, gloo), rank 0 writes
    and evaluates; the run finishes with each rank seeing half the items per step."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=root))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    assert "finished" in meta and meta["sessions"][-1]["processes"] == 2
    for arm in ("exact", "lmul-all-k3"):
        tr = json.loads((out / "arms" / arm / "train.json").read_text())
        assert tr["steps"] == math.ceil(SMALL["n_train"] / (2 * SMALL["batch_size"]))  # 2 ranks x batch 2
        assert (out / "arms" / arm / "model" / "model.safetensors").is_file()
    assert len(json.loads((out / "arms" / "lmul-all-k3" / "eval_same.json").read_text())["gold"]) == 4


def _evs(*per_arm):
    """Evaluation files of e4m3, L-Mul, e5m2 (PATTERN_ARMS order) with these per-item bpb lists."""
    return [{"gold": [{"id": i, "bpb": v} for i, v in enumerate(vals)]} for vals in per_arm]


def test_paper_pattern_verdicts():
    """The Table 6 pattern per reading: e5m2 resolvably worst and L-Mul ≈ e4m3 holds; L-Mul between
    them, resolvably, holds in part; L-Mul worst does not. The differences are means of paired item
    differences (exact here: constant shifts), the order by mean bpb."""
    from lmul.finetune.report import _order

    base = [0.5 + 0.01 * (i % 7) for i in range(40)]
    noisy = [b + (0.02 if i % 2 else -0.02) for i, b in enumerate(base)]  # mean shift 0, CI spans 0
    r = _order(_evs(base, noisy, [b + 1.0 for b in base]), seed=0)
    assert r["verdict"].startswith("holds") and r["order"] in ("e4m3 ≈ L-Mul < e5m2", "L-Mul ≈ e4m3 < e5m2")
    assert abs(r["diffs"]["e5m2 − e4m3"]["diff"] - 1.0) < 1e-9 and abs(r["gap_ratio"]) < 1e-9
    r = _order(_evs(base, [b + 0.3 for b in base], [b + 1.0 for b in base]), seed=0)
    assert r["verdict"].startswith("in part") and r["order"] == "e4m3 < L-Mul < e5m2"
    assert abs(r["gap_ratio"] - 0.3) < 1e-9
    r = _order(_evs(base, [b + 2.0 for b in base], [b + 1.0 for b in base]), seed=0)
    assert r["verdict"] == "no" and r["order"] == "e4m3 < e5m2 < L-Mul" and not r["holds"]
