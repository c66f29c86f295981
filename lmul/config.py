"""One frozen configuration for running a model with L-Mul: :class:`LMulConfig`.

It pairs *which* multiply (an :class:`lmul.spec.LMulSpec`: format, mode, offset, rounding,
accumulation, backend) with *where* (a :class:`Placement`: ``scope``, ``layers``), following the paper's
placement (Luo & Sun, arXiv:2410.00907, Eq. 3 and section 3.3; ``docs/semantics.md`` section 5):

* ``scope="attention"`` (paper Tables 2-5): Q·Kᵀ and softmax(·)·V are L-Matmuls; projections,
  MLP, norms, scaling, masking and softmax stay exact.
* ``scope="linear"``: every ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``) is an L-Matmul.
* ``scope="all"`` (paper Table 6): linear layers, attention, and the element-wise products listed
  in ``docs/patching.md`` (gated-MLP product, norm products, rotary embedding).
* ``scope="none"``: the model runs unchanged (the ``"exact"`` evaluation arm).

The fp8/bf16 baselines are the same hooks with ``mode="exact"``, so arms differ only in the multiply.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from lmul.spec import PRESETS, LMulSpec

__all__ = ["LMulConfig", "Placement", "SCOPES", "PRESETS"]

SCOPES: tuple[str, ...] = ("attention", "linear", "all", "none")
_SPEC_FIELDS = tuple(f.name for f in fields(LMulSpec))


@dataclass(frozen=True)
class Placement:
    """Where L-Mul runs in a model: ``scope`` (``attention``, ``linear``, ``all``, ``none``) and
    ``layers``: ``None`` (everything) or entries that select modules by qualified name: an ``int``
    ``i`` selects decoder block ``i`` (``*.layers.i`` / ``*.h.i`` / ``*.blocks.i``); a string is an
    :mod:`fnmatch` pattern matched against the module's name and its parents' names
    (``"model.layers.0"``, ``"*.mlp"``)."""

    scope: str = "attention"
    layers: Optional[tuple[Union[int, str], ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.scope, str) or self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got scope={self.scope!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, (int, str)) else tuple(self.layers)
            bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, (int, str))]
            if bad or not layers:
                raise ValueError(
                    f"layers must be None or a non-empty sequence of block indices (int) and name "
                    f"patterns (str), got layers={self.layers!r}"
                )
            object.__setattr__(self, "layers", layers)

    def selects(self, fqn: str) -> bool:
        """Whether ``layers`` selects the module named ``fqn`` (or one of its parents)."""
        if self.layers is None:
            return True
        names = [fqn] + [fqn[:i] for i, ch in enumerate(fqn) if ch == "."]
        for entry in self.layers:
            if isinstance(entry, int):
                if re.search(rf"(^|\.)(layers|h|blocks)\.{entry}(\.|$)", fqn):
                    return True
            elif any(fnmatch.fnmatchcase(n, entry) for n in names):
                return True
        return False

    @property
    def tag(self) -> str:
        if self.layers is None:
            return ""
        return "-L" + "_".join(re.sub(r"[^A-Za-z0-9]+", "", str(x)) or "x" for x in self.layers)


@dataclass(frozen=True, init=False)
class LMulConfig:
    """Which multiply and where, for :func:`lmul.patch`: ``LMulConfig(spec, placement)``, or the
    same built from flat keyword options ``LMulConfig(fmt="e4m3", mode="exact", scope="all")``
    (the :class:`~lmul.spec.LMulSpec` fields plus ``scope`` and ``layers``).

    ``scope="none"`` runs the model unchanged, so it needs the exact fp32 spec and no layer selection.
    """

    spec: LMulSpec
    placement: Placement

    def __init__(self, spec: Optional[LMulSpec] = None, placement: Optional[Placement] = None, **options: Any):
        unknown = set(options) - set(_SPEC_FIELDS) - {"scope", "layers"}
        if unknown:
            raise TypeError(f"LMulConfig: unknown options {sorted(unknown)}; known: "
                            f"{list(_SPEC_FIELDS) + ['scope', 'layers']}")
        spec_kw = {k: v for k, v in options.items() if k in _SPEC_FIELDS}
        place_kw = {k: v for k, v in options.items() if k in ("scope", "layers")}
        if spec is not None and spec_kw or placement is not None and place_kw:
            raise ValueError("LMulConfig: pass a spec/placement object or its keyword options, not both")
        try:
            spec = spec if spec is not None else LMulSpec(**spec_kw)
            placement = placement if placement is not None else Placement(**place_kw)
        except ValueError as err:
            raise ValueError(f"LMulConfig: {err}") from err
        if not isinstance(spec, LMulSpec) or not isinstance(placement, Placement):
            raise TypeError("LMulConfig(spec, placement) takes an LMulSpec and a Placement")
        if placement.scope == "none" and (spec.mode != "exact" or spec.fmt.name != "fp32" or placement.layers):
            raise ValueError(
                "LMulConfig: scope='none' runs the model unchanged, so it needs fmt='fp32', mode='exact' and "
                f"layers=None; got fmt={spec.fmt.name!r}, mode={spec.mode!r}, layers={placement.layers!r}"
            )
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "placement", placement)

    @property
    def scope(self) -> str:
        return self.placement.scope

    @property
    def layers(self) -> Optional[tuple[Union[int, str], ...]]:
        return self.placement.layers

    def selects(self, fqn: str) -> bool:
        """Whether the placement selects the module named ``fqn``."""
        return self.placement.selects(fqn)

    def options(self) -> dict:
        """The flat keyword options that rebuild this config."""
        s = self.spec
        return dict(fmt=s.fmt.name, mode=s.mode, offset=None if s.mode == "exact" else s.offset, rounding=s.rounding,
                    acc=s.acc_name, acc_block=s.acc_block, backend=s.backend, backward=s.backward, scaling=s.scaling,
                    acc_tile=s.acc_tile, scope=self.scope, layers=self.layers)

    @classmethod
    def from_name(cls, name: str, **overrides) -> LMulConfig:
        """A named preset (:data:`lmul.spec.PRESETS`: ``"lmul"``, ``"exact"``, ``"e4m3"``, ``"e5m2"``,
        ``"bf16"``, ``"lmul-k2"``..``"lmul-k4"``, ``"lmul-formula"``, ``"mitchell"``, ``"lmul-all"``),
        with optional field overrides (``from_name("lmul", layers=(0,))``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LMulConfig preset {name!r}; known: {', '.join(PRESETS)}")
        spec_kw, scope = PRESETS[name]
        return cls(**{**spec_kw, "scope": scope, **overrides})

    @classmethod
    def add_arguments(cls, parser, prefix: str = "") -> None:
        """Add ``--<prefix>preset``, the :class:`~lmul.spec.LMulSpec` options
        (:meth:`LMulSpec.add_arguments`) and ``--<prefix>scope`` / ``--<prefix>layers``, defaults ``None``
        (= the field's default; see :meth:`from_arguments`)."""
        parser.add_argument(f"--{prefix}preset", default=None, choices=list(PRESETS),
                            help="start from a named preset (the other options refine it)")
        LMulSpec.add_arguments(parser, prefix)
        p = prefix.replace("-", "_")
        parser.add_argument(f"--{prefix}scope", dest=f"{p}scope", default=None, choices=SCOPES,
                            help="where L-Mul runs (default: 'attention')")
        parser.add_argument(f"--{prefix}layers", dest=f"{p}layers", default=None,
                            help="comma-separated block indices / module-name patterns (default: all)")

    @classmethod
    def from_arguments(cls, namespace, prefix: str = "") -> LMulConfig:
        """The config that :meth:`add_arguments` options describe (unset options keep the default)."""
        p = prefix.replace("-", "_")
        given = {k: getattr(namespace, p + k) for k in (*_SPEC_FIELDS, "scope", "layers")}
        given = {k: v for k, v in given.items() if v is not None}
        if "layers" in given:
            given["layers"] = tuple(int(x) if x.strip().isdigit() else x.strip() for x in given["layers"].split(","))
        spec_name = getattr(namespace, p + "spec", None)
        if spec_name:
            base = LMulSpec.from_name(spec_name, **{k: v for k, v in given.items() if k in _SPEC_FIELDS})
            given = {k: v for k, v in given.items() if k not in _SPEC_FIELDS}
            given.update(fmt=base.fmt, mode=base.mode, offset=None if base.mode == "exact" else base.offset,
                         rounding=base.rounding, acc=base.acc, acc_block=base.acc_block, backend=base.backend,
                         backward=base.backward, scaling=base.scaling, acc_tile=base.acc_tile)
        preset = getattr(namespace, p + "preset", None)
        return cls.from_name(preset, **given) if preset else cls(**given)

    def replace(self, **changes) -> LMulConfig:
        """A copy with some options changed (validated again)."""
        spec_kw = {k: v for k, v in changes.items() if k in _SPEC_FIELDS}
        place_kw = {k: v for k, v in changes.items() if k not in _SPEC_FIELDS}
        spec = self.spec.replace(**spec_kw) if spec_kw else self.spec
        unknown = set(place_kw) - {"scope", "layers"}
        if unknown:
            raise TypeError(f"LMulConfig.replace: unknown options {sorted(unknown)}")
        placement = self.placement
        if place_kw:
            placement = Placement(**{"scope": self.scope, "layers": self.layers, **place_kw})
        return LMulConfig(spec, placement)

    @property
    def preset(self) -> Optional[str]:
        """The preset name this config equals (ignoring ``layers``), or None."""
        for name in PRESETS:
            if self.replace(layers=None) == LMulConfig.from_name(name):
                return name
        return None

    @property
    def tag(self) -> str:
        """A short string for logs and file names: the preset name when the config is a preset
        (plus ``-L...`` for a layer selection), else ``scope-`` and the spec name
        (``attention-e8m3-bit-trunc``)."""
        preset = self.preset
        return (preset if preset else f"{self.scope}-{self.spec.name}") + self.placement.tag

    def to_dict(self) -> dict:
        """JSON-able: the resolved spec, the placement and the tag (for result files)."""
        return dict(tag=self.tag, spec=self.spec.to_dict(), scope=self.scope,
                    layers=list(self.layers) if self.layers is not None else None)

    def matmul_kwargs(self) -> dict:
        """Keyword arguments for :func:`lmul.matmul`: ``spec=``."""
        return dict(spec=self.spec)

    def mul_kwargs(self) -> dict:
        """Keyword arguments for :func:`lmul.mul`: ``spec=``."""
        return dict(spec=self.spec)
