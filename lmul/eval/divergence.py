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

import copy
import inspect
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


def position_sums(logp_ref: torch.Tensor, logp_arm: torch.Tensor) -> tuple[float, float, int]:
    """(Σ KL_i, Σ top1_i, n) over the n rows (positions) of two [n, V] log-prob tensors."""
    p, q = logp_ref.double(), logp_arm.double()
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl.sum()), float((p.argmax(-1) == q.argmax(-1)).double().sum()), int(kl.numel())


def compare(logp_ref: torch.Tensor, logp_arm: torch.Tensor, ids: list[int], start: int, n_bytes: int,
            first: int = 0, head: tuple[float, float, int] = (0.0, 0.0, 0)) -> SeqStats:
    """KL / top-1 / gold log-likelihood from two log-prob tensors of the same sequence ``ids``.

    The tensors hold rows ``first``..T-1 (row r: the prediction after token ``first + r``; ``first`` = 0,
    the whole [T, V] of :func:`log_probs`); ``head`` adds (Σ KL, Σ top-1, n) of the positions before
    ``first`` (:meth:`PrefixLogProbs.head`). The gold continuation must start after ``first``."""
    if logp_ref.shape != logp_arm.shape:
        raise ValueError(f"shape mismatch {tuple(logp_ref.shape)} vs {tuple(logp_arm.shape)}")
    if logp_ref.shape[0] != len(ids) - first:
        raise ValueError(f"{logp_ref.shape[0]} rows of log-probs for positions {first}..{len(ids) - 1}")
    if not first < start <= len(ids) - 1 or start < 1:
        raise ValueError(f"the continuation starts at {start}, outside positions {first + 1}..{len(ids) - 1}")
    kl_s, top_s, n = position_sums(logp_ref[:-1], logp_arm[:-1])  # predictions for tokens first+1..T-1
    kl_s, top_s, n = kl_s + head[0], top_s + head[1], n + head[2]
    q = logp_arm[start - 1 - first:-1].double()
    tgt = torch.tensor(ids[start:], device=q.device)
    ll = q.gather(1, tgt[:, None]).sum()
    return SeqStats(kl_s / n, top_s / n, float(ll), len(ids) - start, n_bytes, n)

def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest token prefix shared by every sequence in ``seqs`` (empty for no sequences)."""
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return list(first[:n])


class PrefixLogProbs:
    """:func:`log_probs` for sequences that start with a shared token ``prefix`` (GSM8K's 8-shot
    prompt), computing the prefix once: its key/value cache and its log-probs are kept, and each
    sequence runs only its own tokens after the prefix against a copy of that cache. Causal attention
    makes the prefix positions independent of what follows, so the result is the full forward pass's
    up to float rounding (different matrix shapes). Build it under the arithmetic (patch) it is
    used with; sequences that do not extend the prefix take the full pass.

    ``head(logp_ref)`` gives the KL / top-1 sums over the prefix positions against a reference's
    prefix log-probs, for :func:`compare`'s ``head``: the same for every sequence, computed once."""

    def __init__(self, model, prefix: list[int]) -> None:
        self.model, self.prefix = model, list(prefix)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([self.prefix], device=model.device), use_cache=True)
        self._kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = getattr(out, self._kw)  # transformers >= 5.2x: `cache`; before: `past_key_values`
        self.logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # [P, V]

    def extends(self, ids: list[int]) -> bool:
        return len(ids) > len(self.prefix) and ids[: len(self.prefix)] == self.prefix

    @torch.no_grad()
    def tail(self, ids: list[int]) -> torch.Tensor:
        """[T - P, V] log-probs at positions P..T-1 of ``ids`` (which must extend the prefix)."""
        if not self.extends(ids):
            raise ValueError(f"the sequence does not extend the cached {len(self.prefix)}-token prefix")
        x = torch.tensor([ids[len(self.prefix):]], device=self.model.device)
        out = self.model(input_ids=x, use_cache=True, **{self._kw: copy.deepcopy(self.cache)})
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def __call__(self, ids: list[int]) -> torch.Tensor:
        """[T, V] log-probs of ``ids``, as :func:`log_probs`."""
        if not self.extends(ids):
            return log_probs(self.model, ids)
        return torch.cat([self.logp, self.tail(ids)])

    def head(self, ref: PrefixLogProbs) -> tuple[float, float, int]:
        """(Σ KL, Σ top-1, n) over the prefix positions, KL(ref ‖ self): :func:`compare`'s ``head``."""
        if ref.prefix != self.prefix:
            raise ValueError("the reference caches another prefix")
        return position_sums(ref.logp, self.logp)
