"""Run a PyTorch / transformers model with L-Mul where the paper puts it, and undo it.

``lmul.patch(model, config)`` swaps module *instances* (never torch or transformers globals) in a
post-order walk and, for attention, registers one transformers attention function named
``"lmul"`` (through ``AttentionInterface``, with the eager mask builder) and selects it for this
model only (``model.set_attn_implementation("lmul")``). Each attention module of the patched model
carries its own :class:`_AttentionState`: the L-Mul config, or ``None`` for a module that the
``layers``/``filter_fn`` selection leaves exact (it then runs the model's original implementation).

This module holds no arithmetic: the numerics are :mod:`lmul.nn` calling :func:`lmul.matmul` and
:func:`lmul.mul`. What runs where: ``docs/patching.md``.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from lmul.config import LMulConfig
from lmul.nn import LMulGatedMLP, LMulLayerNorm, LMulLinear, LMulRMSNorm, LMulRotaryEmbedding, lmul_attention

__all__ = ["patch", "unpatch", "inspect", "PatchHandle", "PatchSummary", "ATTENTION_NAME"]

ATTENTION_NAME = "lmul"  # the transformers attention implementation this module registers
_SUPPORTED_ORIGINAL = ("eager", "sdpa")  # implementations the patch can replace and fall back to

# Element-wise products (scope="all"): module classes whose forward we know and re-express.
# Unknown classes with the same shape of job raise instead of guessing (see _elementwise).
_GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP", "Gemma3MLP"}
_RMSNORMS = {  # class -> unit_offset (Gemma multiplies by 1 + w)
    "LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False, "Qwen3RMSNorm": False,
    "Gemma2RMSNorm": True, "Gemma3RMSNorm": True,
}
_ROTARIES = {  # rotary embedding modules whose (cos, sin) feed the Llama-layout apply_rotary_pos_emb
    "LlamaRotaryEmbedding", "MistralRotaryEmbedding", "Qwen2RotaryEmbedding", "Qwen3RotaryEmbedding",
    "Gemma2RotaryEmbedding", "Gemma3RotaryEmbedding",
}


@dataclass
class _AttentionState:
    """Attached to each attention module of a patched model as ``module._lmul_attention``."""

    config: Optional[LMulConfig]  # None: this module is not selected and runs `fallback`
    fallback: Callable
    fallback_name: str


@dataclass
class _Swap:
    fqn: str
    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


def _dispatch(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The function registered as transformers attention implementation ``"lmul"``."""
    state = getattr(module, "_lmul_attention", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation={ATTENTION_NAME!r} but was not prepared by "
            "lmul.patch; use lmul.patch(model, ...) instead of setting the implementation by hand"
        )
    if state.config is None:
        return state.fallback(module, query, key, value, attention_mask, **kwargs)
    return lmul_attention(module, query, key, value, attention_mask, config=state.config, **kwargs)


def _register_attention() -> None:
    """Register ``"lmul"`` with transformers (idempotent): our attention function, and the eager
    (additive float) mask builder so that causal, padding and sliding-window masks reach it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS._global_mapping.get(ATTENTION_NAME) is not _dispatch:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _dispatch)
    if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(ATTENTION_NAME) is not eager_mask:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


def _is_hf_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def _is_attention(module: nn.Module) -> bool:
    """A transformers attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.models.") or not cls.__name__.endswith("Attention"):
        return False
    source = sys.modules.get(cls.__module__)
    return source is not None and hasattr(source, "ALL_ATTENTION_FUNCTIONS") and hasattr(module, "config")


def _fallback(module: nn.Module, name: str) -> Callable:
    """The attention function ``name`` ("eager"/"sdpa") for an unselected module."""
    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2: weight [in, out], attribute ``nf``)."""
    if type(module) is nn.Linear:
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _elementwise(module: nn.Module, fqn: str, config: LMulConfig) -> Optional[nn.Module]:
    """The L-Mul replacement of a module with element-wise products (scope="all"), or None."""
    name = type(module).__name__
    if name in _GATED_MLPS:
        return LMulGatedMLP(module, config)
    if name in _RMSNORMS:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return LMulRMSNorm(module.weight, eps, config, unit_offset=_RMSNORMS[name])
    if type(module) is nn.LayerNorm:
        return LMulLayerNorm(module, config)
    if name in _ROTARIES:
        return LMulRotaryEmbedding(module, config)
    if name.endswith("RMSNorm") or name.endswith("RotaryEmbedding") or (
        name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "act_fn"))
    ):
        raise NotImplementedError(
            f"scope='all': {fqn} is a {name}, whose element-wise products lmul does not know how to re-express; "
            f"supported: {sorted(_GATED_MLPS | set(_RMSNORMS) | _ROTARIES)} and nn.LayerNorm "
            "(use scope='attention' or 'linear', or exclude it with layers=/filter_fn=)"
        )
    return None


def _resolve_config(config: Any, options: dict) -> LMulConfig:
    """One LMulConfig from ``config`` (object, preset name or None) and keyword options."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(config, str):  # a preset name: keyword options refine it
        return LMulConfig.from_name(config, **given)
    if config is None:
        return LMulConfig(**given)
    if not isinstance(config, LMulConfig):
        raise TypeError(f"config must be an LMulConfig, a preset name or None, got {type(config).__name__}")
    other = config.replace(**given)
    if other != config:
        ours, theirs = config.options(), other.options()
        clash = {k: (ours[k], theirs[k]) for k in given if ours[k] != theirs[k]}
        raise ValueError(
            f"patch() got config {config.tag!r} and keyword options that disagree with it "
            f"(field: (config, keyword)): {clash}; pass one or the other, or config.replace(...)"
        )
    return config


class PatchHandle:
    """What :func:`patch` did to one model; ``undo()`` (or leaving the ``with`` block) restores it.

    ``swapped`` lists ``(qualified name, original class, replacement)``; ``attention`` the names of
    attention modules with their arm (a config tag, or ``"exact"`` for unselected modules)."""

    def __init__(self, model: nn.Module, config: LMulConfig) -> None:
        self.model = model
        self.config = config
        self._swaps: list[_Swap] = []
        self._attention: list[tuple[str, nn.Module]] = []
        self._impl: list[tuple[Any, Any]] = []  # (PretrainedConfig, its _attn_implementation_internal)
        self.active = False

    @property
    def swapped(self) -> list[tuple[str, str, nn.Module]]:
        return [(s.fqn, type(s.old).__name__, s.new) for s in self._swaps]

    @property
    def attention(self) -> list[tuple[str, str]]:
        return [(fqn, m._lmul_attention.config.tag if m._lmul_attention.config else "exact")
                for fqn, m in self._attention]

    def undo(self) -> None:
        """Put back every original module and attention implementation (reverse order)."""
        for s in reversed(self._swaps):
            setattr(s.parent, s.name, s.old)
        self._swaps.clear()
        for cfg, value in reversed(self._impl):
            cfg._attn_implementation_internal = value
        self._impl.clear()
        for _, m in self._attention:
            if "_lmul_attention" in m.__dict__:
                del m.__dict__["_lmul_attention"]
        self._attention.clear()
        if self.model.__dict__.get("_lmul_handle") is self:
            del self.model.__dict__["_lmul_handle"]
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (f"PatchHandle({self.config.tag}, {state}, {len(self._swaps)} modules swapped, "
                f"{sum(1 for _, m in self._attention if m._lmul_attention.config)} attention modules)")


def patch(
    model: nn.Module,
    config: LMulConfig | str | None = None,
    *,
    scope: Optional[str] = None,
    fmt: Optional[str] = None,
    mode: Optional[str] = None,
    offset: Optional[float] = None,
    rounding: Optional[str] = None,
    acc: Optional[str] = None,
    acc_block: Optional[int] = None,
    backend: Optional[str] = None,
    backward: Optional[str] = None,
    layers: Optional[Any] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> PatchHandle:
    """Run ``model``'s multiplications through L-Mul per ``config`` (an :class:`LMulConfig`; a preset
    name, which the keyword options may refine; or None: the keyword options build one);
    returns a :class:`PatchHandle`. Keyword options given with an ``LMulConfig`` must agree with it.

    ``scope="attention"``: transformers models only (attention implementation ``"eager"`` or
    ``"sdpa"``). ``scope="linear"``: any ``nn.Module``: ``nn.Linear`` / ``Conv1D`` become
    :class:`LMulLinear`. ``scope="all"``: both, plus the element-wise products of known MLP, norm and
    rotary modules. ``layers`` (in the config) and ``filter_fn(module, qualified_name) -> bool`` both
    have to select a module for it to be patched. Weights are shared, never copied or changed.

    Raises (leaving the model untouched) if the model is already patched, the architecture or
    attention implementation is unsupported, or ``config`` and keyword options disagree.
    """
    options = dict(scope=scope, fmt=fmt, mode=mode, offset=offset, rounding=rounding, acc=acc,
                   acc_block=acc_block, backend=backend, backward=backward, layers=layers)
    config = _resolve_config(config, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs a torch.nn.Module, got {type(model).__name__}")
    old = model.__dict__.get("_lmul_handle")
    if old is not None:
        raise RuntimeError(
            f"{type(model).__name__} is already patched with {old.config.tag!r}; call lmul.unpatch(model) "
            f"(or handle.undo()) before patching it again with {config.tag!r}"
        )
    handle = PatchHandle(model, config)
    try:
        _apply(model, config, filter_fn, handle)
    except BaseException:
        handle.undo()
        raise
    model.__dict__["_lmul_handle"] = handle
    handle.active = True
    return handle


def _selected(config: LMulConfig, filter_fn, module: nn.Module, fqn: str) -> bool:
    return config.selects(fqn) and (filter_fn is None or bool(filter_fn(module, fqn)))


def _apply(model: nn.Module, config: LMulConfig, filter_fn, handle: PatchHandle) -> None:
    if config.scope == "none":
        return
    wants_attention = config.scope in ("attention", "all")
    if wants_attention:
        _check_attention_model(model, config)
    for module, places in _placements(model):
        fqns = [fqn for _, _, fqn in places]
        chosen = [_selected(config, filter_fn, module, fqn) for fqn in fqns]
        if not any(chosen):
            continue
        first = fqns[chosen.index(True)]
        new = None
        if config.scope in ("linear", "all") and _is_linear(module):
            new = LMulLinear.from_linear(module, config)
        elif config.scope == "all":
            new = _elementwise(module, first, config)
        if new is None:
            continue
        _check_shared_selection(module, fqns, chosen)
        for parent, name, fqn in places:  # every position of a shared module gets the one replacement
            setattr(parent, name, new)
            handle._swaps.append(_Swap(fqn, parent, name, module, new))

    if wants_attention:
        _prepare_attention(model, config, filter_fn, handle)
    if not handle._swaps and not any(m._lmul_attention.config for _, m in handle._attention):
        raise ValueError(f"patch({config.tag!r}) selected nothing to patch in {type(model).__name__} "
                         f"(layers={config.layers!r}, filter_fn={'set' if filter_fn else None})")


def _placements(model: nn.Module) -> list[tuple[nn.Module, list[tuple[nn.Module, str, str]]]]:
    """Every submodule of ``model`` with all its positions ``(parent, attribute, qualified name)``,
    in post-order of first appearance (children before their parent, so that a gated MLP wraps its
    already-swapped projections). A module object registered in several places (``Sequential(lin,
    act, lin)``, tied or shared layers) is listed once with every place: ``named_children`` and
    ``named_modules`` skip repeats, which would leave the later places unpatched."""
    order: dict[int, tuple[nn.Module, list[tuple[nn.Module, str, str]]]] = {}

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            fqn = f"{prefix}.{name}" if prefix else name
            walk(child, fqn)
            order.setdefault(id(child), (child, []))[1].append((parent, name, fqn))

    walk(model, "")
    return list(order.values())


def _check_shared_selection(module: nn.Module, fqns: list[str], chosen: list[bool]) -> None:
    """One module object runs one arm: a shared module selected at some of its names but not all
    (by ``layers=`` or ``filter_fn``) cannot be patched at some and left exact at others."""
    if all(chosen) or not any(chosen):
        return
    yes = [f for f, c in zip(fqns, chosen, strict=True) if c]
    no = [f for f, c in zip(fqns, chosen, strict=True) if not c]
    raise ValueError(
        f"the {type(module).__name__} at {yes} is the same module object as at {no}, which the selection "
        "(layers=/filter_fn) leaves exact; a shared module runs one arm everywhere: select all of its names "
        "or none"
    )


def _check_attention_model(model: nn.Module, config: LMulConfig) -> None:
    if not _is_hf_model(model):
        raise NotImplementedError(
            f"scope={config.scope!r} patches attention through transformers' AttentionInterface, so it needs a "
            f"transformers PreTrainedModel; got {type(model).__name__} (scope='linear' works on any nn.Module)"
        )
    if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so lmul cannot replace its attention (unsupported architecture)"
        )
    impl = model.config._attn_implementation
    if impl not in _SUPPORTED_ORIGINAL:
        raise NotImplementedError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; lmul.patch replaces only "
            f"{_SUPPORTED_ORIGINAL} (load the model with attn_implementation='sdpa' or 'eager')"
        )


def _prepare_attention(model: nn.Module, config: LMulConfig, filter_fn, handle: PatchHandle) -> None:
    from transformers.modeling_utils import PreTrainedModel

    _register_attention()
    impl = model.config._attn_implementation
    found = [(m, [fqn for _, _, fqn in places]) for m, places in _placements(model) if _is_attention(m)]
    if not found:
        raise NotImplementedError(f"found no attention modules in {type(model).__name__} (unsupported architecture)")
    for m, fqns in found:  # the state lives on the module object: every name it has runs the same arm
        chosen = [_selected(config, filter_fn, m, fqn) for fqn in fqns]
        _check_shared_selection(m, fqns, chosen)
        m.__dict__["_lmul_attention"] = _AttentionState(config if chosen[0] else None, _fallback(m, impl), impl)
        handle._attention.extend((fqn, m) for fqn in fqns)
    seen = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m.config) not in seen:
            seen.add(id(m.config))
            handle._impl.append((m.config, m.config._attn_implementation_internal))
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise RuntimeError(f"transformers did not switch {type(model).__name__} to attn_implementation="
                           f"{ATTENTION_NAME!r} (it has {model.config._attn_implementation!r})")


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`: the original modules (holding the same, unchanged Parameters) and the
    original attention implementation come back, so the model computes bit for bit as before."""
    handle = model.__dict__.get("_lmul_handle")
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by lmul (nothing to unpatch)")
    handle.undo()


@dataclass
class PatchSummary:
    """What runs under which arm: rows ``(qualified name, what, arm)``; ``str()`` groups the rows
    over layer indices."""

    model: str
    config: Optional[str]
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.model}: " + (f"patched with {self.config}" if self.config else "not patched by lmul")
        groups: Counter = Counter()
        for fqn, what, arm in self.rows:
            groups[(re.sub(r"\.\d+(?=\.|$)", ".*", fqn), what, arm)] += 1
        width = max([len(g[0]) for g in groups] + [6])
        lines = [head] + [f"  {name:<{width}}  x{n:<3d} {what:<44s} {arm}" for (name, what, arm), n in groups.items()]
        return "\n".join(lines)


_PRODUCTS = {
    LMulLinear: "x·Wᵀ (L-matmul)",
    LMulGatedMLP: "act(gate)⊙up",
    LMulRMSNorm: "x⊙rsqrt(ms+ε), ⊙w",
    LMulLayerNorm: "(x-μ)⊙rsqrt(σ²+ε), ⊙w",
    LMulRotaryEmbedding: "q⊙cos, rot(q)⊙sin (and k)",
}


def inspect(model: nn.Module, print_summary: bool = False) -> PatchSummary:
    """Which modules and products of ``model`` run under which arm (config tag, or ``exact``).

    Lists every L-Mul module, every attention module (``Q·Kᵀ, A·V``) and, as ``exact``, the
    ``nn.Linear``/``Conv1D`` layers left unpatched."""
    handle = model.__dict__.get("_lmul_handle")
    summary = PatchSummary(type(model).__name__, handle.config.tag if handle else None)
    for fqn, m in model.named_modules(remove_duplicate=False):  # a shared module at each of its names
        kind = next((what for cls, what in _PRODUCTS.items() if isinstance(m, cls)), None)
        if kind is not None:
            summary.rows.append((fqn, kind, m.config.tag))
        elif "_lmul_attention" in m.__dict__:
            st = m._lmul_attention
            arm = st.config.tag if st.config else f"exact ({st.fallback_name})"
            summary.rows.append((fqn, "Q·Kᵀ, A·V (L-matmul)", arm))
        elif _is_attention(m):
            summary.rows.append((fqn, "Q·Kᵀ, A·V", f"exact ({m.config._attn_implementation})"))
        elif _is_linear(m):
            summary.rows.append((fqn, "x·Wᵀ", "exact"))
    if print_summary:
        print(summary)
    return summary
