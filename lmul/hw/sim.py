"""Simulate generated units with Icarus Verilog and decode their outputs to numbers.

The testbench reads operand pairs ``{a, b}`` from a hex file (``$readmemh``), applies each to the
combinational unit and writes the packed result ``{nan, inf, zero, s, e, f}`` as one hex line;
Python does the comparing. ``iverilog``/``vvp`` come from the Debian package ``iverilog``
(``make hw-deps``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lmul.files import atomic_write
from lmul.formats import Format
from lmul.hw.rtl import UnitSpec, verilog

__all__ = ["SimResult", "have_iverilog", "simulate", "decode_operand", "all_pairs", "random_pairs"]


def have_iverilog() -> bool:
    return shutil.which("iverilog") is not None and shutil.which("vvp") is not None


def _require_iverilog() -> None:
    if not have_iverilog():
        raise RuntimeError("Icarus Verilog (iverilog, vvp) is not installed: run `make hw-deps` "
                           "(apt-get install iverilog yosys)")


@dataclass(frozen=True)
class SimResult:
    """Decoded unit outputs, one entry per operand pair (numpy arrays)."""

    spec: UnitSpec
    s: np.ndarray      # bool
    zero: np.ndarray   # bool
    inf: np.ndarray    # bool
    nan: np.ndarray    # bool
    e: np.ndarray      # int64 biased exponent
    f: np.ndarray      # int64 fraction field

    def values(self) -> np.ndarray:
        """The products as float64 (exact: every output value of every unit with E <= 8 and
        m <= 23 has at most 48 significant bits and an exponent inside float64's range).

        ``(-1)^s (2^F + f) 2^(e - OUT_BIAS - F)``; flags override in the order nan, inf, zero."""
        fb = self.spec.out_frac_bits
        mag = np.ldexp((self.f + (1 << fb)).astype(np.float64), (self.e - self.spec.out_bias - fb).astype(np.int64))
        mag = np.where(self.zero, 0.0, mag)
        mag = np.where(self.inf, np.inf, mag)
        mag = np.where(self.nan, np.nan, mag)
        return np.where(self.s, -mag, mag)


def decode_operand(bits: np.ndarray, fmt: Format) -> np.ndarray:
    """Float64 values of ``fmt`` encodings ``[s|e|m]`` (an independent decoder of the format
    definition in SPEC §1; the tests check it against torch's dtype views)."""
    bits = np.asarray(bits, dtype=np.int64)
    m, e_bits = fmt.man_bits, fmt.exp_bits
    man = bits & ((1 << m) - 1)
    field = (bits >> m) & ((1 << e_bits) - 1)
    sign = (bits >> (m + e_bits)) & 1
    top = field == (1 << e_bits) - 1
    sig = np.where(field > 0, man + (1 << m), man).astype(np.float64)
    mag = np.ldexp(sig, np.maximum(field, 1) - fmt.bias - m)
    if fmt.finite_only:
        mag = np.where(top & (man == (1 << m) - 1), np.nan, mag)
    else:
        mag = np.where(top, np.where(man == 0, np.inf, np.nan), mag)
    return np.where(sign == 1, -mag, mag)


def all_pairs(fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair of encodings (2^(2N) pairs)."""
    codes = np.arange(1 << fmt.bits, dtype=np.int64)
    a, b = np.meshgrid(codes, codes, indexing="ij")
    return a.ravel(), b.ravel()


def random_pairs(fmt: Format, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniformly random encoding pairs (all classes: normals, subnormals, zeros, inf, NaN)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 1 << fmt.bits, n, dtype=np.int64),
            rng.integers(0, 1 << fmt.bits, n, dtype=np.int64))


_TESTBENCH = """`timescale 1ns/1ps
module tb;
    parameter NVEC = 1;
    reg  [{n2}:0] vec [0:NVEC-1];
    reg  [{n1}:0] a, b;
    wire s, zero, inf, nan;
    wire [{e1}:0] e;
    wire [{f1}:0] f;
    integer i, fd;
    reg [1023:0] ops_file, out_file;
    {name} dut (.a(a), .b(b), .s(s), .zero(zero), .inf(inf), .nan(nan), .e(e), .f(f));
    initial begin
        if (!$value$plusargs("ops=%s", ops_file)) $fatal(1, "missing +ops=");
        if (!$value$plusargs("out=%s", out_file)) $fatal(1, "missing +out=");
        $readmemh(ops_file, vec);
        fd = $fopen(out_file, "w");
        for (i = 0; i < NVEC; i = i + 1) begin
            {{a, b}} = vec[i];
            #1 $fdisplay(fd, "%h", {{nan, inf, zero, s, e, f}});
        end
        $fclose(fd);
        $finish;
    end
endmodule
"""


def testbench(spec: UnitSpec) -> str:
    n = spec.width
    return _TESTBENCH.format(n2=2 * n - 1, n1=n - 1, e1=spec.out_exp_bits - 1, f1=spec.out_frac_bits - 1,
                             name=spec.name)


def simulate(spec: UnitSpec, a: np.ndarray, b: np.ndarray, workdir: Optional[Path] = None) -> SimResult:
    """Run ``spec``'s unit on the encoding pairs ``(a[i], b[i])`` in Icarus Verilog."""
    _require_iverilog()
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a and b must be non-empty 1-D arrays of one length, got {a.shape} and {b.shape}")
    n = spec.width
    if (a < 0).any() or (a >> n).any() or (b < 0).any() or (b >> n).any():
        raise ValueError(f"operand encodings must be in [0, 2^{n})")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = Path(tmp)
        atomic_write(d / "unit.v", verilog(spec))
        atomic_write(d / "tb.v", testbench(spec))
        digits = (2 * n + 3) // 4
        pairs = (a << n) | b
        atomic_write(d / "ops.hex", "\n".join(f"{v:0{digits}x}" for v in pairs.tolist()) + "\n")
        _run(["iverilog", "-g2005", "-Wall", "-o", "sim.vvp", f"-Ptb.NVEC={a.size}", "tb.v", "unit.v"], d)
        _run(["vvp", "-n", "sim.vvp", "+ops=ops.hex", "+out=out.hex"], d)
        lines = (d / "out.hex").read_text().split()
    if len(lines) != a.size:
        raise RuntimeError(f"simulation wrote {len(lines)} results for {a.size} operand pairs")
    try:
        words = [int(w, 16) for w in lines]
    except ValueError as err:  # an x or z bit: the unit left an output undriven
        raise RuntimeError(f"{spec.name} produced a non-binary output: {err}") from err
    fb, eb = spec.out_frac_bits, spec.out_exp_bits
    out = np.array(words, dtype=np.uint64)
    f = (out & np.uint64((1 << fb) - 1)).astype(np.int64)
    e = ((out >> np.uint64(fb)) & np.uint64((1 << eb) - 1)).astype(np.int64)
    flags = (out >> np.uint64(fb + eb)).astype(np.int64)
    return SimResult(spec, s=(flags & 1) == 1, zero=(flags & 2) == 2, inf=(flags & 4) == 4, nan=(flags & 8) == 8,
                     e=e, f=f)


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
