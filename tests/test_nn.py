"""lmul.nn: LMulLinear, lmul_attention and the element-wise L-Mul modules.

Oracles: the elementwise products of :func:`lmul.mul` summed in float64 (SPEC section 4 bound),
torch's own modules (exact mode reproduces them bit for bit), and explicit compositions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmul
from lmul.config import LMulConfig
from lmul.nn import (
    LMulGatedMLP,
    LMulLayerNorm,
    LMulLinear,
    LMulRMSNorm,
    LMulRotaryEmbedding,
    _LMulFactor,
    lmul_attention,
    repeat_kv,
)

needs_transformers = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="needs transformers (the hf extra)")

CONFIGS = [  # (fmt, mode, rounding)
    ("bf16", "bit", "rne"), ("bf16", "formula", "rne"), ("bf16", "exact", "rne"),
    ("e4m3", "bit", "rne"), ("e4m3", "exact", "rne"), ("e5m2", "bit", "rne"),
    ("e8m3", "bit", "trunc"), ("fp32", "bit", "rne"),
]


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def linear_oracle(x, w, b, cfg):
    """float64 sum of the L-Mul products, and the SPEC section 4 error bound (+ the bias add)."""
    p = lmul.mul(x[:, None, :].float(), w[None].float(), **cfg.mul_kwargs()).double()  # [N, out, in]
    exact = p.sum(-1) + (b.double() if b is not None else 0)
    mag = p.abs().sum(-1) + (b.double().abs() if b is not None else 0)
    return exact, (x.shape[-1] + 2) * 2.0**-24 * mag + 1e-30


@pytest.mark.parametrize("fmt,mode,rounding", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_products_oracle(fmt, mode, rounding, bias):
    torch.manual_seed(0)
    lin = nn.Linear(13, 7, bias=bias)
    cfg = LMulConfig(fmt=fmt, mode=mode, rounding=rounding, scope="linear")
    layer = LMulLinear.from_linear(lin, cfg)
    x = rand(2, 3, 13, seed=1)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 7) and y.dtype == torch.float32
    exact, bound = linear_oracle(x.reshape(-1, 13), lin.weight, lin.bias, cfg)
    assert ((y.reshape(-1, 7).double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision_rounds_once_to_the_model_dtype(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(16, 5).to(dtype)
    cfg = LMulConfig(scope="linear")
    x = rand(4, 16, seed=2, dtype=dtype)
    with torch.no_grad():
        y = LMulLinear.from_linear(lin, cfg)(x)
    assert y.dtype == dtype
    exact, bound = linear_oracle(x, lin.weight, lin.bias, cfg)
    ulp = torch.finfo(dtype).eps * exact.abs()  # rounding the float32 result to dtype: half an ulp, < eps·|y|
    assert ((y.double() - exact).abs() <= bound + ulp).all()


@needs_transformers
def test_conv1d_is_a_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=5)
    nn.init.normal_(conv.weight)
    lin = nn.Linear(5, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    cfg = LMulConfig(fmt="e4m3", scope="linear")
    a, b = LMulLinear.from_linear(conv, cfg), LMulLinear.from_linear(lin, cfg)
    assert a.weight is conv.weight and a.transposed and (a.in_features, a.out_features) == (5, 6)
    x = rand(3, 5, seed=3)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_linear_shares_parameters_and_refreshes_its_cache():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    cfg = LMulConfig(fmt="e4m3", scope="linear")
    layer = LMulLinear.from_linear(lin, cfg)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = rand(3, 8, seed=4)
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0)  # cached weight
        lin.weight.mul_(3.0)  # in-place update: the cache must notice
        y1 = layer(x)
    exact, bound = linear_oracle(x, lin.weight, lin.bias, cfg)
    assert ((y1.double() - exact).abs() <= bound).all()
    assert not torch.equal(y0, y1)


def test_linear_autograd_matches_the_functional():
    """With autograd the layer differentiates exactly as lmul.matmul(x, Wᵀ) + b does (whatever
    gradient lmul.matmul defines: the kernels issue's), reaching the shared Parameters."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    cfg = LMulConfig(scope="linear")
    layer = LMulLinear.from_linear(lin, cfg)
    x = rand(4, 6, seed=5).requires_grad_()
    g = rand(4, 3, seed=6)
    gx, gw, gb = torch.autograd.grad((layer(x) * g).sum(), (x, lin.weight, lin.bias), allow_unused=True)
    ref = lmul.matmul(x, lin.weight.t(), **cfg.matmul_kwargs()) + lin.bias
    rx, rw, rb = torch.autograd.grad((ref * g).sum(), (x, lin.weight, lin.bias), allow_unused=True)
    for got, want in ((gx, rx), (gw, rw), (gb, rb)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)
    assert gb is not None and torch.equal(gb, g.sum(0))  # the bias add is exact


def test_linear_repr_and_type_errors():
    layer = LMulLinear.from_linear(nn.Linear(3, 2), LMulConfig.from_name("lmul-k3"))
    assert "lmul=lmul-k3" in repr(layer) and "from=Linear" in repr(layer)
    with pytest.raises(TypeError, match="nn.Linear or Conv1D, got ReLU"):
        LMulLinear.from_linear(nn.ReLU(), LMulConfig())


# ------------------------------------------------------------------------------------------ attention

class _Attn(nn.Module):
    training = False


def _qkv(b=2, h=4, h_kv=2, s=5, d=8):
    return rand(b, h, s, d, seed=10), rand(b, h_kv, s, d, seed=11), rand(b, h_kv, s, d, seed=12)


def test_attention_boolean_and_additive_masks_agree():
    q, k, v = _qkv()
    allowed = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(2, 1, 5, 5).clone()
    allowed[1, :, :, :2] = False  # padding of the second sequence
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cfg = LMulConfig()
    o1, w1 = lmul_attention(_Attn(), q, k, v, allowed, config=cfg)
    o2, w2 = lmul_attention(_Attn(), q, k, v, additive, config=cfg)
    assert torch.equal(o1, o2) and torch.equal(w1, w2)
    assert o1.shape == (2, 5, 4, 8) and w1.shape == (2, 4, 5, 5)
    masked = (~allowed & allowed.any(-1, keepdim=True)).expand(2, 4, 5, 5)  # masked keys of non-empty rows
    assert masked.any() and (w1[masked] == 0).all()


@pytest.mark.parametrize("fmt", ["e4m3", "bf16"])
def test_attention_gqa_equals_repeated_heads_and_handwritten(fmt):
    """GQA query heads are stacked as rows against their K/V head (no repeated K/V): bit for bit
    the attention over explicitly repeated heads, and head by head the handwritten formula."""
    q, k, v = _qkv()
    cfg = LMulConfig(fmt=fmt, mode="bit")
    out, weights = lmul_attention(_Attn(), q, k, v, None, scaling=0.3, softcap=2.0, config=cfg)
    out_rep, _ = lmul_attention(_Attn(), q, repeat_kv(k, 2), repeat_kv(v, 2), None, scaling=0.3, softcap=2.0,
                                config=cfg)
    assert torch.equal(out, out_rep)
    # head 3 uses kv head 1, written out by hand
    s = lmul.matmul(q[0, 3], k[0, 1].t(), fmt=fmt) * 0.3
    p = torch.softmax(torch.tanh(s / 2.0) * 2.0, dim=-1)
    torch.testing.assert_close(weights[0, 3], p)
    torch.testing.assert_close(out[0, :, 3], lmul.matmul(p, v[0, 1], fmt=fmt))


def test_attention_rejects_sinks_and_bad_heads():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="s_aux"):
        lmul_attention(_Attn(), q, k, v, None, config=LMulConfig(), s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="not a multiple"):
        lmul_attention(_Attn(), q, k[:, :1].expand(2, 3, 5, 8), v[:, :1].expand(2, 3, 5, 8), None, config=LMulConfig())


# ------------------------------------------------------------------------------- element-wise modules

EXACT = LMulConfig(fmt="fp32", mode="exact", scope="all")


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls_name,unit_offset", [("LlamaRMSNorm", False), ("Qwen3RMSNorm", False),
                                                  ("Gemma2RMSNorm", True), ("Gemma3RMSNorm", True)])
def test_rmsnorm_exact_mode_is_the_transformers_module_bit_for_bit(cls_name, unit_offset, dtype):
    import importlib

    arch = cls_name.removesuffix("RMSNorm").lower()
    norm = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), cls_name)(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(rand(16, seed=20) * 0.5)
    norm = norm.to(dtype)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    x = rand(3, 16, seed=21, dtype=dtype) * 4
    ours = LMulRMSNorm(norm.weight, eps, EXACT, unit_offset=unit_offset)
    with torch.no_grad():
        assert torch.equal(ours(x), norm(x))


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_bit_mode_routes_both_products_through_lmul(unit_offset):
    cfg = LMulConfig(fmt="e4m3", scope="all")
    w = nn.Parameter(rand(16, seed=22))
    x = rand(3, 16, seed=23) * 3
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    normed = lmul.mul(x, r, fmt="e4m3")
    want = lmul.mul(normed, 1.0 + w, fmt="e4m3") if unit_offset else lmul.mul(w, normed, fmt="e4m3")
    with torch.no_grad():
        got = LMulRMSNorm(w, 1e-5, cfg, unit_offset=unit_offset)(x)
    assert torch.equal(got, want)
    assert not torch.equal(got, (x * r) * ((1 + w) if unit_offset else w))


def test_layernorm_exact_mode_close_to_torch_and_bit_mode_composition():
    torch.manual_seed(0)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.copy_(rand(16, seed=24))
        ln.bias.copy_(rand(16, seed=25))
    x = rand(4, 16, seed=26) * 3 + 1
    with torch.no_grad():
        # torch's fused layer_norm rounds differently from mean/var/products: not bit-identical. Each
        # float32 evaluation of y = (x - μ)·r·w + b, r = (σ² + ε)^-1/2, n = 16, is within
        #   |Δμ|·r·|w| + |x̂||w|·6u + |b|·u,   |Δμ| <= γ_n·mean|x|   (u = 2^-24, γ_n = nu/(1-nu))
        # of the exact value: μ and σ² are sums of n terms (Higham 3.1; σ² sums non-negative terms,
        # relative error γ_{n+1}, entering r at half that), x - μ, r (torch's rsqrt, <= 2 ulps), ·w, +b
        # one rounding each: 6u relative on |x̂||w|. The two evaluations differ by at most twice that.
        u = 2.0**-24
        got, ref = LMulLayerNorm(ln, EXACT)(x).double(), ln(x).double()
        xd, w, b = x.double(), ln.weight.double(), ln.bias.double()
        mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
        r = (var + ln.eps).rsqrt()
        gamma = lambda n: n * u / (1 - n * u)
        xhat = (xd - mu) * r
        per_side = gamma(16) * xd.abs().mean(-1, keepdim=True) * r * w.abs() + \
            (6 * u + gamma(17) / 2) * xhat.abs() * w.abs() + u * b.abs()
        assert ((got - ref).abs() <= 2 * per_side).all()
        cfg = LMulConfig(fmt="bf16", scope="all")
        got = LMulLayerNorm(ln, cfg)(x)
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    want = lmul.mul(lmul.mul(x - mu, torch.rsqrt(var + ln.eps)), ln.weight.detach()) + ln.bias.detach()
    assert torch.equal(got, want)


@needs_transformers
def test_gated_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2, hidden_act="silu"))
    x = rand(2, 3, 8, seed=27)
    with torch.no_grad():
        assert torch.equal(LMulGatedMLP(mlp, EXACT)(x), mlp(x))
        cfg = LMulConfig(fmt="e5m2", scope="all")
        got = LMulGatedMLP(mlp, cfg)(x)
        want = mlp.down_proj(lmul.mul(F.silu(mlp.gate_proj(x)), mlp.up_proj(x), fmt="e5m2"))
    assert torch.equal(got, want)


def _rotary_inputs(dtype=torch.float32):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4))
    x = rand(2, 5, 32, seed=30, dtype=dtype)
    pos = torch.arange(5)[None].expand(2, 5)
    q, k = rand(2, 4, 5, 8, seed=31, dtype=dtype), rand(2, 2, 5, 8, seed=32, dtype=dtype)
    return rotary, x, pos, q, k


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_products_go_through_lmul(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary, x, pos, q, k = _rotary_inputs(dtype)
    cos, sin = rotary(x, pos)
    with torch.no_grad():
        ecos, esin = LMulRotaryEmbedding(rotary, EXACT)(x, pos)
        assert isinstance(ecos, _LMulFactor)
        eq, ek = apply_rotary_pos_emb(q, k, ecos, esin)
        pq, pk = apply_rotary_pos_emb(q, k, cos, sin)
        assert type(eq) is torch.Tensor and torch.equal(eq, pq) and torch.equal(ek, pk)  # exact mode: same bits

        cfg = LMulConfig(fmt="e4m3", scope="all")
        lcos, lsin = LMulRotaryEmbedding(rotary, cfg)(x, pos)
        lq, _ = apply_rotary_pos_emb(q, k, lcos, lsin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    want = lmul.mul(q, c, fmt="e4m3").to(dtype) + lmul.mul(_rotate_half(q), s, fmt="e4m3").to(dtype)
    assert torch.equal(lq, want)
    assert not torch.equal(lq, pq)


@needs_transformers
def test_rotary_factor_only_changes_tensor_products():
    rotary, x, pos, q, _ = _rotary_inputs()
    with torch.no_grad():
        fcos, _ = LMulRotaryEmbedding(rotary, LMulConfig(fmt="e4m3", scope="all"))(x, pos)
    plain = fcos.as_subclass(torch.Tensor)
    for out, want in ((fcos + 1, plain + 1), (fcos * 2.0, plain * 2.0), (fcos.sum(), plain.sum())):
        assert type(out) is torch.Tensor and torch.equal(out, want)
    assert isinstance(fcos.unsqueeze(1)[:, :, :2].to(torch.float32), _LMulFactor)
