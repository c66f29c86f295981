"""Gate counts of the generated units with Yosys + ABC, and the L-Mul / multiplier table.

Each unit is synthesised flat (``synth -flatten -noabc``) and mapped by ABC to two simple
gate libraries:

* ``gates``: 2-input AND, NAND, OR, NOR, XOR, XNOR and NOT (``abc -g AND,NAND,OR,NOR,XOR,XNOR``).
  From this mapping we report the cell count, the logic depth (``ltp -noff``: gates on the
  longest input-to-output path), the **paper-convention gate count** — 1 per AND/NAND/OR/NOR/NOT,
  4 per XOR/XNOR, the weights under the paper's full adder = 11 (2 XOR + 2 AND + OR) and half
  adder = 5 (XOR + AND), SPEC §6 — and an area estimate from Nangate 45 nm X1 cell areas
  (:data:`AREA_UM2`, not a placed-and-routed area).
* ``nand``: 2-input NAND and NOT only (``abc -g NAND``): NAND2 + NOT cells, the textbook
  "NAND-equivalent" count.

Counts are ABC's heuristic result for this Verilog (yosys 0.23 tested), not a proven minimum.
The paper's numbers (SPEC §6) are pencil estimates of the datapath; see ``docs/hardware.md``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmul.files import atomic_write
from lmul.hw.rtl import UnitSpec, verilog

__all__ = ["AREA_UM2", "MAC_FORMATS", "PAPER_GATES", "PAPER_WEIGHT", "SynthResult", "TABLE_FORMATS", "gate_counts",
           "have_yosys", "paper_lmul_formula", "synthesize", "table"]

# paper-convention weights (SPEC §6: full adder 11 = 2 XOR(4) + 2 AND + OR, half adder 5 = XOR + AND)
PAPER_WEIGHT = {"AND": 1, "NAND": 1, "OR": 1, "NOR": 1, "NOT": 1, "XOR": 4, "XNOR": 4}
# Nangate 45 nm open cell library, X1 drive strength, cell area in um^2
AREA_UM2 = {"AND": 1.064, "NAND": 0.798, "OR": 1.064, "NOR": 0.798, "NOT": 0.532, "XOR": 1.596, "XNOR": 1.596}
# the paper's gate counts (arXiv:2410.00907 §2.3.2, SPEC §6), keyed by (unit, format name)
PAPER_GATES = {("lmul", "e4m3"): 157, ("lmul", "e5m2"): 157, ("lmul", "e5m6"): 201, ("lmul", "fp16"): 256,
               ("fpmul", "e4m3"): 325, ("fpmul", "e5m2"): 296, ("fpmul", "fp16"): 584}
TABLE_FORMATS = ("e4m3", "e5m2", "e5m6", "bf16", "fp16", "fp32")


def paper_lmul_formula(spec: UnitSpec) -> int:
    """The paper's L-Mul estimate: sign XOR 4 + (E+m)-bit adder (5 + 11 (E+m-1)) + 8-bit
    exponent-offset adder 82 (SPEC §6; gives 157 for fp8, 201 for e5m6, 245 for fp16)."""
    k = spec.fmt.exp_bits + spec.fmt.man_bits
    return 4 + 5 + 11 * (k - 1) + 82


def have_yosys() -> bool:
    return shutil.which("yosys") is not None


@dataclass(frozen=True)
class SynthResult:
    spec: UnitSpec
    cells: dict[str, int]      # "gates" mapping, by type (AND, NAND, OR, NOR, XOR, XNOR, NOT)
    depth: int                 # gates on the longest path ("gates" mapping)
    nand_cells: int            # NAND2 + NOT cells of the "nand" mapping
    datapath_cells: dict[str, int]  # "gates" mapping without the zero/inf/NaN flag logic

    @property
    def total_cells(self) -> int:
        return sum(self.cells.values())

    @property
    def paper_gates(self) -> int:
        return sum(PAPER_WEIGHT[k] * v for k, v in self.cells.items())

    @property
    def datapath_gates(self) -> int:
        """Paper-convention gates of the unit without its flag outputs (sign, exponent, fraction)."""
        return sum(PAPER_WEIGHT[k] * v for k, v in self.datapath_cells.items())

    @property
    def area_um2(self) -> float:
        return sum(AREA_UM2[k] * v for k, v in self.cells.items())


def _datapath_wrapper(spec: UnitSpec) -> str:
    """A top module exposing only ``s``, ``e``, ``f``: synthesis then drops the flag logic."""
    n, ew, fw = spec.width, spec.out_exp_bits, spec.out_frac_bits
    return (f"module datapath (input wire [{n - 1}:0] a, input wire [{n - 1}:0] b, output wire s, "
            f"output wire [{ew - 1}:0] e, output wire [{fw - 1}:0] f);\n"
            f"    {spec.name} u (.a(a), .b(b), .s(s), .e(e), .f(f), .zero(), .inf(), .nan());\nendmodule\n")


def _yosys(spec: UnitSpec, gates: str, tmp: Path, flags: bool = True) -> tuple[dict[str, int], int]:
    top = spec.name if flags else "datapath"
    return _map(verilog(spec) + ("" if flags else _datapath_wrapper(spec)), top, gates, tmp)


def gate_counts(text: str, top: str) -> tuple[dict[str, int], int]:
    """Cells by type and logic depth of module ``top`` of the Verilog ``text`` ("gates" mapping)."""
    if not have_yosys():
        raise RuntimeError("yosys is not installed: run `make hw-deps` (apt-get install iverilog yosys)")
    with tempfile.TemporaryDirectory() as tmp:
        return _map(text, top, "AND,NAND,OR,NOR,XOR,XNOR", Path(tmp))


def _map(text: str, top: str, gates: str, tmp: Path) -> tuple[dict[str, int], int]:
    atomic_write(tmp / "unit.v", text)
    script = (f"read_verilog unit.v; synth -flatten -noabc -top {top}; abc -g {gates}; opt_clean; "
              "tee -q -o stat.json stat -json; tee -q -o ltp.txt ltp -noff")
    proc = subprocess.run(["yosys", "-q", "-p", script], cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"yosys failed on {top}:\n{proc.stdout}\n{proc.stderr}")
    stat = json.loads((tmp / "stat.json").read_text())["design"]["num_cells_by_type"]
    cells = {k.strip("$_"): v for k, v in stat.items()}
    unknown = set(cells) - set(PAPER_WEIGHT)
    if unknown:
        raise RuntimeError(f"unexpected cell types after mapping {top}: {sorted(unknown)}")
    depth = 0
    for line in (tmp / "ltp.txt").read_text().splitlines():
        if "Longest topological path" in line:
            depth = int(line.split("length=")[1].split(")")[0])
    return cells, depth


def synthesize(spec: UnitSpec) -> SynthResult:
    """Synthesise ``spec``'s unit with Yosys/ABC (see the module docstring)."""
    if not have_yosys():
        raise RuntimeError("yosys is not installed: run `make hw-deps` (apt-get install iverilog yosys)")
    with tempfile.TemporaryDirectory() as tmp:
        cells, depth = _yosys(spec, "AND,NAND,OR,NOR,XOR,XNOR", Path(tmp))
        nand, _ = _yosys(spec, "NAND", Path(tmp))
        core, _ = _yosys(spec, "AND,NAND,OR,NOR,XOR,XNOR", Path(tmp), flags=False)
    return SynthResult(spec, cells, depth, sum(nand.values()), core)


def _row(label: str, r: SynthResult, lm: SynthResult, paper: str) -> str:
    c = r.cells
    mix = " ".join(f"{k}:{c[k]}" for k in PAPER_WEIGHT if c.get(k))
    ratio = f"{lm.paper_gates / r.paper_gates:.2f}" if r is not lm else ""
    return (f"| {r.spec.fmt.name} | {label} | `{r.spec.name}` | {r.total_cells} | {r.paper_gates} | {r.nand_cells} | "
            f"{r.depth} | {r.area_um2:.1f} | {ratio} | {paper} | {mix} |")


def _paper(unit: str, fmt: str) -> int | None:
    return PAPER_GATES.get((unit, fmt))


def table(formats: tuple[str, ...] = TABLE_FORMATS, progress: bool = False) -> str:
    """The Markdown synthesis tables: per format, the L-Mul unit, the paper-comparable multiplier
    (RNE to m bits, subnormals flushed: same output width as L-Mul) and the SPEC-exact multiplier
    (all 2m+1 fraction bits, subnormal operands). A summary of paper-convention gates and
    L-Mul / multiplier ratios beside the paper's, then the detail per unit."""
    from lmul import __version__

    yv = subprocess.run(["yosys", "-V"], capture_output=True, text=True).stdout.strip() if have_yosys() else "?"
    summary = [
        "| fmt | L-Mul | multiplier (RNE, FTZ) | L-Mul / mult. | paper L-Mul | paper mult. | paper ratio | "
        "multiplier (exact, subnormals) | L-Mul / exact mult. | datapath only: L-Mul | mult. (RNE, FTZ) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    detail = [
        "| fmt | unit | module | cells | paper gates | NAND2+NOT | depth | area µm² (45 nm) | L-Mul / this | paper | "
        "cell mix |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in formats:
        units = [("L-Mul", UnitSpec.make(name, "lmul")),
                 ("multiplier, RNE, FTZ", UnitSpec.make(name, "fpmul", rounding="rne", subnormals=False)),
                 ("multiplier, exact, subnormals", UnitSpec.make(name, "fpmul"))]
        results = []
        for label, spec in units:
            if progress:
                print(f"synthesising {spec.name} ...", flush=True)
            results.append((label, synthesize(spec)))
        lm, rne, exact = (r for _, r in results)
        for label, r in results:
            paper = _paper(r.spec.unit, name) if r is not exact else None
            text = "—" if paper is None else str(paper)
            if r is lm:
                text += f" (formula {paper_lmul_formula(r.spec)})"
            detail.append(_row(label, r, lm, "" if r is exact else text))
        pl, pm = _paper("lmul", name), _paper("fpmul", name)
        summary.append(
            f"| {name} | {lm.paper_gates} | {rne.paper_gates} | {lm.paper_gates / rne.paper_gates:.2f} | "
            f"{pl if pl is not None else '— (' + str(paper_lmul_formula(lm.spec)) + ')'} | "
            f"{pm if pm is not None else '—'} | {f'{pl / pm:.2f}' if pl and pm else '—'} | {exact.paper_gates} | "
            f"{lm.paper_gates / exact.paper_gates:.2f} | {lm.datapath_gates} | {rne.datapath_gates} | "
            f"{lm.datapath_gates / rne.datapath_gates:.2f} |")
    mac = _mac_table(formats=MAC_FORMATS, progress=progress)
    head = [f"Generated by `python -m lmul rtl --synth-table` (lmul {__version__}, {yv}).", "",
            "Paper-convention gates (AND/NAND/OR/NOR/NOT = 1, XOR/XNOR = 4). Paper: arXiv:2410.00907 §2.3.2; "
            "in parentheses the paper's L-Mul formula where it gives no number. \"Datapath only\" drops the "
            "zero/inf/NaN flag outputs (and the logic only they use).", ""]
    return "\n".join(head + summary + ["", "Per unit:", ""] + detail + [""] + mac) + "\n"


MAC_FORMATS = ("e4m3", "e5m2", "fp16")


def _mac_table(formats: tuple[str, ...], progress: bool) -> list[str]:
    """MAC lanes (``lmul.hw.mac``): product unit + IEEE binary32 adder, ``out = acc + P``."""
    from lmul.hw.mac import MacSpec, fadd_verilog, mac_verilog

    def weigh(cells: dict[str, int]) -> tuple[int, float]:
        return (sum(PAPER_WEIGHT[k] * v for k, v in cells.items()), sum(AREA_UM2[k] * v for k, v in cells.items()))

    lines = ["MAC lanes (`lmul.hw.mac`: product unit feeding an IEEE binary32 adder, `out = acc + P` rounded "
             "once; the adder alone is the first row):", "",
             "| fmt | lane | paper gates | depth | area µm² (45 nm) | L-Mul lane / this |", "|---|---|---|---|---|---|"]
    cells, depth = gate_counts(fadd_verilog(), "fadd_f32")
    gates, area = weigh(cells)
    lines.append(f"| — | `fadd_f32` (adder alone) | {gates} | {depth} | {area:.1f} | |")
    for name in formats:
        lanes = []
        for spec in (UnitSpec.make(name, "lmul"), UnitSpec.make(name, "fpmul", rounding="rne", subnormals=False),
                     UnitSpec.make(name, "fpmul")):
            try:
                lanes.append(MacSpec(spec))
            except ValueError:  # products that are not float32 normals (fp16 exact: subnormal products)
                continue
        base = None
        for lane in lanes:
            if progress:
                print(f"synthesising {lane.name} ...", flush=True)
            cells, depth = gate_counts(mac_verilog(lane), lane.name)
            gates, area = weigh(cells)
            base = base or gates
            ratio = f"{base / gates:.2f}" if lane is not lanes[0] else ""
            lines.append(f"| {name} | `{lane.name}` | {gates} | {depth} | {area:.1f} | {ratio} |")
    return lines
