"""One frozen configuration for running a model with L-Mul: :class:`LMulConfig`.

It says *which* multiply (format, mode, offset, rounding, accumulation, backend: the arguments of
:func:`lmul.matmul` / :func:`lmul.mul`) and *where* (``scope``, ``layers``), following the paper's
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

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from lmul.formats import Format
from lmul.ops import MODES, resolve_offset

__all__ = ["LMulConfig", "SCOPES", "PRESETS"]

SCOPES: tuple[str, ...] = ("attention", "linear", "all", "none")
ROUNDINGS: tuple[str, ...] = ("rne", "trunc")

# name -> LMulConfig keyword arguments; the evaluation arms (docs/patching.md has the table)
PRESETS: dict[str, dict] = {
    "exact": dict(fmt="fp32", mode="exact", scope="none"),                 # the unchanged model
    "e4m3": dict(fmt="e4m3", mode="exact", scope="attention"),             # paper's fp8 e4m3 attention
    "e5m2": dict(fmt="e5m2", mode="exact", scope="attention"),             # paper's fp8 e5m2 attention
    "bf16": dict(fmt="bf16", mode="exact", scope="attention"),             # bf16 attention baseline
    "lmul": dict(fmt="bf16", mode="bit", scope="attention"),               # paper's L-Mul attention
    "lmul-k2": dict(fmt="e8m2", mode="bit", rounding="trunc", scope="attention"),  # Table 5, k = 2
    "lmul-k3": dict(fmt="e8m3", mode="bit", rounding="trunc", scope="attention"),  # Table 5, k = 3
    "lmul-k4": dict(fmt="e8m4", mode="bit", rounding="trunc", scope="attention"),  # Table 5, k = 4
    "lmul-formula": dict(fmt="bf16", mode="formula", scope="attention"),   # Eq. 1 as real arithmetic
    "mitchell": dict(fmt="bf16", mode="bit", offset=0.0, scope="attention"),  # offset 0 (Mitchell 1962)
    "lmul-all": dict(fmt="bf16", mode="bit", scope="all"),                 # Table 6: every multiply
}


@dataclass(frozen=True)
class LMulConfig:
    """Which multiply, and where, for :func:`lmul.patch`.

    Fields ``fmt``, ``mode``, ``offset``, ``rounding``, ``acc``, ``acc_block``, ``backend`` are passed
    to :func:`lmul.matmul` (``mul`` takes the first four). ``layers`` restricts the patch to modules
    whose qualified name matches one of the entries: an ``int`` ``i`` selects decoder block ``i``
    (``*.layers.i`` / ``*.h.i``); a string is an :mod:`fnmatch` pattern matched against the module's
    name and its parents' names (``"model.layers.0"``, ``"*.mlp"``). ``None`` selects everything.
    """

    fmt: str = field(default="bf16", metadata=dict(help="operand format: e4m3, e5m2, bf16, fp16, fp32 or eXmY"))
    mode: str = field(default="bit", metadata=dict(help="bit (paper Eq. 2), formula (Eq. 1) or exact (baselines)",
                                                   choices=MODES))
    offset: Optional[float] = field(default=None, metadata=dict(help="L-Mul offset c (default 2^-l(m); 0: Mitchell)"))
    rounding: str = field(default="rne", metadata=dict(help="operand rounding", choices=ROUNDINGS))
    acc: str = field(default="fp32", metadata=dict(help="L-Matmul accumulation format"))
    acc_block: int = field(default=1, metadata=dict(help="products summed in float32 per accumulator rounding"))
    backend: str = field(default="auto", metadata=dict(help="lmul.matmul backend"))
    scope: str = field(default="attention", metadata=dict(help="where L-Mul runs", choices=SCOPES))
    layers: Optional[tuple[Union[int, str], ...]] = field(
        default=None, metadata=dict(help="comma-separated block indices / module-name patterns (default: all)"))

    def __post_init__(self) -> None:
        # normalise spellings so equal configs compare equal ("E4M3" == "e4m3", [0, 1] == (0, 1))
        try:
            fmt = Format.parse(self.fmt)
        except (TypeError, ValueError) as err:
            raise ValueError(f"LMulConfig: fmt={self.fmt!r} is not a format: {err}") from err
        object.__setattr__(self, "fmt", fmt.name)
        if self.mode not in MODES:
            raise ValueError(f"LMulConfig: mode must be one of {MODES}, got mode={self.mode!r}")
        if self.offset is not None:
            if self.mode == "exact":
                raise ValueError(f"LMulConfig: offset={self.offset!r} has no effect with mode='exact'; leave it None")
            try:
                resolve_offset(fmt, self.mode, self.offset)
            except ValueError as err:
                raise ValueError(f"LMulConfig: {err}") from err
            object.__setattr__(self, "offset", float(self.offset))
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"LMulConfig: rounding must be one of {ROUNDINGS}, got rounding={self.rounding!r}")
        try:
            acc = Format.parse(self.acc)
        except (TypeError, ValueError) as err:
            raise ValueError(f"LMulConfig: acc={self.acc!r} is not a format: {err}") from err
        object.__setattr__(self, "acc", acc.name)
        if isinstance(self.acc_block, bool) or not isinstance(self.acc_block, int) or self.acc_block < 1:
            raise ValueError(f"LMulConfig: acc_block must be a positive int, got acc_block={self.acc_block!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"LMulConfig: backend must be a backend name or 'auto', got backend={self.backend!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"LMulConfig: scope must be one of {SCOPES}, got scope={self.scope!r}")
        if self.scope == "none" and (self.mode != "exact" or fmt.name != "fp32" or self.layers is not None):
            raise ValueError(
                "LMulConfig: scope='none' runs the model unchanged, so it needs fmt='fp32', mode='exact' and "
                f"layers=None; got fmt={self.fmt!r}, mode={self.mode!r}, layers={self.layers!r}"
            )
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, (int, str)) else tuple(self.layers)
            bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, (int, str))]
            if bad or not layers:
                raise ValueError(
                    f"LMulConfig: layers must be None or a non-empty sequence of block indices (int) and name "
                    f"patterns (str), got layers={self.layers!r}"
                )
            object.__setattr__(self, "layers", layers)

    @classmethod
    def from_name(cls, name: str, **overrides) -> LMulConfig:
        """A named preset (:data:`PRESETS`: ``"lmul"``, ``"exact"``, ``"e4m3"``, ``"e5m2"``, ``"bf16"``,
        ``"lmul-k2"``..``"lmul-k4"``, ``"lmul-formula"``, ``"mitchell"``, ``"lmul-all"``), with
        optional field overrides (``from_name("lmul", layers=(0,))``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LMulConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def add_arguments(cls, parser, prefix: str = "") -> None:
        """Add one ``--<prefix><field>`` option per field to an argparse parser, help texts and
        choices from the field metadata, defaults ``None`` (= the field's default; see
        :meth:`from_arguments`), plus ``--<prefix>preset``."""
        parser.add_argument(f"--{prefix}preset", default=None, choices=sorted(PRESETS),
                            help="start from a named preset (the other options refine it)")
        for f in fields(cls):
            kind = {"offset": float, "acc_block": int}.get(f.name, str)
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{f.name}",
                                type=kind, default=None, choices=f.metadata.get("choices"),
                                help=f"{f.metadata['help']} (default: {f.default!r})")

    @classmethod
    def from_arguments(cls, namespace, prefix: str = "") -> LMulConfig:
        """The config that :meth:`add_arguments` options describe (unset options keep the default)."""
        p = prefix.replace("-", "_")
        values = {f.name: getattr(namespace, p + f.name) for f in fields(cls)}
        given = {k: v for k, v in values.items() if v is not None}
        if "layers" in given:
            given["layers"] = tuple(int(x) if x.strip().isdigit() else x.strip() for x in given["layers"].split(","))
        preset = getattr(namespace, p + "preset", None)
        return cls.from_name(preset, **given) if preset else cls(**given)

    def replace(self, **changes) -> LMulConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def tag(self) -> str:
        """A short string for logs and file names: the preset name when the config is a preset
        (plus ``-L...`` for a layer selection), else ``scope-fmt-mode`` plus the non-default options
        (``attention-e8m3-bit-trunc``)."""
        layers = ""
        if self.layers is not None:
            layers = "-L" + "_".join(re.sub(r"[^A-Za-z0-9]+", "", str(x)) or "x" for x in self.layers)
        for name, kwargs in PRESETS.items():
            if self.replace(layers=None) == LMulConfig(**kwargs):
                return name + layers
        parts = [self.scope, self.fmt, self.mode]
        if self.offset is not None:
            parts.append(f"c{self.offset:g}")
        if self.rounding != "rne":
            parts.append(self.rounding)
        if self.acc != "fp32":
            parts.append(f"acc{self.acc}" + (f"x{self.acc_block}" if self.acc_block != 1 else ""))
        if self.backend != "auto":
            parts.append(self.backend)
        return "-".join(parts) + layers

    def matmul_kwargs(self) -> dict:
        """Keyword arguments for :func:`lmul.matmul`."""
        return dict(fmt=self.fmt, mode=self.mode, offset=self.offset, rounding=self.rounding,
                    acc=self.acc, backend=self.backend, acc_block=self.acc_block)

    def mul_kwargs(self) -> dict:
        """Keyword arguments for :func:`lmul.mul`."""
        return dict(fmt=self.fmt, mode=self.mode, offset=self.offset, rounding=self.rounding)

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
