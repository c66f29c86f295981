"""Energy claims from Table 1 inputs, and operation counts against a traced forward pass."""

import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmul.analysis import energy

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten


def test_claim_95_from_table1():
    c = energy.claim_95()
    assert c["saving"] == pytest.approx(1 - 0.1 / 3.7)  # int32 add replaces an fp32 multiply
    assert c["saving"] >= 0.95 and round(c["saving"], 2) == 0.97


def test_claim_80_from_table1():
    c = energy.claim_80()
    assert c["saving"] == pytest.approx(1 - (0.1 + 0.9) / (3.7 + 0.9))
    assert round(c["saving"], 1) == 0.8 and c["saving"] < 0.8


def test_table1_values():
    assert energy.TABLE1[("mul", "fp32")] == 3.7 and energy.TABLE1[("add", "int32")] == 0.1
    assert energy.TABLE1[("mul", "fp16")] == 1.1 and energy.TABLE1[("add", "fp16")] == 0.4
    assert energy.DRAM_PJ_PER_BYTE == 1300 / 8


class _Count(TorchDispatchMode):
    """Independent oracle: multiplications the forward really executes, by aten op."""

    def __init__(self):
        super().__init__()
        self.c = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket
        if op is aten.mm:
            m, k = args[0].shape
            self.c["mm_mul"] += m * k * args[1].shape[1]
            self.c["mm_add"] += m * (k - 1) * args[1].shape[1]
        elif op is aten.bmm:
            b, m, k = args[0].shape
            self.c["bmm_mul"] += b * m * k * args[1].shape[2]
            self.c["bmm_add"] += b * m * (k - 1) * args[1].shape[2]
        elif op is aten.mul or (op is aten.pow and args[1] == 2):
            self.c["elementwise"] += out.numel()
        elif op in (aten.addmm, aten.matmul, aten.baddbmm, aten._scaled_dot_product_flash_attention):
            raise AssertionError(f"unexpected op {op}")
        return out


def _tiny(kv_heads, tied):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
        intermediate_size=96, vocab_size=128, tie_word_embeddings=tied, attn_implementation="eager",
    )  # SmolLM2-135M: 576 hidden, 30 layers, 9/3 heads, 1536 intermediate, 49152 vocab
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads,tied,batch,seq", [(2, True, 1, 7), (4, False, 2, 5), (1, True, 1, 1)])
def test_forward_counts_match_traced_forward(kv_heads, tied, batch, seq):
    cfg, model = _tiny(kv_heads, tied)
    ids = torch.randint(0, 128, (batch, seq))
    with torch.no_grad(), _Count() as t:
        model(input_ids=ids)
    c = energy.forward_counts(energy.model_shape(cfg.to_dict()), seq, batch)
    assert c.linear_mul == t.c["mm_mul"]
    assert c.linear_add == t.c["mm_add"]
    assert c.attention_mul == t.c["bmm_mul"]
    assert c.attention_add == t.c["bmm_add"]
    assert c.elementwise_mul == t.c["elementwise"]


@pytest.mark.parametrize("past,seq", [(6, 1), (4, 3)])
def test_decode_counts_match_traced_forward_with_cache(past, seq):
    cfg, model = _tiny(2, True)
    ids = torch.randint(0, 128, (1, past + seq))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :past], use_cache=True).past_key_values
        with _Count() as t:
            model(input_ids=ids[:, past:], cache=cache, use_cache=True)
    c = energy.forward_counts(energy.model_shape(cfg.to_dict()), seq, 1, past)
    assert (c.linear_mul, c.attention_mul, c.attention_add, c.elementwise_mul) == (
        t.c["mm_mul"], t.c["bmm_mul"], t.c["bmm_add"], t.c["elementwise"])


def test_params_match_transformers_smollm2_shape():
    s = energy.SMOLLM2_135M
    cfg = transformers.LlamaConfig(
        hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate,
        vocab_size=s.vocab, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert s.params == sum(p.numel() for p in model.parameters())


def test_model_shape_sources(tmp_path):
    assert energy.model_shape("smollm2") is energy.SMOLLM2_135M
    cfg, _ = _tiny(2, True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    a, b = energy.model_shape(tmp_path), energy.model_shape(tmp_path / "config.json")
    assert a == b and (a.hidden, a.kv_heads, a.head_dim, a.tied_embeddings) == (64, 2, 16, True)
    with pytest.raises(ValueError, match="not a built-in"):
        energy.model_shape(tmp_path / "nope")
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        energy.model_shape({"num_attention_heads": 2})


def test_energy_report_prices_counts():
    s = energy.SMOLLM2_135M
    for scope in ("attention", "all"):
        rep = energy.energy_report(s, 64, scope)
        c = energy.forward_counts(s, 64)
        muls = c.attention_mul + c.linear_mul + c.elementwise_mul
        replaced = c.attention_mul if scope == "attention" else muls
        assert rep["multiplies"] == muls and rep["lmul_multiplies"] == replaced
        arms = {r["arm"]: r for r in rep["arms"]}
        assert arms["fp32"]["mul_uJ"] == pytest.approx(muls * 3.7e-6)
        assert arms["L-Mul fp32"]["mul_uJ"] == pytest.approx((muls - replaced) * 3.7e-6 + replaced * 0.1e-6)
        assert arms["L-Mul fp32"]["add_uJ"] == arms["fp32"]["add_uJ"]
        assert arms["fp32"]["weights_uJ"] == pytest.approx(s.params * 4 * 162.5e-6)
        kv_bytes = 2 * 2 * s.layers * 64 * s.kv_heads * s.head_dim * 2  # K and V, write + read, 2 bytes
        assert arms["fp16/bf16"]["kv_uJ"] == pytest.approx(kv_bytes * 162.5e-6)
    rep = energy.energy_report(s, 1, "attention", past=1000)
    kv_read_write = (1 + 1001) * 2 * s.layers * s.kv_heads * s.head_dim * 2  # 1 token written, 1001 read
    assert {r["arm"]: r for r in rep["arms"]}["fp16/bf16"]["kv_uJ"] == pytest.approx(kv_read_write * 162.5e-6)
    with pytest.raises(ValueError, match="scope"):
        energy.energy_report(s, 8, "mlp")
    with pytest.raises(ValueError, match="seq"):
        energy.forward_counts(s, 0)


def test_paper_comparison_rows():
    from lmul.analysis.energy import paper_comparison, paper_comparison_markdown

    rows = {r["figure"]: r for r in paper_comparison()}
    assert (rows["gates, L-Mul fp16"]["paper"], rows["gates, L-Mul fp16"]["ours"]) == ("256", "245")  # 4+159+82
    assert rows["energy saving, element-wise product"]["ours"] == f"{1 - 0.1 / 3.7:.1%}"
    assert rows["energy saving, dot product (fp32 accumulation)"]["ours"] == f"{1 - 1.0 / 4.6:.1%}"
    assert rows["fp16: 1 - (L-Mul + add) / (mul + add)"]["ours"] == "70%"  # 1 - 0.45 / 1.5
    assert rows["fp8 multiply energy"]["ours"].startswith(f"{1.1 * 325 / 584:.2f}")
    assert "| 95% | 97.3% |" in paper_comparison_markdown(list(rows.values()))
