"""Operand capture on a tiny random Llama, and the analyze/energy commands end to end."""

import json

import pytest
import torch

from lmul.analysis import capture
from lmul.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, vocab_size=128, tie_word_embeddings=True, attn_implementation="eager",
    )  # SmolLM2-135M: 576 hidden, 30 layers, 9/3 heads, 64 head_dim
    return transformers.LlamaForCausalLM(cfg).eval()


def test_captured_q_k_reproduce_attention_probabilities(tiny):
    t = 9
    cap = capture.capture_layers(tiny, torch.randint(0, 128, (1, t)))
    assert sorted(cap) == [0, 1]
    for c in cap.values():
        assert c["q"].shape == (4, t, 16) and c["k"].shape == (2, t, 16) and c["v"].shape == (2, t, 16)
        k = c["k"].repeat_interleave(2, 0)
        scores = c["q"] @ k.transpose(1, 2) / 4.0 + torch.full((t, t), float("-inf")).triu(1)
        torch.testing.assert_close(scores.softmax(-1), c["p"], rtol=1e-5, atol=1e-6)
        assert c["w_q"].shape == (64, 64) and c["x_mlp"].shape == (t, 96) and c["w_down"].shape == (64, 96)


def test_capture_leaves_no_hooks_and_output_unchanged(tiny):
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = tiny(input_ids=ids).logits
    capture.capture_layers(tiny, ids, layers=[1])
    with torch.no_grad():
        after = tiny(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny.modules())


def test_sampled_pairs_are_operands_of_real_products(tiny):
    ids = torch.randint(0, 128, (1, 8))
    cap = capture.capture_layers(tiny, ids, layers=[0])[0]
    pairs = capture.sample_pairs(cap, 500, torch.Generator().manual_seed(1))
    q_vals, k_vals = set(cap["q"].flatten().tolist()), set(cap["k"].flatten().tolist())
    assert set(pairs["qk"][0].tolist()) <= q_vals and set(pairs["qk"][1].tolist()) <= k_vals
    assert set(pairs["pv"][0].tolist()) <= set(cap["p"].flatten().tolist())
    assert (pairs["pv"][0] > 0).all()  # causal pairs only: masked probabilities are exactly 0
    data = capture.capture_operands(tiny, [ids, ids[:, :4]], 100, seed=3, layers=[0, 1])
    again = capture.capture_operands(tiny, [ids, ids[:, :4]], 100, seed=3, layers=[0, 1])
    assert all(torch.equal(data[k][0], again[k][0]) for k in capture.OPERAND_KINDS)
    assert data["qk"][0].numel() == 2 * 2 * 100


def test_read_prompts(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n"
                                      + json.dumps({"question": "b?"}) + "\n")
    assert capture.read_prompts(str(tmp_path / "g.jsonl"), 5) == ["a?", "b?"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    assert capture.read_prompts(str(tmp_path / "p.txt"), 2) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"q": 1}) + "\n")
    with pytest.raises(ValueError, match="question/text/prompt"):
        capture.read_prompts(str(tmp_path / "bad.jsonl"), 5)
    with pytest.raises(ValueError, match="no such file"):
        capture.read_prompts(str(tmp_path / "none.txt"), 5)
    with pytest.raises(ValueError, match="config.json"):
        capture.load_model(str(tmp_path))


def test_analyze_command_with_operands(tiny, tmp_path, capsys):
    ids = torch.randint(0, 128, (1, 12))
    ops = tmp_path / "ops.pt"
    torch.save(capture.capture_operands(tiny, [ids], 400, seed=0), ops)
    out = tmp_path / "out"
    assert main(["analyze", "--out", str(out), "--seed", "1", "--max-bits", "3", "--n-pairs", "500",
                 "--operands", str(ops)]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert set(res["real"]) == {"N(0,1) x N(0,1) (synthetic)", "Q x K^T", "P x V", "linear (activation x weight)"}
    assert res["config"]["seed"] == 1 and res["exhaustive"]["lmul-bit"]["3"]["n"] == 64
    for png in ("exhaustive.png", "offset_sweep.png", "fig3_offsets.png", "fig4_bits.png", "hist_exhaustive.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "analysis.md").read_text()
    assert "Gate counts" in md
    assert "| **paper** real, abs[f1+f2] | 0.16 | 0.18 | 0.18 | 0.12 | 0.15 | 0.14 |" in md
    assert "| energy saving, element-wise product | 95% | 97.3% |" in md
    assert main(["analyze", "--out", str(out), "--operands", str(tmp_path / "missing.pt")]) == 2  # one line, status 2
    assert "no such file" in capsys.readouterr().err


def test_energy_command(tmp_path, capsys):
    assert main(["energy", "--model", "smollm2", "--seq", "16", "--scope", "all", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "SmolLM2-135M" in text and "1 - 0.1 / 3.7 = 0.9730" in text
    assert "| gates, multiplier fp16 | 584 | 1612 |" in text
    rep = json.loads((tmp_path / "energy_SmolLM2-135M_seq16_past0_all.json").read_text())
    assert rep["params"] == 134_515_008
    assert (tmp_path / "energy_SmolLM2-135M_seq16_past0_all.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_command_captures_from_model_dir(tmp_path):
    # a tiny random Llama and a word-level tokenizer saved as a Hugging Face directory
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=96, vocab_size=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": " ".join(f"w{(7 * i + j) % 127}" for j in range(10 + i))})
                                 for i in range(3)))
    out = tmp_path / "out"
    assert main(["analyze", "--out", str(out), "--max-bits", "2", "--n-pairs", "600",
                 "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--layers", "0,2"]) == 0
    ops = torch.load(out / "operands.pt", weights_only=True)
    assert ops["meta"]["layers"] == [0, 2] and ops["meta"]["prompts"] == 3
    assert ops["qk"][0].numel() == 3 * 2 * (600 // 6)
    res = json.loads((out / "analysis.json").read_text())
    assert "P x V" in res["real"] and res["operands_meta"]["model"] == str(tmp_path / "model")


def test_table7_command_on_model_dir(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=16, intermediate_size=48, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["table7", "--weights", str(tmp_path / "model"), "--out", str(out)]) == 0
    assert "| **paper** even, abs[f1(n=7,k)] | 0.68 |" in capsys.readouterr().out
    res = json.loads((out / "table7.json").read_text())
    h = res["models"][str(tmp_path / "model")]["groups"]["all parameters"]
    assert h["normal"] + h["zero"] + h["subnormal"] == sum(p.numel() for p in model.parameters())
    assert [r["k"] for r in h["rows"]] == list(range(1, 7))
    assert (out / "table7.md").read_text().startswith("| row |")
