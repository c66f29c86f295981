"""``torch.compile`` and ``torch.export`` of L-Mul: the ``lmul::matmul`` / ``lmul::mul`` custom ops
(their fake implementations, autograd and schema via ``torch.library.opcheck``), and a patched tiny
Llama compiled without graph breaks, equal to eager bit for bit."""

from __future__ import annotations

import pytest
import torch

import lmul
from tests.test_patch import build, inputs

pytest.importorskip("transformers")
SCOPES = ["attention", "linear", "all"]


@pytest.mark.parametrize("spec", ["bf16-bit", "e4m3-formula", "e5m2-exact", "e4m3-bit-acce4m3x4"])
def test_opcheck_matmul(spec):
    """Schema, fake (meta) implementation, autograd registration and strides of lmul::matmul."""
    g = torch.Generator().manual_seed(0)
    for a, b in [(torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g)),
                 (torch.randn(2, 3, 5, generator=g), torch.randn(5, generator=g)),
                 (torch.randn(7, generator=g), torch.randn(2, 7, 3, generator=g))]:
        torch.library.opcheck(torch.ops.lmul.matmul.default, (a.requires_grad_(), b, spec))


@pytest.mark.parametrize("spec", ["bf16-bit", "e4m3-formula", "fp32-exact"])
def test_opcheck_mul(spec):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.library.opcheck(torch.ops.lmul.mul.default, (x.requires_grad_(), y.requires_grad_(), spec))


def _model():
    model = build("llama", attn="eager")
    model.eval()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("scope", SCOPES)
def test_patched_model_has_no_graph_breaks(scope):
    import torch._dynamo as dynamo

    model, (ids, mask) = _model(), inputs()
    dynamo.reset()
    with lmul.patch(model, "lmul", scope=scope), torch.no_grad():
        explained = dynamo.explain(model)(ids, attention_mask=mask)
    dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("scope", SCOPES)
def test_compiled_equals_eager_bit_for_bit(scope):
    """The compiled graph (aot_eager: torch's own ops around the L-Mul custom ops) gives the eager
    logits bit for bit. (Inductor generates its own softmax/exp kernels, so it differs from eager by
    float32 ulps for the unpatched model too: see the next test.)"""
    import torch._dynamo as dynamo

    model, (ids, mask) = _model(), inputs()
    with lmul.patch(model, "lmul", scope=scope), torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask).logits
    dynamo.reset()
    assert torch.equal(compiled, eager)


@pytest.mark.slow
def test_inductor_runs_and_stays_within_float32_noise():
    import torch._dynamo as dynamo

    model, (ids, mask) = _model(), inputs()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        dynamo.reset()
        plain_gap = (torch.compile(model)(ids, attention_mask=mask).logits - plain).abs().max()
        with lmul.patch(model, "lmul"):
            eager = model(ids, attention_mask=mask).logits
            dynamo.reset()
            compiled = torch.compile(model)(ids, attention_mask=mask).logits
    dynamo.reset()
    gap = (compiled - eager).abs().max()
    assert not torch.equal(eager, plain)  # the patch is active in both runs
    assert gap <= max(4 * plain_gap.item(), 1e-6), (gap, plain_gap)


def test_export_sees_single_ops():
    class Block(torch.nn.Module):
        def forward(self, q, k, x, w):
            return lmul.matmul(q, k.transpose(-1, -2), "bf16", "bit") + lmul.mul(x, w, "e4m3", "formula")

    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(3, 5, generator=g),
            torch.randn(5, generator=g))
    exported = torch.export.export(Block(), args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("lmul.matmul.default") == 1 and targets.count("lmul.mul.default") == 1, targets
    torch.testing.assert_close(exported.module()(*args), Block()(*args), rtol=0, atol=0)
