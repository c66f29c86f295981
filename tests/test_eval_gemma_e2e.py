"""The optional second embedded model, Gemma 3 270M, on the real asset; skipped when not fetched.
Run `lmul fetch gemma3-270m` first."""

from __future__ import annotations

import pytest

from lmul.eval import assets

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not assets.chunked_path(assets.GEMMA3_270M).is_file(),
                       reason="Gemma 3 270M absent: run `lmul fetch gemma3-270m` (LMUL_HOME selects the folder)"),
]


@pytest.fixture(scope="module")
def gemma():
    import torch

    from lmul.eval import models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models.load("gemma3-270m", allow_fetch=False)
    torch.set_num_threads(threads)


def test_gemma_loads_and_patches(gemma):
    """The GGUF loads as a Gemma 3 model that knows a fact, and every attention layer takes the
    L-Mul patch (its sliding-window layers included): the patched next-token distribution differs
    from the exact one but keeps its top-1 prediction."""
    import torch

    import lmul

    model, tok, desc = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and "Gemma" in desc
    x = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    with torch.no_grad():
        ref = model(**x).logits[0, -1].log_softmax(-1)
        assert tok.decode(ref.argmax()).strip() == "Paris"
        with lmul.patch(model, "lmul") as handle:
            assert len(handle.attention) == model.config.num_hidden_layers
            arm = model(**x).logits[0, -1].log_softmax(-1)
    assert arm.argmax() == ref.argmax()
    assert not torch.equal(arm, ref)
