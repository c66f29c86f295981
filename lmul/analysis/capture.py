"""Capture the operands of a Llama-style model's multiplications with plain forward hooks.

For each chosen decoder layer (eager attention) the hooks record:

* ``q`` and ``k`` after the rotary embedding: the ``q_proj``/``k_proj`` outputs, rotated with the
  ``position_embeddings`` the attention module receives (via the model's own
  ``apply_rotary_pos_emb``), shape ``[heads, T, head_dim]`` / ``[kv_heads, T, head_dim]``;
* ``p``: the attention probabilities the eager attention returns, ``[heads, T, T]``;
* ``v``: the ``v_proj`` output, ``[kv_heads, T, head_dim]``;
* ``x_attn``/``w_q``: the input of ``q_proj`` and its weight; ``x_mlp``/``w_down``: the input of
  ``down_proj`` and its weight.

:func:`sample_pairs` then draws operand pairs ``(a, b)`` that the forward pass really multiplies:
``q[h,i,d] k[h/g,j,d]`` and ``p[h,i,j] v[h/g,j,d]`` with ``j <= i`` (causal), and
``x[t,i] W[o,i]`` for the two linear layers. The pairs are what ``lmul analyze --operands``
reads: ``{"qk": (a, b), "pv": (a, b), "linear": (a, b), "meta": {...}}`` saved with ``torch.save``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from lmul.files import parse_json, read_text

__all__ = ["capture_layers", "sample_pairs", "capture_operands", "load_model", "read_prompts", "OPERAND_KINDS"]

OPERAND_KINDS = ("qk", "pv", "linear")


def _layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: need a Llama-style decoder")
    return layers


def capture_layers(model: torch.nn.Module, input_ids: torch.Tensor, layers: Optional[Iterable[int]] = None) -> dict:
    """Run ``model`` on ``input_ids`` ``[1, T]`` and return ``{layer: {name: tensor}}`` (float32)."""
    all_layers = _layers(model)
    idx = list(range(len(all_layers))) if layers is None else list(layers)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    got: dict[int, dict[str, torch.Tensor]] = {i: {} for i in idx}
    handles = []

    def heads(t: torch.Tensor, hd: int) -> torch.Tensor:  # [1, T, n*hd] -> [n, T, hd]
        return t.detach().float()[0].view(t.shape[1], -1, hd).transpose(0, 1)

    for i in idx:
        layer = all_layers[i]
        attn, store = layer.self_attn, got[i]
        hd = attn.head_dim
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def pre(mod, args, kwargs, store=store):
            store["_pos"] = kwargs.get("position_embeddings")

        def post(mod, args, kwargs, out, store=store, hd=hd, rope=rope):
            cos, sin = store.pop("_pos")
            q, k = rope(store.pop("_q")[None], store.pop("_k")[None], cos.float(), sin.float())
            store["q"], store["k"] = q[0], k[0]
            if out[1] is None:
                raise ValueError("attention returned no probabilities: load the model with attn_implementation='eager'")
            store["p"] = out[1].detach().float()[0]

        handles += [
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.register_forward_hook(post, with_kwargs=True),
            attn.q_proj.register_forward_hook(lambda m, a, o, s=store, hd=hd: s.update(_q=heads(o, hd))),
            attn.k_proj.register_forward_hook(lambda m, a, o, s=store, hd=hd: s.update(_k=heads(o, hd))),
            attn.v_proj.register_forward_hook(lambda m, a, o, s=store, hd=hd: s.update(v=heads(o, hd))),
            attn.q_proj.register_forward_hook(
                lambda m, a, o, s=store: s.update(x_attn=a[0].detach().float()[0], w_q=m.weight.detach().float())),
            layer.mlp.down_proj.register_forward_hook(
                lambda m, a, o, s=store: s.update(x_mlp=a[0].detach().float()[0], w_down=m.weight.detach().float())),
        ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return got


def sample_pairs(
    cap: dict[str, torch.Tensor], n: int, gen: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random operand pairs of each kind from one layer's capture (see module docstring)."""
    q, k, p, v = cap["q"], cap["k"], cap["p"], cap["v"]
    nh, t, hd = q.shape
    g = nh // k.shape[0]

    def ij():  # causal pairs j <= i
        i = torch.randint(0, t, (n,), generator=gen)
        j = (torch.rand(n, generator=gen) * (i + 1)).long().clamp(max=t - 1)
        return i, torch.minimum(j, i)

    h = torch.randint(0, nh, (n,), generator=gen)
    d = torch.randint(0, hd, (n,), generator=gen)
    i, j = ij()
    qk = (q[h, i, d], k[h // g, j, d])
    h = torch.randint(0, nh, (n,), generator=gen)
    d = torch.randint(0, hd, (n,), generator=gen)
    i, j = ij()
    pv = (p[h, i, j], v[h // g, j, d])
    lin_a, lin_b = [], []
    for x, w in ((cap["x_attn"], cap["w_q"]), (cap["x_mlp"], cap["w_down"])):
        tt = torch.randint(0, x.shape[0], (n // 2,), generator=gen)
        ii = torch.randint(0, x.shape[1], (n // 2,), generator=gen)
        oo = torch.randint(0, w.shape[0], (n // 2,), generator=gen)
        lin_a.append(x[tt, ii])
        lin_b.append(w[oo, ii])
    return {"qk": qk, "pv": pv, "linear": (torch.cat(lin_a), torch.cat(lin_b))}


def capture_operands(model: torch.nn.Module, prompts_ids: Sequence[torch.Tensor], n_per: int, seed: int,
                     layers: Optional[Iterable[int]] = None) -> dict:
    """Pairs of every kind from every prompt and chosen layer, concatenated (``n_per`` per
    prompt, kind and layer)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {kind: ([], []) for kind in OPERAND_KINDS}
    for ids in tqdm(prompts_ids, desc="capture", unit="prompt", disable=len(prompts_ids) < 2):
        for cap in capture_layers(model, ids, layers).values():
            for kind, (a, b) in sample_pairs(cap, n_per, gen).items():
                out[kind][0].append(a)
                out[kind][1].append(b)
    res: dict = {kind: (torch.cat(a), torch.cat(b)) for kind, (a, b) in out.items()}
    res["meta"] = {"prompts": len(prompts_ids), "pairs_per_prompt_layer": n_per, "seed": seed,
                   "layers": None if layers is None else list(layers)}
    return res


def load_model(path: str):
    """A causal LM and its tokenizer from a Hugging Face directory or a ``.gguf`` file, float32,
    eager attention (needed for the probabilities)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kw = {"attn_implementation": "eager", "dtype": torch.float32}
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"--model {path}: no such gguf file")
        src, kw["gguf_file"] = str(p.parent), p.name
    elif (p / "config.json").is_file():
        src = str(p)
    else:
        raise ValueError(f"--model {path}: need a Hugging Face model directory (with config.json) or a .gguf file")
    tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": kw["gguf_file"]} if "gguf_file" in kw else {}))
    model = AutoModelForCausalLM.from_pretrained(src, **kw).eval()
    return model, tok


def read_prompts(path: str, limit: int) -> list[str]:
    """Prompts from a ``.jsonl``/``.json`` file (field ``question``, as GSM8K, or ``text``/``prompt``) or
    a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    if p.suffix in (".jsonl", ".json"):
        text = read_text(p)
        lines = [line for line in text.splitlines() if line.strip()]
        what = f"--prompts {path}: not valid JSON"
        recs = parse_json(text, what) if p.suffix == ".json" else [parse_json(line, what) for line in lines]
        out = []
        for r in recs:
            s = next((r[f] for f in ("question", "text", "prompt") if isinstance(r, dict) and f in r), None)
            if s is None:
                raise ValueError(f"--prompts {path}: a record has none of the fields question/text/prompt")
            out.append(s)
    else:
        out = [line for line in read_text(p).splitlines() if line.strip()]
    if not out:
        raise ValueError(f"--prompts {path}: no prompts")
    return out[:limit]
