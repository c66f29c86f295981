"""Modules and the attention function that run a model's multiplications through L-Mul.

Each piece holds an :class:`lmul.config.LMulConfig` and calls the functionals
:func:`lmul.matmul` / :func:`lmul.mul`; everything else (bias adds, scaling, masking, softmax,
activation functions, norm variance) stays the model's own exact arithmetic. Where the paper puts
them: Luo & Sun, arXiv:2410.00907, Eq. 3 and section 3.3 (``docs/semantics.md`` section 5).

* :func:`lmul_attention`: ``A = softmax(mask + s · L-matmul(Q, Kᵀ))``, ``O = L-matmul(A, V)``, with the
  signature of a transformers attention function (the ``"lmul"`` implementation :func:`lmul.patch`
  registers). Grouped-query attention repeats K/V heads; softcapping (Gemma 2) is exact.
* :class:`LMulLinear`: ``y = L-matmul(x, Wᵀ) + b`` for ``nn.Linear`` (and GPT-2's ``Conv1D``, whose
  weight is stored transposed), reusing the original Parameters.
* :class:`LMulGatedMLP`: ``down(act(gate(x)) ⊙ up(x))`` with ``⊙`` an elementwise L-Mul.
* :class:`LMulRMSNorm`: ``(x ⊙ rsqrt(mean(x²) + ε)) ⊙ w`` (or ``⊙ (1 + w)``, Gemma), both products L-Mul.
* :class:`LMulLayerNorm`: ``((x - μ) ⊙ rsqrt(σ² + ε)) ⊙ w + b``, both products L-Mul.
* :class:`LMulRotaryEmbedding`: ``q ⊙ cos + rotate_half(q) ⊙ sin`` (and ``k``), the four products L-Mul.

This module imports no transformers: it works on plain tensors and ``nn.Module`` attributes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmul.config import LMulConfig
from lmul.elementwise import mul, quantize
from lmul.formats import check_float
from lmul.matmul import matmul

__all__ = [
    "LMulLinear", "LMulGatedMLP", "LMulRMSNorm", "LMulLayerNorm", "LMulRotaryEmbedding", "lmul_attention", "repeat_kv",
]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv · n_rep, S, D], each K/V head repeated for its query group (GQA)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive one (0 / most negative finite ``dtype``)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def lmul_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    *,
    config: LMulConfig,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with both matrix products as L-Matmuls.

    ``query`` [B, H, Sq, D], ``key``/``value`` [B, H_kv, Sk, D] (H a multiple of H_kv),
    ``attention_mask`` broadcastable to [B, H, Sq, Sk], additive (0 / large negative) or boolean
    (True = attend); causal, padding and sliding-window structure all arrive through it.

    ``scores = s · L-matmul(Q, Kᵀ)`` (rounded to the model dtype, then scaled, as transformers'
    eager attention does), ``scores = c · tanh(scores / c)`` if ``softcap`` is ``c``, plus the mask;
    ``A = softmax(scores)`` in float32, rounded to the model dtype; ``O = L-matmul(A, V)``.
    Returns ``(O [B, Sq, H, D], A [B, H, Sq, Sk])`` in the query's dtype, like transformers'
    attention functions. ``scaling`` defaults to ``D^-1/2``.
    """
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"lmul_attention does not implement attention sinks ({name}=...)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"lmul_attention expects 4-D [B, H, S, D] tensors, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    b, h, sq, d = query.shape
    h_kv, sk = key.shape[1], key.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {h_kv}")
    n_rep = h // h_kv
    if scaling is None:
        scaling = d**-0.5
    dtype = query.dtype
    spec = config.spec

    # GQA: the n_rep query heads of a key/value head are stacked as rows of one L-Matmul against
    # that head's K and V ([B, H_kv, n_rep Sq, D]) instead of repeating K and V n_rep times: the
    # same products and the same per-entry sums, and each K/V head is quantized and prepared once
    # (a decoding step's main cost, docs/kernels.md)
    q = query.reshape(b, h_kv, n_rep * sq, d)
    scores = matmul(q, key.transpose(2, 3), spec=spec).reshape(b, h, sq, sk).to(dtype) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + _additive(attention_mask, dtype)[..., :sk]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = matmul(weights.reshape(b, h_kv, n_rep * sq, sk), value, spec=spec).reshape(b, h, sq, d).to(dtype)
    return out.transpose(1, 2).contiguous(), weights


class LMulLinear(nn.Module):
    """``y = L-matmul(x, Wᵀ) + b``: a drop-in for ``nn.Linear`` (or, with ``transposed=True``,
    transformers' ``Conv1D``, whose weight is stored ``[in, out]``).

    The Parameters are the original module's own (no copy). In inference (no gradient needed for
    the weight) the weight is quantized to ``config.spec.fmt`` once (a float32 copy in the weight's own
    memory layout, used as the ``[in, out]`` operand; with ``spec.scaling`` the float32 weight, which
    :func:`lmul.matmul` scales per output column along ``in_features``) and cached until the Parameter changes (its
    version counter, storage, device or dtype); with autograd the weight goes to
    :func:`lmul.matmul` directly so that its gradient flows. The product and the float32
    sum are those of :func:`lmul.matmul`; the bias is added exactly in float32; the result is
    rounded once to the input dtype.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: LMulConfig,
                 transposed: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.config = config
        self.transposed = transposed
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if transposed else (
            weight.shape[1], weight.shape[0])
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

    @classmethod
    def from_linear(cls, linear: nn.Module, config: LMulConfig) -> LMulLinear:
        """Wrap an ``nn.Linear`` (weight ``[out, in]``) or a GPT-2 ``Conv1D`` (weight ``[in, out]``,
        recognised by its ``nf`` attribute), sharing its Parameters."""
        transposed = not isinstance(linear, nn.Linear) and hasattr(linear, "nf")
        if not isinstance(linear, nn.Linear) and not transposed:
            raise TypeError(f"LMulLinear.from_linear needs an nn.Linear or Conv1D, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, config, transposed=transposed)

    def _weight_in_out(self) -> torch.Tensor:
        """The weight as [in, out] operand: cached quantized copy, or the live Parameter for autograd."""
        w = self.weight
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            # lmul.matmul quantizes its operands itself (idempotent): the cache only saves time
            return w if self.transposed else w.t()
        key = (w._version, w.device, w.dtype, w.data_ptr())
        if self._cache is None or self._cache[0] != key:
            wt = (w.detach() if self.transposed else w.detach().t()).float()
            spec = self.config.spec
            # scaled specs: lmul.matmul takes the scales from the whole weight (groups along K = in_features, per
            # output column), so the cache holds the float32 weight; quantizing it first would clip it unscaled
            self._cache = (key, wt if spec.scaling != "none" else quantize(wt, spec.fmt, spec.rounding))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float(x, "x")  # sparse / nested x: a clear error before the reshape (float8 x: matmul converts it)
        shape = x.shape
        y = matmul(x.reshape(-1, shape[-1]), self._weight_in_out(), spec=self.config.spec)  # [N, out]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"from={kind}, lmul={self.config.tag}")


class LMulGatedMLP(nn.Module):
    """``down(act(gate(x)) ⊙ up(x))`` with ``⊙`` :func:`lmul.mul` (Llama/Mistral/Qwen/Gemma MLPs).

    Holds the original MLP's ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` (which the
    patch may itself have swapped for :class:`LMulLinear`); the activation function is exact."""

    def __init__(self, mlp: nn.Module, config: LMulConfig) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated = self.act_fn(self.gate_proj(x))
        up = self.up_proj(x)
        return self.down_proj(mul(gated, up, spec=self.config.spec).to(up.dtype))

    def extra_repr(self) -> str:
        return f"lmul={self.config.tag}"


class LMulRMSNorm(nn.Module):
    """RMSNorm with its two products as L-Mul; the mean of squares and ``rsqrt`` are exact.

    ``unit_offset=False`` (Llama, Mistral, Qwen): ``w ⊙ (x ⊙ r).to(dtype)``;
    ``unit_offset=True`` (Gemma 2/3): ``((x ⊙ r) ⊙ (1 + w)).to(dtype)``; ``r = rsqrt(mean(x²) + ε)``
    computed in float32 from float32 ``x``, as the transformers modules do."""

    def __init__(self, weight: nn.Parameter, eps: float, config: LMulConfig, unit_offset: bool) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.config = config
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(spec=self.config.spec)
        h = x.float()
        normed = mul(h, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps), **kw)
        if self.unit_offset:
            return mul(normed, 1.0 + self.weight.float(), **kw).to(x.dtype)
        return mul(self.weight, normed.to(x.dtype), **kw).to(torch.promote_types(self.weight.dtype, x.dtype))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}, lmul={self.config.tag}"


class LMulLayerNorm(nn.Module):
    """``((x - μ) ⊙ rsqrt(σ² + ε)) ⊙ w + b`` over the last dimension, in float32, products L-Mul;
    mean and (biased) variance are exact. Shares an ``nn.LayerNorm``'s Parameters."""

    def __init__(self, norm: nn.LayerNorm, config: LMulConfig) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"LMulLayerNorm supports 1-D normalized_shape, got {norm.normalized_shape}")
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.normalized_shape = norm.normalized_shape
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = dict(spec=self.config.spec)
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        y = mul(h - mean, torch.rsqrt(var + self.eps), **kw)
        if self.weight is not None:
            y = mul(y, self.weight.float(), **kw)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}, lmul={self.config.tag}"


class _LMulFactor(torch.Tensor):
    """A rotary ``cos``/``sin`` tensor whose products with other tensors are :func:`lmul.mul`.

    transformers applies rotary embeddings with a module-level function,
    ``q * cos + rotate_half(q) * sin``, which cannot be swapped per model. Instead the patched
    rotary module returns its ``cos``/``sin`` as this subclass (as torchao's float8 tensors carry
    their scaling): ``Tensor * factor`` (tensor operands) becomes ``lmul.mul(...)`` rounded to the
    operands' promoted dtype; shape/dtype ops (``unsqueeze``, ``to``, indexing ...) keep the
    subclass; every other op returns a plain tensor, so nothing else is affected."""

    _lmul_config: LMulConfig

    @staticmethod
    def __new__(cls, data: torch.Tensor, config: LMulConfig) -> _LMulFactor:
        t = data.as_subclass(cls)
        t._lmul_config = config
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        config = next(a._lmul_config for a in args if isinstance(a, _LMulFactor))
        if func in _MUL_FUNCS and len(args) == 2 and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            with torch._C.DisableTorchFunctionSubclass():  # inside, the subclass behaves as a plain tensor
                a, b = args
                return mul(a, b, spec=config.spec).to(torch.promote_types(a.dtype, b.dtype))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _KEEP_FUNCS and isinstance(out, torch.Tensor):
            return _LMulFactor(out, config)
        return out


_MUL_FUNCS = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul}
_KEEP_FUNCS = {
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.to, torch.Tensor.__getitem__, torch.Tensor.expand,
    torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.contiguous, torch.Tensor.squeeze, torch.Tensor.float,
    torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as, torch.Tensor.transpose, torch.Tensor.clone,
    torch.Tensor.detach,
}


class LMulRotaryEmbedding(nn.Module):
    """Wraps a transformers rotary-embedding module (Llama layout: ``apply_rotary_pos_emb`` computes
    ``q ⊙ cos + rotate_half(q) ⊙ sin``, same for ``k``) so that those four products are L-Mul.

    The wrapped module computes ``(cos, sin)`` exactly as before; they are returned as
    :class:`_LMulFactor` tensors, which turn the model's ``q * cos`` and ``rotate_half(q) * sin``
    into :func:`lmul.mul` (each product rounded to the model dtype before the exact add, as the model
    does). The products in computing ``cos``/``sin`` themselves (``position · inv_freq``) stay exact."""

    def __init__(self, rotary: nn.Module, config: LMulConfig) -> None:
        super().__init__()
        self.rotary = rotary
        self.config = config

    def forward(self, *args, **kwargs):
        cos, sin = self.rotary(*args, **kwargs)
        return _LMulFactor(cos, self.config), _LMulFactor(sin, self.config)

    def extra_repr(self) -> str:
        return f"lmul={self.config.tag}"
