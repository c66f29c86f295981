"""``lmul rtl``: write a unit's Verilog, verify it in simulation, synthesise it, or build the table.

    lmul rtl --fmt e4m3 --unit lmul --out rtl/            # rtl/lmul_e4m3.v + rtl/tb_lmul_e4m3.v
    lmul rtl --fmt bf16 --unit fpmul --verify --n 1000000  # Icarus vs lmul.mul, bit for bit
    lmul rtl --fmt fp16 --unit fpmul --rounding rne --flush-subnormals --synth
    lmul rtl --fmt e4m3 --unit lmul --mac --verify          # MAC lane: acc + product in float32
    lmul rtl --synth-table docs/hardware_table.md          # the L-Mul / multiplier table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmul.cli import CliError, int_arg, seed_arg
from lmul.files import atomic_write
from lmul.hw.rtl import UNITS, UnitSpec, verilog


def _spec(args: argparse.Namespace) -> UnitSpec:
    if args.spec:
        return UnitSpec.from_spec(args.spec)
    if args.unit == "lmul":
        if args.rounding != "exact" or args.flush_subnormals:
            raise CliError("--rounding/--flush-subnormals apply to --unit fpmul only")
        return UnitSpec.make(args.fmt, "lmul", offset=args.offset)
    if args.offset is not None:
        raise CliError("--offset applies to --unit lmul only")
    return UnitSpec.make(args.fmt, "fpmul", rounding=args.rounding, subnormals=not args.flush_subnormals)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as err:  # a bad format/option combination: say which
        raise CliError(str(err)) from err


def _run(args: argparse.Namespace) -> int:
    if args.synth_table:
        from lmul.hw.synth import table

        out = Path(args.synth_table)
        atomic_write(out, table(progress=True))
        print(f"wrote {out}")
        return 0
    spec = _spec(args)
    did = False
    if args.out and args.mac:
        from lmul.hw.mac import MacSpec, mac_verilog

        lane = MacSpec(spec)
        atomic_write(Path(args.out) / f"{lane.name}.v", mac_verilog(lane))
        print(f"wrote {Path(args.out) / (lane.name + '.v')} (ports a, b, acc[32] -> out[32], float32)")
        did = True
    elif args.out:
        from lmul.hw.sim import testbench

        out = Path(args.out)
        atomic_write(out / f"{spec.name}.v", verilog(spec))
        atomic_write(out / f"tb_{spec.name}.v", testbench(spec))
        print(f"wrote {out / (spec.name + '.v')} and its testbench tb_{spec.name}.v")
        print("ports: " + ", ".join(f"{d} {n}[{w}]" for d, n, w in spec.ports()))
        print(f"output value = (-1)^s (1 + f/2^{spec.out_frac_bits}) 2^(e - {spec.out_bias}); flags nan > inf > zero")
        did = True
    if args.verify:
        from lmul.hw.verify import verify, verify_mac

        t0 = time.perf_counter()
        report = (verify_mac if args.mac else verify)(spec, n=args.n, seed=args.seed)
        print(f"{report}  ({time.perf_counter() - t0:.1f} s)")
        did = True
        if not report.ok:
            return 1
    if args.synth and args.mac:
        from lmul.hw.mac import MacSpec, mac_verilog
        from lmul.hw.synth import PAPER_WEIGHT, gate_counts

        lane = MacSpec(spec)
        cells, depth = gate_counts(mac_verilog(lane), lane.name)
        gates = sum(PAPER_WEIGHT[k] * v for k, v in cells.items())
        print(f"{lane.name}: {sum(cells.values())} cells {cells}, paper gates {gates}, depth {depth}")
        did = True
    elif args.synth:
        from lmul.hw.synth import synthesize

        r = synthesize(spec)
        print(f"{spec.name}: {r.total_cells} cells {r.cells}, paper gates {r.paper_gates}, "
              f"NAND2+NOT {r.nand_cells}, depth {r.depth}, area {r.area_um2:.1f} um^2")
        did = True
    if not did:
        if args.mac:
            from lmul.hw.mac import MacSpec, mac_verilog

            sys.stdout.write(mac_verilog(MacSpec(spec)))
        else:
            sys.stdout.write(verilog(spec))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rtl", help="Verilog for an L-Mul unit or an FP multiplier; simulate, synthesise",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=None, metavar="NAME",
                   help="the multiply as every command names it (lmul.LMulSpec: e4m3-bit, bf16-bit-c0.0, "
                        "e5m2-exact, a preset such as lmul): bit -> the L-Mul unit, exact -> the multiplier; "
                        "replaces --fmt/--unit/--offset")
    p.add_argument("--fmt", default="e4m3", help="operand format: e4m3, e5m2, bf16, fp16, fp32 or eXmY")
    p.add_argument("--unit", default="lmul", choices=UNITS, help="L-Mul unit or IEEE-style multiplier")
    p.add_argument("--offset", type=float, default=None, help="lmul: override c = 2^-l(m) (as lmul.mul)")
    p.add_argument("--rounding", default="exact", choices=("exact", "rne"),
                   help="fpmul: keep all 2m+1 fraction bits (exact) or round to m bits (rne)")
    p.add_argument("--flush-subnormals", action="store_true",
                   help="fpmul: flush subnormal operands to zero like L-Mul (default: real values)")
    p.add_argument("--out", default=None, help="write <module>.v and its testbench into this folder")
    p.add_argument("--verify", action="store_true",
                   help="simulate with Icarus Verilog against the oracle: every pair for <= 8-bit formats, "
                        "else --n random pairs")
    p.add_argument("--n", type=int_arg(1, 10_000_000), default=1_000_000,
                   help="random pairs for --verify of wider formats (<= 10_000_000)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random pairs")
    p.add_argument("--mac", action="store_true",
                   help="the MAC lane around the unit (out = acc + product in float32) for --out/--verify/--synth")
    p.add_argument("--synth", action="store_true", help="synthesise with Yosys and print gate counts")
    p.add_argument("--synth-table", metavar="FILE", default=None,
                   help="synthesise every unit of the table's formats and write the Markdown table to FILE")
    p.set_defaults(func=run)
