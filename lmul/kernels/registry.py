"""What each fast backend is and whether it can run on this machine (:func:`backends`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from lmul.matmul import AUTO_ORDER, BACKENDS

__all__ = ["backends", "describe"]

# name -> (one-line description, machine check returning why not or None)
_INFO: dict[str, tuple[str, Callable[[], Optional[str]]]] = {
    "reference": ("chunked elementwise products, float64 sums (every mode, format, device, acc=)", lambda: None),
}


def describe(name: str, text: str, machine_check: Callable[[], Optional[str]]) -> None:
    """Record a backend's description and its machine-level availability check."""
    _INFO[name] = (text, machine_check)


def backends() -> list[dict]:
    """Every registered L-Matmul backend: ``name``, ``available`` (on this machine, for some
    inputs), ``reason`` (why not, or which inputs it covers), ``description``, ``auto_rank``
    (position in the ``backend="auto"`` preference order, None if auto never picks it)."""
    rows = []
    for name in BACKENDS:
        text, check = _INFO.get(name, ("", lambda: None))
        why = check()
        rank = AUTO_ORDER.index(name) if name in AUTO_ORDER else None
        rows.append({"name": name, "available": why is None, "reason": why or "", "description": text,
                     "auto_rank": rank})
    return rows
