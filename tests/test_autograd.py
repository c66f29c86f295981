"""Gradients through L-Mul (lmul/autograd.py): both backward rules against float64 hand
computations, and a tiny model patched with scope="all" passing gradients to every parameter the
unpatched model trains, equal to finite differences where the surrogate is the model itself."""

from __future__ import annotations

import pytest
import torch

import lmul
from lmul import LMulSpec, quantize
from tests.test_matmul import assert_within_contract, oracle_matmul

SHAPES = [((5, 7), (7, 3)), ((2, 4, 6), (6, 3)), ((6,), (2, 6, 4)), ((3, 1, 4, 5), (2, 5, 2)), ((5,), (5,))]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("name", ["bf16-bit", "e4m3-formula", "e5m2-exact"])
def test_exact_backward_is_the_straight_through_product(shapes, name):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shapes[0], generator=g, requires_grad=True)
    b = torch.randn(*shapes[1], generator=g, requires_grad=True)
    spec = LMulSpec.from_name(name)
    out = lmul.matmul(a, b, spec=spec)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    aq, bq = quantize(a.detach(), spec.fmt).double(), quantize(b.detach(), spec.fmt).double()
    a2 = aq.unsqueeze(0) if aq.dim() == 1 else aq
    b2 = bq.unsqueeze(-1) if bq.dim() == 1 else bq
    w2 = w.double().reshape(torch.matmul(a2, b2).shape)
    ga = torch.matmul(w2, b2.transpose(-1, -2)).sum_to_size(a2.shape).reshape(a.shape)  # float64 by hand
    gb = torch.matmul(a2.transpose(-1, -2), w2).sum_to_size(b2.shape).reshape(b.shape)
    torch.testing.assert_close(a.grad.double(), ga, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), gb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["e4m3-bit", "bf16-formula", "e8m3-bit-trunc"])
def test_same_backward_multiplies_with_the_forward_spec(name):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 9, generator=g, requires_grad=True)
    b = torch.randn(9, 4, generator=g, requires_grad=True)
    spec = LMulSpec.from_name(name, backward="same")
    dc = torch.randn(6, 4, generator=g)
    lmul.matmul(a, b, spec=spec).backward(dc)
    # dA = L-Matmul(dC, B_q^T), dB = L-Matmul(A_q^T, dC): against a float64 sum of the contract's products
    bq, aq = quantize(b.detach(), spec.fmt, spec.rounding), quantize(a.detach(), spec.fmt, spec.rounding)
    for got, (x, y) in [(a.grad, (dc, bq.t())), (b.grad, (aq.t(), dc))]:
        want, mag = oracle_matmul(x, y, spec.fmt.name, spec.mode, spec.rounding)
        assert_within_contract(got, want, mag, x.shape[-1])
    exact = LMulSpec.from_name(name)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    lmul.matmul(a2, b2, spec=exact).backward(dc)
    assert not torch.equal(a2.grad, a.grad)  # the two rules differ


def test_same_backward_of_mul_is_bit_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.randn(5, generator=g, requires_grad=True)
    spec = LMulSpec("e4m3", backward="same")
    dp = torch.randn(4, 5, generator=g)
    lmul.mul(x, y, spec=spec).backward(dp)
    yq, xq = quantize(y.detach(), "e4m3"), quantize(x.detach(), "e4m3")
    assert torch.equal(x.grad, lmul.mul(dp, yq.expand(4, 5), "e4m3"))
    assert torch.equal(y.grad, lmul.mul(dp, xq, "e4m3").sum(0))
    x.grad = y.grad = None
    lmul.mul(x, y, spec=spec.replace(backward="exact")).backward(dp)
    torch.testing.assert_close(x.grad, dp * yq, rtol=0, atol=0)


# -- a tiny model ------------------------------------------------------------------------------

def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backward", ["exact", "same"])
def test_scope_all_trains_every_parameter(backward):
    from tests.test_patch import build, inputs

    model = build("llama", attn="eager")
    model.train()
    ids, _ = inputs()
    plain = _grads(model, ids)
    trained = {n for n, gr in plain.items() if gr is not None and gr.abs().sum() > 0}
    with lmul.patch(model, "lmul-all", backward=backward):
        patched = _grads(model, ids)
    got = {n for n, gr in patched.items() if gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0}
    assert trained and trained <= got, sorted(trained - got)


def test_scope_all_gradients_equal_finite_differences_of_the_surrogate():
    """With exact fp32 products the straight-through surrogate is the model itself: the patched
    model's gradients (through every patched module: projections, attention, MLP product, norms,
    rotary) must match central differences of its loss."""
    from tests.test_patch import build, inputs

    torch.manual_seed(0)
    model = build("llama", attn="eager").double()
    ids, _ = inputs()
    with lmul.patch(model, fmt="fp32", mode="exact", scope="all"):
        grads = _grads(model, ids)
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight"]
        params = dict(model.named_parameters())
        for name in names:
            p = params[name]
            for i in (0, p.numel() // 2):
                old = p.detach().view(-1)[i].item()
                eps = 1e-2
                with torch.no_grad():  # in place on the Parameter (bumps its version, as an optimizer step)
                    p.view(-1)[i] = old + eps
                    up = model(ids, labels=ids).loss.item()
                    p.view(-1)[i] = old - eps
                    down = model(ids, labels=ids).loss.item()
                    p.view(-1)[i] = old
                fd = (up - down) / (2 * eps)
                assert grads[name].view(-1)[i].item() == pytest.approx(fd, rel=2e-2, abs=2e-4), (name, i)
