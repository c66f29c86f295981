"""Hardware for L-Mul: generated Verilog for an L-Mul unit and an IEEE-style multiplier,
Icarus Verilog simulation against :func:`lmul.mul`, and Yosys gate counts (paper §2.3.2).
See ``docs/hardware.md``."""

from lmul.hw.rtl import UNITS, UnitSpec, verilog

__all__ = ["UNITS", "UnitSpec", "verilog"]
