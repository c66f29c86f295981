"""The runner on a tiny random Llama and Arrow fixtures: lm-eval's scores against our own
teacher-forced log-likelihoods, the divergence metrics against torch, resume after an
interruption, and rebuilding the report from results.json."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("lm_eval")
import torch  # noqa: E402

from lmul import kernels  # noqa: E402
from lmul.eval import divergence, models, report, store  # noqa: E402
from lmul.eval.run import EvalConfig, run  # noqa: E402
from tests._eval_fixtures import ROWS, tiny_llama, tiny_tokenizer, write_fixtures  # noqa: E402

TASKS = ("arc_challenge", "piqa")


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs fastest (and steadiest on a shared machine) on one thread
    tok = tiny_tokenizer()
    yield tiny_llama(len(tok)), tok, "tiny random llama"
    torch.set_num_threads(threads)


def _cfg(arms=("exact",), **kw):
    return EvalConfig(tasks=TASKS, arms=arms, batch_size=4, max_length=1024, **kw)


def test_kl_top1_ll_against_torch():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(6, 11), -1)
    b = torch.log_softmax(torch.randn(6, 11), -1)
    ids = [0, 3, 4, 1, 7, 2]
    s = divergence.compare(a, b, ids, start=3, n_bytes=5)
    kl = torch.nn.functional.kl_div(b[:-1].double(), a[:-1].double(), log_target=True, reduction="none").sum(-1)
    assert s.kl == pytest.approx(float(kl.mean()), rel=1e-12)
    assert s.top1 == pytest.approx(float((a[:-1].argmax(-1) == b[:-1].argmax(-1)).double().mean()))
    assert s.ll == pytest.approx(float(b[2, 1] + b[3, 7] + b[4, 2]), rel=1e-6)
    assert s.bpb == pytest.approx(-s.ll / (5 * math.log(2)))
    same = divergence.compare(a, a, ids, 3, 5)
    assert same.kl == 0 and same.top1 == 1


def test_common_prefix():
    assert divergence.common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert divergence.common_prefix([[1, 2], [3]]) == [] and divergence.common_prefix([]) == []
    assert divergence.common_prefix([[7, 8, 9]]) == [7, 8, 9]


@pytest.mark.parametrize("arm", ["exact", "lmul", "e4m3"])
def test_prefix_log_probs_equal_full_passes(tiny, arm):
    """A cached shared prefix plus each sequence's own tokens gives the full forward pass's log-probs
    (exact model and patched arms), and compare() with the prefix's head sums gives the full compare()."""
    from lmul.eval.run import arm_context

    model, _, _ = tiny
    torch.manual_seed(1)
    prefix = torch.randint(0, 250, (40,)).tolist()
    seqs = [prefix + torch.randint(0, 250, (n,)).tolist() for n in (3, 9, 17)]
    ref = divergence.PrefixLogProbs(model, prefix)
    refs = [(divergence.log_probs(model, ids), ref.tail(ids)) for ids in seqs]
    with arm_context(model, arm):
        pre = divergence.PrefixLogProbs(model, prefix)
        head = pre.head(ref)
        for ids, (full_ref, tail_ref) in zip(seqs, refs, strict=True):
            full = divergence.log_probs(model, ids)
            assert pre(ids).shape == full.shape
            # The prefix pass and the full pass are the same network on other matrix shapes, so they
            # differ by float32 summation order only (a BLAS picks its kernel by shape, and per CPU: the
            # observed gap is ~1e-6 on Intel and AMD); a wrong cache or position would move log-probs by O(1).
            # 2e-5 is ~300 float32 ulps of the largest |log-prob| here (log 256 ≈ 5.5, ulp 4.8e-7).
            assert torch.allclose(pre(ids), full, atol=2e-5, rtol=0)
            start = len(ids) - 2

            # 1. The bookkeeping (prefix sums added once, rows aligned), on identical log-probs: the two
            # sides differ only in the order of float64 additions of <= 70 per-position KLs, so
            # |difference| <= 70 · 2^-53 · Σ|KL_i| (Higham 3.1), far below rel=1e-12.
            ref_ids = torch.cat([ref.logp, tail_ref])  # ref(ids), computed before the arm's patch
            same = divergence.compare(ref_ids, pre(ids), ids, start, 4)
            got = divergence.compare(tail_ref, pre.tail(ids), ids, start, 4, first=len(prefix), head=head)
            assert got.n_positions == same.n_positions == len(ids) - 1
            assert got.kl == pytest.approx(same.kl, rel=1e-12, abs=1e-300)
            assert got.top1 == same.top1 and got.ll == same.ll

            # 2. Against the full passes: the KL moves by no more than the measured log-prob gaps allow.
            # With a = log p, b = log q perturbed by |α| <= εa, |β| <= εb per entry, one position's
            # KL = Σ p (a - b) moves by Σ p(e^α - 1)(a - b) + Σ p e^α (α - β), so by at most
            # (e^εa - 1) Σ p|a - b| + e^εa (εa + εb) (Σ p = 1); the mean over positions obeys the worst one.
            # float32's rounding of the log-probs themselves is inside εa, εb (measured on those values).
            want = divergence.compare(full_ref, full, ids, start, 4)
            ea = float((ref_ids - full_ref).abs().max())
            eb = float((pre(ids) - full).abs().max())
            p, q = full_ref[:-1].double(), full[:-1].double()
            spread = float((p.exp() * (p - q).abs()).sum(-1).max())
            kl_abs = float((p.exp() * (p - q)).sum(-1).abs().mean())
            # plus the float64 reassociation of the position sums (as in 1.)
            bound = math.expm1(ea) * spread + math.exp(ea) * (ea + eb) + len(ids) * 2.0**-53 * kl_abs
            assert abs(got.kl - want.kl) <= bound, (got.kl, want.kl, bound)
            n_gold = len(ids) - start  # the gold log-likelihood sums that many entries of the arm's log-probs
            assert abs(got.ll - want.ll) <= n_gold * eb
            if arm != "exact":
                assert want.kl > 0
        assert pre(prefix[:10]).shape[0] == 10  # not extending the prefix: the full pass
    with pytest.raises(ValueError, match="does not extend"):
        ref.tail(prefix[:-1] + [251, 3])
    with pytest.raises(ValueError, match="outside positions"):
        divergence.compare(ref.logp, ref.logp, prefix, start=0, n_bytes=1)


def test_scores_match_teacher_forced_loglikelihoods(tmp_path, tiny):
    """lm-eval's per-choice log-likelihoods (and so acc) equal a direct forward pass."""
    model, tok, _ = tiny
    data = write_fixtures(tmp_path)
    run(_cfg(), tmp_path / "run", loaded=tiny, data_root=data)
    for task in TASKS:
        items = store.read_json(store.part_path(tmp_path / "run", "acc", "exact", task))["items"]
        assert [it["doc_id"] for it in items] == list(range(len(ROWS[task])))
        for it in items:
            doc = ROWS[task][it["doc_id"]]
            conts = ([" " + t for t in doc["choices"]["text"]] if task == "arc_challenge"
                     else [" " + doc["sol1"], " " + doc["sol2"]])
            ours = []
            for c in conts:
                ids, start = divergence.encode_pair(tok, it["context"], c, 1024)
                lp = divergence.log_probs(model, ids)
                ours.append(float(lp[start - 1:-1].gather(1, torch.tensor(ids[start:])[:, None]).sum()))
            assert it["lls"] == pytest.approx(ours, abs=1e-4)
            gold = conts.index(it["gold"])
            assert it["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == gold)
            it["gold_index"] = gold
        div = store.read_json(store.part_path(tmp_path / "run", "div", "exact", task))["items"]
        for d, it in zip(div, items, strict=True):  # the exact arm's gold ll is lm-eval's ll of the gold choice
            assert d["doc_id"] == it["doc_id"]
            assert d["ll"] == pytest.approx(it["lls"][it["gold_index"]], abs=1e-4)
            assert d["kl"] == 0 and d["top1"] == 1
    results = store.read_json(tmp_path / "run" / "results.json")
    assert set(results["tasks"]) == set(TASKS)


def test_winogrande_gold_and_scores(tmp_path, tiny):
    """Multiple-input task: per-option lls are the continuation's log-likelihood after each filled-in
    prefix, the gold comes from the ``answer`` field, and the divergence pass scores the gold prefix."""
    model, tok, _ = tiny
    data = write_fixtures(tmp_path)
    run(EvalConfig(tasks=("winogrande",), arms=("exact",), batch_size=4, max_length=1024), tmp_path / "run",
        loaded=tiny, data_root=data)
    items = store.read_json(store.part_path(tmp_path / "run", "acc", "exact", "winogrande"))["items"]
    div = store.read_json(store.part_path(tmp_path / "run", "div", "exact", "winogrande"))["items"]
    for it, d in zip(items, div, strict=True):
        doc = ROWS["winogrande"][it["doc_id"]]
        head, tail = doc["sentence"].split("_")
        ours = []
        for opt in (doc["option1"], doc["option2"]):
            ids, start = divergence.encode_pair(tok, head + opt, " " + tail.strip(), 1024)
            lp = divergence.log_probs(model, ids)
            ours.append(float(lp[start - 1:-1].gather(1, torch.tensor(ids[start:])[:, None]).sum()))
        gold = int(doc["answer"]) - 1
        assert it["lls"] == pytest.approx(ours, abs=1e-4)
        assert it["context"] == head + (doc["option1"], doc["option2"])[gold]
        assert it["acc"] == float(max(range(2), key=ours.__getitem__) == gold)
        assert d["ll"] == pytest.approx(ours[gold], abs=1e-4)


def test_resume_after_interruption(tmp_path, tiny, monkeypatch):
    data = write_fixtures(tmp_path)
    cfg = _cfg(arms=("exact", "lmul"))
    out = tmp_path / "run"
    run(cfg, out, loaded=tiny, data_root=data, stop_after=2)  # "interrupted" after two units
    first = {p.name: p.read_bytes() for p in (out / "parts").iterdir()}
    assert len(first) == 2 and not (out / "results.json").exists()
    run(cfg, out, loaded=tiny, data_root=data)
    parts = {p.name: p.read_bytes() for p in (out / "parts").iterdir()}
    assert len(parts) == 8  # 2 arms x 2 tasks x (acc, div)
    for name, raw in first.items():
        assert parts[name] == raw  # finished units were skipped, not recomputed
    full = tmp_path / "full"
    run(cfg, full, loaded=tiny, data_root=data)
    for name in parts:
        a = store.read_json(out / "parts" / name)["items"]
        b = store.read_json(full / "parts" / name)["items"]
        assert a == b  # resuming gives the results of an uninterrupted run
    res = store.read_json(out / "results.json")
    assert res["tasks"]["piqa"]["lmul"]["n"] == len(ROWS["piqa"])
    # the process that finished the run records its wall time and the units it computed (6 of 8)
    (ses,) = store.read_json(out / "config.json")["sessions"]
    assert ses["units"] == 6 and ses["wall_seconds"] > 0 and ses["started"] <= ses["finished"]
    def no_load(*a, **k):
        raise AssertionError("a finished run must not load the model again")

    monkeypatch.setattr(models, "load", no_load)
    run(cfg, out, data_root=data)  # everything is done: nothing is loaded or recomputed
    assert {p.name: p.read_bytes() for p in (out / "parts").iterdir()} == parts
    assert res["divergence"]["piqa"]["lmul"]["kl"] > 0
    with pytest.raises(ValueError, match="different settings"):
        run(_cfg(arms=("exact",), seed=99), out, loaded=tiny, data_root=data)


def test_rerun_adds_an_arm(tmp_path, tiny):
    """A second run into the same folder with one more arm computes only that arm and puts it in
    config.json, results.json and the report."""
    data = write_fixtures(tmp_path)
    out = tmp_path / "run"
    run(_cfg(arms=("exact",)), out, loaded=tiny, data_root=data)
    before = store.part_path(out, "acc", "exact", "piqa").read_bytes()
    run(_cfg(arms=("exact", "lmul")), out, loaded=tiny, data_root=data)
    assert store.part_path(out, "acc", "exact", "piqa").read_bytes() == before  # not recomputed
    meta = store.read_json(out / "config.json")
    assert meta["config"]["arms"] == ["exact", "lmul"]
    # each arm's resolved spec, placement and the backend that ran are recorded (independent of the tag)
    lm = meta["arm_specs"]["lmul"]
    assert lm["spec"]["fmt"] == "bf16" and lm["spec"]["mode"] == "bit" and lm["spec"]["offset"] == 2.0**-4
    assert lm["scope"] == "attention" and lm["spec"]["name"] == "bf16-bit"
    assert lm["backend_ran"] in {b.name for b in kernels.BACKENDS}
    assert meta["arm_specs"]["exact"]["scope"] == "none"
    res = store.read_json(out / "results.json")
    assert set(res["tasks"]["piqa"]) == {"exact", "lmul"} and "lmul" in res["divergence"]["piqa"]
    assert "| lmul |" in report.build(out).read_text()


def test_report_rebuilds_from_json(tmp_path, tiny):
    data = write_fixtures(tmp_path)
    out = tmp_path / "run"
    run(_cfg(arms=("exact", "lmul")), out, loaded=tiny, data_root=data)
    first = report.build(out).read_text()
    assert "ARC-C" in first and "| lmul |" in first and (out / "accuracy.png").exists() and (out / "kl.png").exists()
    # only results.json travels: rebuild the report from it alone
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "results.json").write_bytes((out / "results.json").read_bytes())
    assert report.build(lone).read_text() == first
    # as committed under docs/results/: gzipped
    import gzip

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "results.json.gz").write_bytes(gzip.compress((out / "results.json").read_bytes()))
    assert report.build(packed).read_text() == first


def test_model_from_a_local_folder(tmp_path, tiny):
    model, tok, _ = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2, desc = models.load(str(tmp_path / "m"))
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.dtype == torch.float32
    assert desc == str(tmp_path / "m") and len(tok2) == len(tok)
    with pytest.raises(ValueError, match="is a file"):
        models.load(str(tmp_path / "m" / "config.json"))


def test_div_limit_beyond_limit_takes_gold_from_the_data(tmp_path, tiny, monkeypatch):
    """GSM8K: generation on the first --limit items, the divergence (gold bpb) pass on --div-limit items
    ('all' = every item); the extra items' gold sequences are the request dump's, scored like the others.
    The shared few-shot prefix is computed once per arm (checked against full passes below)."""
    from lmul.eval import run as run_mod
    from tests._eval_fixtures import GSM8K, write_gsm8k

    built = []
    monkeypatch.setattr(run_mod, "MIN_SHARED_PREFIX", 4)
    real = divergence.PrefixLogProbs
    monkeypatch.setattr(divergence, "PrefixLogProbs", type("Spy", (real,), {
        "__init__": lambda self, m, prefix: (built.append(len(prefix)), real.__init__(self, m, prefix))[1]}))
    model, tok, _ = tiny
    data = write_fixtures(tmp_path)
    write_gsm8k(data)
    kw = dict(tasks=("gsm8k",), arms=("exact", "lmul"), batch_size=4, max_length=1024, limit=2)
    full = tmp_path / "all"
    run(EvalConfig(div_limit="all", **kw), full, loaded=tiny, data_root=data)
    res = store.read_json(full / "results.json")
    assert res["tasks"]["gsm8k"]["exact"]["n"] == 2 and res["tasks"]["gsm8k"]["lmul"]["n"] == 2
    acc = store.read_json(store.part_path(full, "acc", "exact", "gsm8k"))["items"]
    for it in acc:  # the accuracy records' gold is the same field of the same document
        assert (it["context"], it["gold"]) == (GSM8K[it["doc_id"]]["request"]["context"],
                                               GSM8K[it["doc_id"]]["request"]["continuation"])
    for arm in ("exact", "lmul"):
        d = res["divergence"]["gsm8k"][arm]
        assert d["n"] == len(GSM8K) and [it["doc_id"] for it in d["items"]] == list(range(len(GSM8K)))
    for it in res["divergence"]["gsm8k"]["exact"]["items"]:  # our own teacher-forced gold ll
        req = GSM8K[it["doc_id"]]["request"]
        ids, start = divergence.encode_pair(tok, req["context"], req["continuation"], 1024)
        lp = divergence.log_probs(model, ids)
        assert it["ll"] == pytest.approx(divergence.compare(lp, lp, ids, start, 1).ll, abs=1e-5)
        assert it["n_bytes"] == len(req["continuation"].encode()) and it["kl"] == 0
    assert all(it["kl"] > 0 for it in res["divergence"]["gsm8k"]["lmul"]["items"])
    assert len(built) == 2 and built[0] >= 4  # one prefix per arm (exact, lmul), not one per item
    assert "divergence items: all" in report.build(full).read_text()
    # --div-limit 3: the first three; the default (= --limit): the accuracy pass's two, the same records
    three = tmp_path / "three"
    run(EvalConfig(div_limit=3, **kw), three, loaded=tiny, data_root=data)
    two = tmp_path / "two"
    run(EvalConfig(**kw), two, loaded=tiny, data_root=data)
    for arm in ("exact", "lmul"):
        every = store.read_json(store.part_path(full, "div", arm, "gsm8k"))["items"]
        assert store.read_json(store.part_path(three, "div", arm, "gsm8k"))["items"] == every[:3]
        assert store.read_json(store.part_path(two, "div", arm, "gsm8k"))["items"] == every[:2]
    with pytest.raises(ValueError, match="different settings"):  # the divergence size is part of a run's identity
        run(EvalConfig(div_limit=4, **kw), three, loaded=tiny, data_root=data)


@pytest.mark.parametrize("kw,ok", [
    (dict(tasks=("gsm8k",), limit=2, div_limit="all"), True),
    (dict(tasks=("gsm8k",), limit=2, div_limit=1319), True),
    (dict(tasks=("piqa",), limit=None, div_limit="all"), True),  # no --limit: every item anyway
    (dict(tasks=("piqa",), limit=5, div_limit=5), True),
    (dict(tasks=("piqa",), limit=5, div_limit=6, divergence=False), True),  # no divergence pass
    (dict(tasks=("piqa",), limit=5, div_limit=6), False),  # lm-eval builds piqa's gold: not in the data
    (dict(tasks=("gsm8k", "mmlu"), limit=5, div_limit="all"), False),
    (dict(tasks=("gsm8k",), div_limit="some"), False),
    (dict(tasks=("gsm8k",), div_limit=-1), False),
    (dict(tasks=("gsm8k",), div_limit=True), False),
])
def test_div_limit_validation(kw, ok):
    if ok:
        cfg = EvalConfig(**kw)
        assert cfg.n_div == (None if kw["div_limit"] == "all" else kw["div_limit"])
    else:
        with pytest.raises(ValueError):
            EvalConfig(**kw)


@pytest.mark.parametrize("value", [1024, 2048, 1 << 17])
def test_max_length_in_range_is_kept(value):
    assert EvalConfig(tasks=("piqa",), max_length=value).max_length == value


@pytest.mark.parametrize("value", [True, False, 2048.0, "2048", None, 0, -1, 128, 1023, 131073, 1 << 40])
def test_max_length_outside_1024_to_131072_is_refused(value):
    """The Python API checks what ``--max-length`` checks (the same bounds, 1024 to 2**17 tokens)."""
    with pytest.raises(ValueError, match=rf"max_length must be an integer from 1024 to 131072 .*got {value!r}$"):
        EvalConfig(tasks=("piqa",), max_length=value)


def test_divergence_pass_resumes_from_its_progress_file(tmp_path, tiny, monkeypatch):
    """An interrupted divergence pass picks up its saved records: the rerun computes only the items
    not yet saved and returns the same records as an uninterrupted pass."""
    from lmul.eval import run as run_mod
    from tests._eval_fixtures import GSM8K

    model, tok, _ = tiny
    items = [{"doc_id": r["doc_id"], "context": r["request"]["context"], "gold": r["request"]["continuation"]}
             for r in GSM8K]
    clean, _ = run_mod.divergence_pass(model, tok, ["exact", "lmul"], items, 512)
    monkeypatch.setattr(run_mod, "PROGRESS_SECONDS", -1.0)  # save after every item
    progress = tmp_path / "progress.json"
    calls, real = [], divergence.compare

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 7:  # the fourth item's first arm: items 0-2 are saved
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(divergence, "compare", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_mod.divergence_pass(model, tok, ["exact", "lmul"], items, 512, progress=progress)
    assert [r["doc_id"] for r in store.read_json(progress)["recs"]["lmul"]] == [0, 1, 2]
    calls.clear()
    monkeypatch.setattr(divergence, "compare", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed, _ = run_mod.divergence_pass(model, tok, ["exact", "lmul"], items, 512, progress=progress)
    assert len(calls) == 2 * (len(items) - 3)
    for arm in ("exact", "lmul"):
        assert [r["doc_id"] for r in resumed[arm]] == [r["doc_id"] for r in clean[arm]]
        for a, b in zip(resumed[arm], clean[arm], strict=True):
            assert a["ll"] == pytest.approx(b["ll"], abs=1e-9) and a["kl"] == pytest.approx(b["kl"], abs=1e-12)
    # a progress file of other arms is not used
    other, _ = run_mod.divergence_pass(model, tok, ["exact"], items, 512, progress=progress)
    assert len(other["exact"]) == len(items)
