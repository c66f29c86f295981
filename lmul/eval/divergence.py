"""Divergence of an arm from the exact model on the same token sequences.

For a sequence t_0..t_{T-1} (context followed by a gold continuation) and next-token
distributions p (exact model) and q (arm) at every position i < T-1:

    KL_i(p ‖ q) = Σ_v p_i(v) (log p_i(v) - log q_i(v))        (nats)
    top1_i      = [argmax p_i = argmax q_i]

reported as means over positions. The gold continuation c (tokens from position s on) gets its
log-likelihood under the arm, ll = Σ_{i>=s} log q_{i-1}(t_i), and bits per byte
bpb = -ll / (ln 2 · bytes(c)) with bytes counted in UTF-8, the tokenizer-independent measure
used by OLMo's gold-bpb tasks (GSM8K gold CoT, LAMBADA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqStats:
    kl: float  # mean KL(p ‖ q) over positions, nats
    top1: float  # fraction of positions whose argmax agrees
    ll: float  # gold-continuation log-likelihood under q, nats
    n_cont_tokens: int
    n_bytes: int
    n_positions: int

    @property
    def bpb(self) -> float:
        return -self.ll / (math.log(2) * self.n_bytes) if self.n_bytes else float("nan")


def encode_pair(tok, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context + continuation and the index where the continuation starts.
    Like lm-eval, trailing spaces of the context move to the continuation and the two are
    encoded separately; the sequence is cut from the left to ``max_length`` tokens."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    ctx = tok(context, add_special_tokens=False)["input_ids"] if context else []
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"empty continuation after tokenization: {continuation!r}")
    if not ctx:  # something to condition the first continuation token on
        ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    ids = (ctx + cont)[-max_length:]
    start = max(1, len(ids) - len(cont))
    return ids, start


@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """[T, V] float32 log-softmax of the model's next-token logits for one sequence."""
    x = torch.tensor([ids], device=model.device)
    logits = model(input_ids=x).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def compare(logp_ref: torch.Tensor, logp_arm: torch.Tensor, ids: list[int], start: int, n_bytes: int) -> SeqStats:
    """KL / top-1 / gold log-likelihood from two [T, V] log-prob tensors of the same sequence."""
    if logp_ref.shape != logp_arm.shape:
        raise ValueError(f"shape mismatch {tuple(logp_ref.shape)} vs {tuple(logp_arm.shape)}")
    p_ref, q = logp_ref[:-1].double(), logp_arm[:-1].double()  # predictions for tokens 1..T-1
    kl = (p_ref.exp() * (p_ref - q)).sum(-1)
    top1 = (p_ref.argmax(-1) == q.argmax(-1)).double()
    tgt = torch.tensor(ids[start:], device=q.device)
    ll = q[start - 1:].gather(1, tgt[:, None]).sum()
    return SeqStats(float(kl.mean()), float(top1.mean()), float(ll), len(ids) - start, n_bytes, int(kl.numel()))
