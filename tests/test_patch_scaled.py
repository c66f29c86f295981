"""Scaled presets (issue 27) through the patch: names, CLI arms, every hook (attention, LMulLinear,
element-wise products) and gradients.

Oracles: for attention and LMulLinear a hand-written computation built from :func:`lmul.matmul` with
the scaled spec (the unit tested in tests/test_scaling.py); for element-wise products and the
straight-through operands an independent float64/NumPy computation of the group scales
(torchao's rounded-down multiplier, OCP MX's ``floor(log2 amax) - emax``), the rounding of
``tests/oracle.py`` and its L-Mul products.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmul
from lmul.config import LMulConfig
from lmul.nn import LMulLinear, lmul_attention
from lmul.spec import PRESETS, LMulSpec
from tests.oracle import SmallFormat, default_offset, spec_products

SCALED_ACC = ["e4m3-all-row-sacc", "e5m2-all-row-sacc", "lmul-all-k3-row-sacc"]
SCALED = [n for n, (kw, _) in PRESETS.items() if kw.get("scaling", "none") != "none" and n not in SCALED_ACC]
PRECISION_ACC = ["e4m3-all-p", "e5m2-all-p", "lmul-all-k3-p"]
NEW = SCALED + PRECISION_ACC + SCALED_ACC

# (E, m, finite_only, max, emax) of the element formats, written out here from OCP MX v1.0 / OFP8
ORACLE_FMT = {"e4m3": (4, 3, True, 448.0, 8), "e5m2": (5, 2, False, 57344.0, 15)}


# ------------------------------------------------------------------------------ names and arms

def test_scaled_presets_are_the_documented_ones():
    assert set(SCALED) == {"e4m3-row", "e4m3-mx", "e5m2-row", "e5m2-mx", "lmul-row", "lmul-mx", "mxfp4", "lmul-mxfp4",
                           "e4m3-all-row", "e4m3-all-mx", "e5m2-all-row", "e5m2-all-mx", "lmul-all-k3-row",
                           "lmul-all-k3-mx", "mxfp4-all", "lmul-all-mxfp4"}
    for name in SCALED:  # <arm>-<scaling>: the suffix is the scaling, "-all" the scope
        spec, scope = LMulSpec.from_name(name), LMulConfig.from_name(name).scope
        assert spec.scaling == ("row" if name.endswith("-row") else "mx")
        assert scope == ("all" if "-all" in name else "attention")
        assert spec.acc is None  # float32 sums, as fp8 hardware accumulates
        assert spec.fmt.name == ("fp4" if "mxfp4" in name else "e5m2" if name.startswith("e5m2") else "e4m3")
        assert spec.mode == ("bit" if name.startswith("lmul") else "exact")
    # the literal Table 6 arms are unchanged; the precision readings keep their operands
    assert PRESETS["e4m3-all"][0] == dict(fmt="e4m3", mode="exact", acc="e4m3", acc_block=128)
    assert PRESETS["lmul-all-k3"][0] == dict(fmt="e4m3", mode="bit", acc="e4m3", acc_block=128)
    for p, lit, acc in (("e4m3-all-p", "e4m3-all", "e8m3"), ("e5m2-all-p", "e5m2-all", "e8m2"),
                        ("lmul-all-k3-p", "lmul-all-k3", "e8m3")):
        assert LMulSpec.from_name(p) == LMulSpec.from_name(lit, acc=acc)
        assert LMulConfig.from_name(p).scope == "all"
    # the scaled-accumulator readings: the literal arm's fp8 accumulator, scaled per 128 x 128 output
    # tile, on row-scaled operands
    for s, lit in zip(SCALED_ACC, ("e4m3-all", "e5m2-all", "lmul-all-k3"), strict=True):
        assert LMulSpec.from_name(s) == LMulSpec.from_name(lit, scaling="row", acc_tile=128)
        assert LMulConfig.from_name(s).scope == "all"


@pytest.mark.parametrize("name", NEW)
def test_new_presets_round_trip(name):
    spec, cfg = LMulSpec.from_name(name), LMulConfig.from_name(name)
    assert spec == LMulSpec(**PRESETS[name][0])
    assert LMulSpec.from_name(spec.name) == spec  # the spec name carries the scaling token
    assert cfg.tag == name and cfg.preset == name
    assert LMulConfig(**cfg.options()) == cfg
    assert cfg.to_dict()["spec"]["scaling"] == spec.scaling
    parser = __import__("argparse").ArgumentParser()
    LMulConfig.add_arguments(parser)
    assert LMulConfig.from_arguments(parser.parse_args(["--preset", name])) == cfg
    assert LMulConfig.from_arguments(parser.parse_args(["--spec", spec.name, "--scope", cfg.scope])) == cfg


def test_eval_and_finetune_accept_the_arms():
    from lmul.eval.run import EvalConfig
    from lmul.finetune.run import FinetuneConfig

    cfg = EvalConfig.build("arc_easy", ",".join(NEW))
    assert cfg.arms == ("exact", *NEW)
    ft = FinetuneConfig(arms=("exact", *NEW))
    for arm in NEW:
        assert ft.arm_config(arm) == LMulConfig.from_name(arm)


def test_eval_cli_names_a_bad_scaled_arm(capsys):
    from lmul.cli import main

    assert main(["eval", "--arms", "exact,e4m3-rows"]) == 2
    assert "unknown arm(s) ['e4m3-rows']" in capsys.readouterr().err


# ------------------------------------------------------------------------------ attention hook

def _handwritten_attention(q, k, v, mask, spec, scaling):
    """Per head: S = s·L-matmul(q_h, k_gᵀ) (+ additive mask), float32 softmax, L-matmul(P, v_g);
    Q·Kᵀ contracts over the head dim, P·V over the keys."""
    b_, h_, sq, d = q.shape
    h_kv = k.shape[1]
    out = torch.empty(b_, sq, h_, d)
    for b in range(b_):
        for h in range(h_):
            g = h // (h_ // h_kv)
            s = lmul.matmul(q[b, h], k[b, g].transpose(0, 1), spec=spec) * scaling
            if mask is not None:
                s = s + mask[b, 0]
            p = torch.softmax(s, dim=-1, dtype=torch.float32)
            out[b, :, h] = lmul.matmul(p, v[b, g], spec=spec)
    return out


@pytest.mark.parametrize("name", ["e4m3-row", "lmul-mx", "lmul-row", "mxfp4", "lmul-mxfp4", "e5m2-mx"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_module_equals_handwritten_bit_for_bit(name, masked):
    g = torch.Generator().manual_seed(3)
    b, h, h_kv, sq, sk, d = 2, 4, 2, 5, 37, 40  # head dim 40 and 37 keys: ragged mx groups on both products
    q = torch.randn(b, h, sq, d, generator=g) * 30
    k = torch.randn(b, h_kv, sk, d, generator=g) * torch.logspace(-3, 3, d)  # channels of very different size
    v = torch.randn(b, h_kv, sk, d, generator=g) * 1e3
    mask = None
    if masked:
        allowed = torch.arange(sk)[None, :] <= torch.arange(sk - sq, sk)[:, None]
        mask = torch.zeros(b, 1, sq, sk).masked_fill(~allowed, torch.finfo(torch.float32).min)
    cfg = LMulConfig.from_name(name)
    out, weights = lmul_attention(torch.nn.Module().eval(), q, k, v, mask, scaling=0.125, config=cfg)
    expected = _handwritten_attention(q, k, v, mask, cfg.spec, 0.125)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    # and the scaling matters: the unscaled spec gives other bits
    plain, _ = lmul_attention(torch.nn.Module().eval(), q, k, v, mask, scaling=0.125,
                              config=cfg.replace(scaling="none"))
    assert not torch.equal(out, plain)


# ------------------------------------------------------------------------------ LMulLinear

@pytest.mark.parametrize("name", ["e4m3-all-row", "lmul-all-k3-mx", "lmul-all-mxfp4"])
def test_linear_scales_the_weight_along_in_features(name):
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(70, 9)
    with torch.no_grad():  # rows of very different size, some beyond e4m3's 448
        lin.weight.mul_(torch.logspace(-4, 4, 9)[:, None])
    x = torch.randn(3, 4, 70, generator=g) * 50
    cfg = LMulConfig.from_name(name)
    layer = LMulLinear.from_linear(lin, cfg)
    expected = (lmul.matmul(x.reshape(-1, 70), lin.weight.detach().t(), spec=cfg.spec) + lin.bias.detach()).reshape(
        3, 4, 9)
    with torch.no_grad():
        cached = layer(x)  # through the weight cache
        again = layer(x)
    live = layer(x)  # autograd: the live Parameter
    for y in (cached, again, live):
        assert torch.equal(y.detach().view(torch.int32), expected.view(torch.int32))
    # the cache holds the unquantized weight: pre-quantizing it unscaled (clipping at the format's max) differs
    clipped = lmul.quantize(lin.weight.detach().t(), cfg.spec.fmt)
    assert not torch.equal(lmul.matmul(x.reshape(-1, 70), clipped, spec=cfg.spec), expected.reshape(-1, 9) -
                           lin.bias.detach())


# ------------------------------------------------------------------------------ element-wise products

def _oracle_scaled(x: np.ndarray, fmt: str, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) per element, groups along the last axis: row = the whole last axis, mx = 32."""
    e, m, fo, fmax, emax = ORACLE_FMT[fmt]
    x = np.atleast_2d(np.asarray(x, np.float64))
    k = x.shape[-1]
    size = k if scaling == "row" else 32
    scale = np.empty_like(x)
    for j0 in range(0, k, size):
        amax = np.abs(x[..., j0:j0 + size]).max(-1, keepdims=True)
        with np.errstate(divide="ignore"):
            if scaling == "mx":
                s = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax
            else:  # torchao: r = fl32(max / max(amax, 1e-12)) rounded down to a power of two, X = 1 / r
                r = (fmax / np.maximum(amax, 1e-12)).astype(np.float32).astype(np.float64)
                s = -np.floor(np.log2(r))
        s = np.where(amax > 0, np.clip(s, -127, 127), 0.0)
        scale[..., j0:j0 + size] = np.exp2(s)
    q = SmallFormat(e, m, fo).quantize(x / scale)
    return q, scale


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["row", "mx"])
@pytest.mark.parametrize("mode", ["bit", "exact"])
def test_scaled_elementwise_product_equals_oracle(fmt, scaling, mode):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 75, generator=g) * torch.logspace(-6, 5, 6)[:, None]  # residual-stream-like rows
    x[2, :40] = 0.0
    x[3, 5] = 3e4
    spec = LMulSpec(fmt, mode, scaling=scaling)
    e, m = ORACLE_FMT[fmt][:2]
    c = default_offset(m)
    for y in (torch.rand(6, 1, generator=g) + 0.1,            # an rsqrt factor per row
              torch.randn(75, generator=g) * 10,                  # a norm weight, one row
              torch.randn(6, 75, generator=g) * 1e-3):            # gate * up
        qx, sx = _oracle_scaled(x.numpy(), fmt, scaling)
        qy, sy = _oracle_scaled(y.numpy(), fmt, scaling)
        qy, sy = qy.reshape(y.shape), sy.reshape(y.shape)
        expected = (spec_products(*np.broadcast_arrays(qx, qy), e, m, mode, c).astype(np.float64)
                    * sx * sy).astype(np.float32)
        got = lmul.mul(x, y, spec=spec)
        assert got.shape == torch.broadcast_shapes(x.shape, y.shape)
        np.testing.assert_array_equal(got.numpy().view(np.int32), expected.view(np.int32))


def test_scaled_elementwise_keeps_the_residual_stream():
    # values far beyond e4m3's 448 (SmolLM2's residual stream reaches ~2.4e4): unscaled e4m3 clips, row scaling
    # keeps them
    x = torch.tensor([[24245.0, -3000.0, 1.0, 0.01]])
    one = torch.ones(1, 4)
    scaled = lmul.mul(x, one, spec=LMulSpec("e4m3", "exact", scaling="row"))
    plain = lmul.mul(x, one, spec=LMulSpec("e4m3", "exact"))
    assert plain[0, 0] == 448.0 and plain[0, 1] == -448.0
    assert ((scaled[0, :2] / x[0, :2] - 1).abs() <= 2.0**-4).all()


# ------------------------------------------------------------------------------ gradients

def test_gradients_use_the_scaled_operands():
    g = torch.Generator().manual_seed(11)
    spec = LMulSpec("e4m3", "bit", scaling="row")
    a = (torch.randn(5, 40, generator=g) * 1e3).requires_grad_()
    b = (torch.randn(40, 3, generator=g) * 1e-4).requires_grad_()  # unscaled e4m3 would flush most of these to 0
    gc = torch.randn(5, 3, generator=g)
    lmul.matmul(a, b, spec=spec).backward(gc)
    qa, sa = _oracle_scaled(a.detach().numpy(), "e4m3", "row")        # rows of A along K
    qb, sb = _oracle_scaled(b.detach().numpy().T, "e4m3", "row")      # columns of B along K
    deq_a = torch.from_numpy(qa * sa).float()
    deq_b = torch.from_numpy((qb * sb).T).float()
    assert torch.equal(a.grad, torch.matmul(gc, deq_b.t()))
    assert torch.equal(b.grad, torch.matmul(deq_a.t(), gc))
    x = (torch.randn(4, 33, generator=g) * 1e4).requires_grad_()
    y = (torch.randn(4, 33, generator=g) * 1e-5).requires_grad_()
    gp = torch.randn(4, 33, generator=g)
    lmul.mul(x, y, spec=spec).backward(gp)
    qx, sx = _oracle_scaled(x.detach().numpy(), "e4m3", "row")
    qy, sy = _oracle_scaled(y.detach().numpy(), "e4m3", "row")
    assert torch.equal(x.grad, gp * torch.from_numpy(qy * sy).float())
    assert torch.equal(y.grad, gp * torch.from_numpy(qx * sx).float())


# ------------------------------------------------------------------------------ whole models

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)  # SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads, inter 1536
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", NEW)
def test_tiny_llama_patched_with_each_new_preset(name):
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with lmul.patch(model, name):
            out = model(ids).logits
            arms = {arm for _, _, arm in lmul.inspect(model).rows}
        assert torch.equal(model(ids).logits, ref)  # undone
    assert name in arms  # the report of what runs where names the preset
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
