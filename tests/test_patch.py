"""lmul.patch / unpatch / inspect and LMulConfig on tiny random transformers models.

Models are built from configs in code (no downloads), seeded before each build; the real size is
in the comment. Oracles: transformers' own eager attention (with a test backend computing the
exact fp32 matmul with torch), and a hand-written per-head attention that calls lmul.matmul and
builds its causal / padding / sliding-window mask from scratch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import lmul
from lmul import kernels
from lmul.config import PRESETS, LMulConfig
from lmul.formats import quantize
from lmul.nn import LMulLinear, repeat_kv

transformers = pytest.importorskip("transformers")
T = transformers

VOCAB = 96
ARCHS = ["llama", "mistral", "gemma2", "gemma3", "qwen2", "qwen3", "gpt2"]


def build(arch: str, dtype: torch.dtype = torch.float32, attn: str | None = None) -> nn.Module:
    """A tiny random causal LM of ``arch`` (seeded); sliding windows of 3 so that 9 tokens use them.
    ``attn``: the attention implementation (default: transformers' choice, sdpa or eager for Gemma 2)."""
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":  # SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv heads, inter 1536, vocab 49152
        cfg, cls = T.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True), T.LlamaForCausalLM
    elif arch == "mistral":  # Mistral-7B: hidden 4096, 32 layers, 32 heads, 8 kv heads, sliding window 4096
        cfg, cls = T.MistralConfig(**small, num_key_value_heads=1, sliding_window=3), T.MistralForCausalLM
    elif arch == "gemma2":  # Gemma-2-2B: hidden 2304, 26 layers, 8 heads, 4 kv, head_dim 256, softcap 50/30
        cfg = T.Gemma2Config(**small, num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                             attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
        cls = T.Gemma2ForCausalLM
    elif arch == "gemma3":  # Gemma-3-1B: hidden 1152, 26 layers, 4 heads, 1 kv head, head_dim 256, sliding 512
        cfg = T.Gemma3TextConfig(**small, num_key_value_heads=1, head_dim=8, sliding_window=3, query_pre_attn_scalar=8,
                                 layer_types=["sliding_attention", "full_attention"])
        cls = T.Gemma3ForCausalLM
    elif arch == "qwen2":  # Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads, 2 kv heads, inter 4864, qkv bias
        cfg, cls = T.Qwen2Config(**small, num_key_value_heads=2), T.Qwen2ForCausalLM
    elif arch == "qwen3":  # Qwen3-0.6B: hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128, q/k norms
        cfg, cls = T.Qwen3Config(**small, num_key_value_heads=2, head_dim=8), T.Qwen3ForCausalLM
    elif arch == "gpt2":  # GPT-2: n_embd 768, 12 layers, 12 heads, vocab 50257, Conv1D projections, LayerNorm
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
        cls = T.GPT2LMHeadModel
    else:
        raise ValueError(arch)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    return cls(cfg).to(dtype).eval()


def inputs(batch: int = 2, seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a 2-D padding mask with the second row left-padded by 3."""
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return ids, mask


def _torch_exact(a: torch.Tensor, b: torch.Tensor, spec) -> torch.Tensor:
    """Exact-mode matmul as torch computes it (mm for one batch, as F.linear does; else bmm)."""
    a, b = quantize(a, spec.fmt, spec.rounding), quantize(b, spec.fmt, spec.rounding)
    return torch.mm(a[0], b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


@pytest.fixture
def torch_exact_backend():
    """A backend that runs exact float32 matmuls with torch's own kernels (test-only), so that the
    patched model can be compared bit for bit with the unpatched one."""
    entry = kernels.Backend("torch-exact-test", "matmul", _torch_exact,
                            lambda a, spec: None if spec.mode == "exact" and spec.acc is None else "exact fp32 only",
                            "test only")
    with pytest.MonkeyPatch.context() as mp:  # a test-only entry in the table, removed afterwards
        mp.setitem(kernels._BY_KEY, ("matmul", entry.name), entry)
        yield entry.name


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# --------------------------------------------------------------------------------------------- config

# (preset, expected fields) -- the evaluation arms as the brief and the paper define them
PRESET_TABLE = [
    ("exact", dict(fmt="fp32", mode="exact", scope="none")),
    ("e4m3", dict(fmt="e4m3", mode="exact", scope="attention")),
    ("e5m2", dict(fmt="e5m2", mode="exact", scope="attention")),
    ("lmul", dict(fmt="bf16", mode="bit", scope="attention", rounding="rne", offset=None)),
    ("lmul-k2", dict(fmt="e8m2", mode="bit", rounding="trunc", scope="attention")),
    ("lmul-k3", dict(fmt="e8m3", mode="bit", rounding="trunc", scope="attention")),
    ("lmul-k4", dict(fmt="e8m4", mode="bit", rounding="trunc", scope="attention")),
    ("lmul-formula", dict(fmt="bf16", mode="formula", scope="attention")),
    ("mitchell", dict(fmt="bf16", mode="bit", offset=0.0, scope="attention")),
    ("lmul-all", dict(fmt="bf16", mode="bit", scope="all")),
    # issue 27: Table 6's precision accumulator, and fp8/fp4 with power-of-two operand scales
    ("e4m3-all-p", dict(fmt="e4m3", mode="exact", acc="e8m3", acc_block=128, scope="all")),
    ("e5m2-all-p", dict(fmt="e5m2", mode="exact", acc="e8m2", acc_block=128, scope="all")),
    ("lmul-all-k3-p", dict(fmt="e4m3", mode="bit", acc="e8m3", acc_block=128, scope="all")),
    ("e4m3-row", dict(fmt="e4m3", mode="exact", scaling="row", scope="attention")),
    ("e4m3-mx", dict(fmt="e4m3", mode="exact", scaling="mx", scope="attention")),
    ("e5m2-row", dict(fmt="e5m2", mode="exact", scaling="row", scope="attention")),
    ("lmul-mx", dict(fmt="e4m3", mode="bit", scaling="mx", acc=None, scope="attention")),
    ("mxfp4", dict(fmt="fp4", mode="exact", scaling="mx", scope="attention")),
    ("lmul-mxfp4", dict(fmt="fp4", mode="bit", offset=None, scaling="mx", scope="attention")),
    ("e4m3-all-row", dict(fmt="e4m3", mode="exact", scaling="row", acc=None, scope="all")),
    ("lmul-all-k3-row", dict(fmt="e4m3", mode="bit", scaling="row", acc=None, scope="all")),
    ("lmul-all-k3-mx", dict(fmt="e4m3", mode="bit", scaling="mx", acc=None, scope="all")),
]


@pytest.mark.parametrize("name,fields", PRESET_TABLE, ids=[p[0] for p in PRESET_TABLE])
def test_presets(name, fields):
    cfg = LMulConfig.from_name(name)
    for k, v in fields.items():
        got = getattr(cfg.placement if k in ("scope", "layers") else cfg.spec, k)
        if k in ("fmt", "acc") and got is not None:
            got = got.name
        if k == "offset" and v is None:  # the paper's default c = 2^-l(m), resolved in the spec
            got, v = cfg.spec.default_offset, True
        assert got == v, (name, k)
    assert cfg.tag == name


def test_tags_are_distinct_and_describe_non_presets():
    assert len({LMulConfig.from_name(n).tag for n in PRESETS}) == len(PRESETS)
    assert LMulConfig(fmt="e4m3", mode="bit", scope="all", acc="e4m3").tag == "all-e4m3-bit-acce4m3"
    assert LMulConfig(fmt="E5M6", rounding="trunc").tag == "attention-e5m6-bit-trunc"
    assert LMulConfig(fmt="e8m3", layers=[0, "model.layers.1"]).tag == "attention-e8m3-bit-L0_modellayers1"
    assert LMulConfig(fmt="e8m3", rounding="trunc", layers=[2]).tag == "lmul-k3-L2"


def test_config_normalises_spellings():
    assert LMulConfig(fmt="E4M3", mode="exact") == LMulConfig(fmt="e4m3", mode="exact")
    assert LMulConfig(layers=[0, 1]).layers == (0, 1)
    assert LMulConfig.from_name("lmul", scope="all") == LMulConfig.from_name("lmul-all")


@pytest.mark.parametrize("kwargs,match", [
    (dict(fmt="e9m2"), "fmt='e9m2'"),
    (dict(mode="fast"), "mode='fast'"),
    (dict(rounding="up"), "rounding='up'"),
    (dict(scope="mlp"), "scope='mlp'"),
    (dict(acc="e4"), "acc='e4'"),
    (dict(acc_block=0), "acc_block=0"),
    (dict(offset=0.3, mode="bit"), "0.3"),
    (dict(offset=0.0625, mode="exact"), "offset=0.0625"),
    (dict(scope="none"), "scope='none'"),
    (dict(layers=[]), "layers=\\[\\]"),
    (dict(layers=[1.5]), "layers=\\[1.5\\]"),
])
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMulConfig(**kwargs)


def test_cli_options_come_from_the_fields():
    import argparse

    parser = argparse.ArgumentParser()
    LMulConfig.add_arguments(parser)
    assert LMulConfig.from_arguments(parser.parse_args([])) == LMulConfig()
    ns = parser.parse_args(["--preset", "lmul-k3", "--layers", "0,lm_head", "--acc-block", "4", "--acc", "e4m3"])
    assert LMulConfig.from_arguments(ns) == LMulConfig(fmt="e8m3", rounding="trunc", layers=(0, "lm_head"),
                                                       acc="e4m3", acc_block=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "fast"])
    help_text = parser.format_help()
    assert "--acc-block" in help_text and "Mitchell" in help_text


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown LMulConfig preset 'lmul-k9'"):
        LMulConfig.from_name("lmul-k9")


def test_layer_selection():
    cfg = LMulConfig(layers=(1, "lm_head", "*.mlp"))
    assert cfg.selects("model.layers.1.self_attn")
    assert cfg.selects("transformer.h.1.attn.c_attn")
    assert not cfg.selects("model.layers.11.self_attn")
    assert cfg.selects("lm_head")
    assert cfg.selects("model.layers.0.mlp.up_proj")
    assert not cfg.selects("model.layers.0.self_attn")


def test_import_lmul_does_not_import_transformers():
    code = "import sys, lmul; lmul.LMulConfig(); assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ exact mode, bit for bit

@pytest.mark.parametrize("scope", ["attention", "linear", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_fp32_reproduces_eager_logits_bit_for_bit(arch, scope, torch_exact_backend):
    """mode="exact", fmt="fp32" through every hook gives the unpatched (eager) logits bit for bit.

    The matmuls use a test backend with torch's kernels (the reference backend sums in float64, so it
    is more accurate than torch and not bit-identical; see the next test). GPT-2's LayerNorm is left
    out under scope="all": torch's fused layer_norm rounds differently from the explicit
    mean/variance/products (LMulLayerNorm is checked against it with a tolerance in test_nn).

    Bit for bit holds only where both sides hand torch the same matrix shapes: lmul_attention stacks
    the query heads of a GQA group as rows of one matmul ([B, H_kv, n_rep·S, D]) where eager
    attention repeats K/V ([B, H, S, D]), and a BLAS may choose another kernel, and so another
    summation order, for another row count (it does on AMD EPYC: 1-ulp logit differences, issue 25).
    So the hooks are run here with K/V repeated to eager's layout (the same computation); that the
    stacked layout gives the repeated layout's bits with lmul's own kernels, whose summation order
    does not depend on the row count, is test_nn's test_attention_gqa_equals_repeated_heads_and_handwritten."""
    model = build(arch, attn="eager")
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    skip_ln = (lambda m, fqn: not isinstance(m, nn.LayerNorm)) if arch == "gpt2" else None
    patch_module = sys.modules["lmul.patch"]  # the module (lmul.patch is also the function it exports)
    stacked = patch_module.lmul_attention

    calls = []

    def repeated_layout(module, query, key, value, *args, **kwargs):
        n_rep = query.shape[1] // key.shape[1]
        calls.append(n_rep)
        return stacked(module, query, repeat_kv(key, n_rep), repeat_kv(value, n_rep), *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, \
            lmul.patch(model, fmt="fp32", mode="exact", scope=scope, backend=torch_exact_backend, filter_fn=skip_ln):
        mp.setattr(patch_module, "lmul_attention", repeated_layout)
        out = logits(model, ids, mask)
    assert bool(calls) == (scope != "linear")
    valid = mask.bool()
    assert torch.equal(out[valid], ref[valid])


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_fp32_reference_backend_close_to_default_model(arch):
    """With the reference backend (float64 sums) and the model's default sdpa attention the
    logits agree to float32 summation accuracy."""
    model = build(arch)
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    with lmul.patch(model, fmt="fp32", mode="exact", scope="all", backend="reference"):
        out = logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- hand-written attention

class Oracle:
    """Per-head attention written out by hand: S = s·L-matmul(q_h, k_gᵀ), its own causal,
    padding and sliding-window mask, optional tanh softcap, float32 softmax, L-matmul(P, v_g).
    Modules whose layer index is not in ``layers`` compute exact torch matmuls."""

    def __init__(self, config: LMulConfig, pad: torch.Tensor, layers=None):
        self.config, self.pad, self.layers = config, pad, layers

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
        assert attention_mask is None  # no mask builder is registered for the oracle: it builds its own
        b_, h_, sq, d = query.shape
        h_kv, sk = key.shape[1], key.shape[2]
        dtype = query.dtype
        scaling = d ** -0.5 if scaling is None else scaling
        use_lmul = self.layers is None or module.layer_idx in self.layers
        mm = (lambda a, b: lmul.matmul(a, b, **self.config.matmul_kwargs())) if use_lmul else torch.matmul
        window = kw.get("sliding_window")
        qpos = torch.arange(sk - sq, sk)[:, None]
        kpos = torch.arange(sk)[None, :]
        out = torch.empty(b_, sq, h_, d, dtype=dtype)
        for b in range(b_):
            allowed = (kpos <= qpos) & (self.pad[b, :sk][None, :] == 1)
            if window is not None:
                allowed &= kpos > qpos - window
            for h in range(h_):
                g = h // (h_ // h_kv)
                s = mm(query[b, h], key[b, g].transpose(0, 1)).to(dtype) * scaling
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                s = s.masked_fill(~allowed, torch.finfo(dtype).min)
                p = torch.softmax(s.float(), dim=-1).to(dtype)
                out[b, :, h] = mm(p, value[b, g]).to(dtype)
        return out, None


@pytest.fixture
def oracle_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    holder = {}
    ALL_ATTENTION_FUNCTIONS.register("lmul_oracle_test", lambda *a, **k: holder["fn"](*a, **k))
    yield holder
    del ALL_ATTENTION_FUNCTIONS._global_mapping["lmul_oracle_test"]


def oracle_logits(model, holder, config, ids, mask, layers=None):
    holder["fn"] = Oracle(config, mask, layers)
    impl = model.config._attn_implementation
    model.set_attn_implementation("lmul_oracle_test")
    try:
        return logits(model, ids, mask)
    finally:
        model.set_attn_implementation(impl)


@pytest.mark.parametrize("preset", ["lmul", "e4m3"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_attention_equals_handwritten(arch, preset, oracle_attention):
    model = build(arch)
    ids, mask = inputs()
    config = LMulConfig.from_name(preset)
    expected = oracle_logits(model, oracle_attention, config, ids, mask)
    with lmul.patch(model, config):
        out = logits(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)
    # and L-Mul changes something: not the exact model
    assert not torch.allclose(out[valid], logits(model, ids, mask)[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_attention_in_half_precision(dtype, oracle_attention):
    model = build("llama", dtype=dtype)
    ids, mask = inputs()
    config = LMulConfig.from_name("lmul")
    expected = oracle_logits(model, oracle_attention, config, ids, mask)
    with lmul.patch(model, config):
        out = logits(model, ids, mask)
    assert out.dtype == dtype
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid])  # dtype-appropriate defaults (bf16: 1.6e-2)


def test_layers_selects_attention_modules(oracle_attention):
    model = build("llama")
    ids, mask = inputs()
    config = LMulConfig.from_name("lmul", layers=(1,))
    expected = oracle_logits(model, oracle_attention, config, ids, mask, layers={1})
    with lmul.patch(model, config):
        out = logits(model, ids, mask)
        rows = {fqn: arm for fqn, _, arm in lmul.inspect(model).rows}
    assert rows["model.layers.0.self_attn"] == "exact (sdpa)"  # the model's own implementation
    assert rows["model.layers.1.self_attn"] == "lmul-L1"
    valid = mask.bool()
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- unpatch, generation

@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_bit_for_bit(arch):
    model = build(arch)
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    modules = [(n, id(m)) for n, m in model.named_modules()]
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    handle = lmul.patch(model, "lmul-all")
    assert not torch.equal(logits(model, ids, mask), ref)
    lmul.unpatch(model)
    assert not handle.active
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert model.config._attn_implementation == impl
    for n, p in model.named_parameters():
        assert id(p) == params[n][0] and torch.equal(p, params[n][1]), n
    assert not any("_lmul_attention" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, ids, mask), ref)


def test_context_manager_restores_on_error():
    model = build("llama")
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    with pytest.raises(KeyError), lmul.patch(model, "lmul"):
        raise KeyError("boom")
    assert "_lmul_handle" not in model.__dict__
    assert torch.equal(logits(model, ids, mask), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_equals_without(arch):
    model = build(arch)
    ids, mask = inputs()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad(), lmul.patch(model, "lmul"):
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_rotary_products_are_intercepted_in_every_architecture(arch):
    """Only the rotary module selected: the logits change, so the model's own apply_rotary_pos_emb
    multiplied through lmul.mul (the products themselves are checked in test_nn)."""
    model = build(arch)
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    rotary = type(model.model.rotary_emb).__name__
    with lmul.patch(model, "lmul-all", fmt="e4m3", filter_fn=lambda m, fqn: "rotary" in fqn) as handle:
        assert [(fqn, old) for fqn, old, _ in handle.swapped] == [("model.rotary_emb", rotary)]
        out = logits(model, ids, mask)
    # exact mode through the same hook is bit-identical (test above), so any change is L-Mul's
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max() > 1e-5


def test_exact_preset_changes_nothing():
    model = build("llama")
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    with lmul.patch(model, "exact") as handle:
        assert handle.swapped == [] and handle.attention == []
        assert torch.equal(logits(model, ids, mask), ref)


def test_inspect_lists_arms():
    model = build("gpt2")
    assert lmul.inspect(model).config is None
    with lmul.patch(model, "lmul-all"):
        summary = lmul.inspect(model)
        text = str(summary)
    arms = {what: arm for _, what, arm in summary.rows}
    assert set(arms.values()) == {"lmul-all"}
    assert {"Q·Kᵀ, A·V (L-matmul)", "x·Wᵀ (L-matmul)", "(x-μ)⊙rsqrt(σ²+ε), ⊙w"} <= set(arms)
    assert "transformer.h.*.attn" in text and "patched with lmul-all" in text
    assert "exact" in {arm for _, _, arm in lmul.inspect(model).rows}


def test_linear_scope_on_plain_torch_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    ref = model(x)
    with lmul.patch(model, scope="linear", fmt="e4m3", mode="bit") as handle:
        assert [fqn for fqn, _, _ in handle.swapped] == ["0", "2"]
        assert isinstance(model[0], LMulLinear) and model[0].weight is handle.swapped[0][2].weight
        out = model(x)
    assert not torch.allclose(out, ref)
    assert torch.equal(model(x), ref) and type(model[0]) is nn.Linear


# ------------------------------------------------------------------------------------------ errors

def _snapshot(model):
    return ([(n, id(m)) for n, m in model.named_modules()], model.config._attn_implementation,
            [n for n, m in model.named_modules() if "_lmul_attention" in m.__dict__], "_lmul_handle" in model.__dict__)


def test_patching_twice_is_an_error():
    model = build("llama")
    with lmul.patch(model, "lmul"):
        with pytest.raises(RuntimeError, match="already patched with 'lmul'.*unpatch"):
            lmul.patch(model, "lmul-all")
        assert lmul.inspect(model).config == "lmul"


def test_unpatch_unpatched_is_an_error():
    with pytest.raises(ValueError, match="not patched"):
        lmul.unpatch(build("llama"))


def test_config_and_keywords_must_agree():
    model = build("llama")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="disagree.*'fmt': \\('bf16', 'e4m3'\\)"):
        lmul.patch(model, LMulConfig.from_name("lmul"), fmt="e4m3")
    assert _snapshot(model) == before
    with lmul.patch(model, LMulConfig.from_name("lmul"), fmt="BF16", scope="attention") as handle:
        assert handle.config == LMulConfig.from_name("lmul")  # agreeing options are fine
    with lmul.patch(model, "lmul", fmt="e4m3") as handle:  # a preset name is refined by options
        assert handle.config == LMulConfig(fmt="e4m3", mode="bit", scope="attention")


def test_unsupported_attention_implementation():
    model = build("llama", attn="flex_attention")
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="attn_implementation='flex_attention'"):
        lmul.patch(model, "lmul")
    assert _snapshot(model) == before
    lmul.patch(model, scope="linear")  # linear scope does not touch attention


def test_attention_scope_needs_a_transformers_model():
    with pytest.raises(NotImplementedError, match="transformers PreTrainedModel.*Sequential"):
        lmul.patch(nn.Sequential(nn.Linear(2, 2)), "lmul")


class MyGatedMLP(nn.Module):  # an MLP lmul does not know: scope="all" must refuse it
    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_unknown_module_under_scope_all_leaves_nothing_half_patched():
    model = build("llama")
    model.model.layers[1].mlp = MyGatedMLP(model.model.layers[1].mlp)
    ids, mask = inputs()
    ref = logits(model, ids, mask)
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="model.layers.1.mlp is a MyGatedMLP"):
        lmul.patch(model, "lmul-all")
    assert _snapshot(model) == before
    assert torch.equal(logits(model, ids, mask), ref)
    with lmul.patch(model, "lmul-all", layers=(0,)):  # excluding it works
        pass


def test_failing_filter_leaves_nothing_half_patched():
    model = build("qwen3")
    before = _snapshot(model)
    calls = []

    def filter_fn(module, fqn):
        calls.append(fqn)
        if len(calls) > 5:
            raise RuntimeError("filter failed")
        return True

    with pytest.raises(RuntimeError, match="filter failed"):
        lmul.patch(model, "lmul-all", filter_fn=filter_fn)
    assert _snapshot(model) == before


def test_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="selected nothing"):
        lmul.patch(build("llama"), "lmul", layers=("no.such.module",))


def _matmul_has_gradient() -> bool:
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(lmul.matmul(a, b, fmt="fp32", mode="exact").sum(), a)
    return torch.allclose(g, b.sum(1).expand(3, 4))


@pytest.mark.skipif(not _matmul_has_gradient(),
                    reason="lmul.matmul returns no gradient yet (the kernels issue defines it)")
def test_training_through_exact_mode_gives_the_model_gradients():
    """Autograd through every hook: exact fp32 L-Mul gives the unpatched model's gradients."""
    model = build("llama")
    ids, mask = inputs()

    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100  # no loss predicted from padding positions (sdpa differs there)

    def grads():
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    with lmul.patch(model, fmt="fp32", mode="exact", scope="all"):
        got = grads()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------- shared modules (issue 24, finding 3)

def test_a_module_reused_in_one_parent_is_patched_at_every_position():
    """Sequential(lin, act, lin): both positions run L-Mul (named_children skips the repeat), as
    the same model with two separate copies of the layer does; unpatch puts the same object back."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    copies = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    copies.load_state_dict({"0.weight": lin.weight, "0.bias": lin.bias, "2.weight": lin.weight, "2.bias": lin.bias})
    x = torch.randn(5, 8)
    ref = seq(x)
    with torch.no_grad(), lmul.patch(copies, scope="linear", fmt="e4m3"):
        expected = copies(x)
    with torch.no_grad(), lmul.patch(seq, scope="linear", fmt="e4m3") as handle:
        assert isinstance(seq[0], LMulLinear) and seq[2] is seq[0]
        assert [fqn for fqn, _, _ in handle.swapped] == ["0", "2"]
        rows = {fqn: (what, arm) for fqn, what, arm in lmul.inspect(seq).rows}
        assert rows["0"] == rows["2"] == ("x·Wᵀ (L-matmul)", handle.config.tag)
        out = seq(x)
    assert not torch.equal(expected, ref)  # the copies' patch changes both layers
    assert torch.equal(out, expected)
    assert seq[0] is lin and seq[2] is lin
    assert torch.equal(seq(x), ref)


def test_a_module_shared_between_parents_is_patched_everywhere_or_refused():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    model = nn.Sequential(block, nn.Linear(4, 4), block)
    with lmul.patch(model, scope="linear", fmt="e4m3") as handle:
        assert model[0] is model[2] and isinstance(model[0][0], LMulLinear)
        assert {fqn for fqn, _, _ in handle.swapped} == {"0.0", "1", "2.0"}
        assert {fqn for fqn, *_ in lmul.inspect(model).rows} == {"0.0", "1", "2.0"}
    assert type(model[0][0]) is nn.Linear and model[0] is block and model[2] is block
    # selected under one name but not the other: one object cannot run two arms
    with pytest.raises(ValueError, match=r"same module object.*select all of its names or none"):
        lmul.patch(model, scope="linear", fmt="e4m3", filter_fn=lambda m, fqn: not fqn.startswith("2"))
    assert type(block[0]) is nn.Linear and "_lmul_handle" not in model.__dict__


def test_shared_attention_mlp_and_norm_modules_are_patched_under_every_name():
    """Tied layers in a transformers model (layer 1 reuses layer 0's attention, MLP and norm): the
    attention state and the swapped MLP/norm hold at both names, inspect lists both, unpatch
    restores the one original object at each place."""
    model = build("llama")
    l0, l1 = model.model.layers
    l1.self_attn, l1.mlp, l1.input_layernorm = l0.self_attn, l0.mlp, l0.input_layernorm
    attn, mlp, norm = l0.self_attn, l0.mlp, l0.input_layernorm
    ids, mask = inputs()

    def logits(model, ids, mask):  # no KV cache: both layers would write cache slot 0
        with torch.no_grad():
            return model(ids, attention_mask=mask, use_cache=False).logits

    ref = logits(model, ids, mask)
    with lmul.patch(model, "lmul-all", fmt="e4m3") as handle:
        assert l1.mlp is l0.mlp and type(l0.mlp).__name__ == "LMulGatedMLP"
        assert l1.input_layernorm is l0.input_layernorm and type(l0.input_layernorm).__name__ == "LMulRMSNorm"
        names = {fqn for fqn, _ in handle.attention}
        assert {"model.layers.0.self_attn", "model.layers.1.self_attn"} <= names
        rows = {(fqn, arm) for fqn, _, arm in lmul.inspect(model).rows}
        for i in (0, 1):
            assert (f"model.layers.{i}.self_attn", handle.config.tag) in rows
            assert (f"model.layers.{i}.mlp", handle.config.tag) in rows
            assert (f"model.layers.{i}.mlp.up_proj", handle.config.tag) in rows
    assert (l0.self_attn, l1.self_attn, l0.mlp, l1.mlp) == (attn, attn, mlp, mlp)
    assert l0.input_layernorm is norm and l1.input_layernorm is norm and type(mlp.up_proj) is nn.Linear
    assert torch.equal(logits(model, ids, mask), ref)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"LlamaAttention at \['model.layers.1.self_attn'\] is the same module"):
        lmul.patch(model, "lmul", layers=(1,))  # layer 0's attention is the same object
    assert _snapshot(model) == before and torch.equal(logits(model, ids, mask), ref)
