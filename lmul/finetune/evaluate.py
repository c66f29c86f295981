"""Held-out metrics of one model under one arithmetic: the gold answers' loss and bits per byte,
and greedy zero-shot exact match.

For held-out item i with answer tokens t_s..t_T (and EOS) after its prompt, under the model's
next-token log-probabilities log q:

    ll_i   = sum_{j >= s} log q(t_j | t_<j)                        (nats)
    loss_i = -ll_i / (T - s + 1)                                   (nats per answer token)
    bpb_i  = -ll_i / (ln 2 * bytes_i)                              (bits per UTF-8 byte of " answer")

Exact match: greedy decoding (``do_sample=False``) of up to ``max_new_tokens`` after the zero-shot
prompt, stopped at EOS, a blank line or "Question:", scored by :func:`lmul.finetune.data.correct`.
Items are processed in fixed batches in id order (right padding for the loss, left padding for
generation), so a result is reproducible for a given batch size; padding positions contribute
exact zeros, but an L-Matmul's float32 sum order may depend on the padded length.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm import tqdm

from lmul.finetune import data


@torch.no_grad()
def gold_scores(model, tok, items: list[data.Item], max_length: int, batch_size: int = 4,
                desc: str = "loss") -> list[dict]:
    """Per item: ``ll`` (nats), ``n_tokens``, ``n_bytes``, ``loss``, ``bpb``."""
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collate = data.collate(pad)
    out = []
    for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
        chunk = items[i:i + batch_size]
        enc = [data.encode(tok, it, max_length) for it in chunk]
        batch = collate(enc)
        logits = model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = batch["labels"][:, 1:].to(logp.device)
        mask = tgt != -100
        picked = logp.gather(2, tgt.clamp(min=0)[..., None])[..., 0]
        ll = (picked * mask).double().sum(1)
        for it, e, lli, n in zip(chunk, enc, ll.tolist(), mask.sum(1).tolist(), strict=True):
            out.append({"id": it.id, "ll": lli, "n_tokens": int(n), "n_bytes": e["n_bytes"],
                        "loss": -lli / n, "bpb": -lli / (math.log(2) * e["n_bytes"])})
    return out


@torch.no_grad()
def greedy(model, tok, items: list[data.Item], max_new_tokens: int, batch_size: int = 8,
           desc: str = "generate") -> list[dict]:
    """Per item: the generated text, the extracted answer and ``em`` (1.0 / 0.0)."""
    model.eval()
    side = tok.padding_side
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    try:
        for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
            chunk = items[i:i + batch_size]
            texts = [it.prompt for it in chunk]
            enc = tok(texts, return_tensors="pt", padding=True)  # the same special tokens as data.encode
            ids, mask = enc.input_ids, enc.attention_mask
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 stop_strings=list(data.STOP), tokenizer=tok)
            for it, row in zip(chunk, gen[:, ids.shape[1]:], strict=True):
                text = tok.decode(row, skip_special_tokens=True)
                out.append({"id": it.id, "text": text, "answer": data.extract(text),
                            "em": float(data.correct(text, it))})
    finally:
        tok.padding_side = side
    return out


def summarize(scores: list[dict], key: str) -> dict:
    """Mean and standard error of ``key`` over items (lmul.eval.stats.mean_se)."""
    from lmul.eval.stats import mean_se

    m, se = mean_se([s[key] for s in scores])
    return {"mean": m, "se": se, "n": len(scores)}


def evaluate(model, tok, held: list[data.Item], max_length: int, n_gen: int, max_new_tokens: int,
             batch_size: int, label: str, gen_batch: Optional[int] = None) -> dict:
    """Loss/bpb on every item of ``held`` and exact match on its first ``n_gen`` items."""
    gold = gold_scores(model, tok, held, max_length, batch_size, desc=f"{label} loss")
    gen = greedy(model, tok, held[:n_gen], max_new_tokens, gen_batch or 2 * batch_size,
                 desc=f"{label} generate") if n_gen else []
    return {"gold": gold, "gen": gen, "loss": summarize(gold, "loss"), "bpb": summarize(gold, "bpb"),
            "em": summarize(gen, "em") if gen else None}
