"""lmul.hw: the generated units' interface, their bit-exactness in Icarus Verilog against
lmul.mul / lmul.quantize / torch casts, and Yosys gate counts.

Simulation tests skip only when Icarus Verilog is missing (`make hw-deps` installs it);
synthesis tests only when Yosys is missing. Exhaustive: every operand pair of e4m3 and e5m2
(and of small eXmY formats); random: 10^5 pairs for bf16/fp16 (10^6 with `make hw-verify`).
"""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import lmul.golden
from lmul import mul, quantize
from lmul.formats import Format
from lmul.hw.rtl import UnitSpec, verilog
from lmul.hw.sim import all_pairs, decode_operand, have_iverilog, random_pairs, simulate
from lmul.hw.synth import have_yosys, synthesize

needs_iverilog = pytest.mark.skipif(
    not have_iverilog(), reason="Icarus Verilog (iverilog) not installed: run `make hw-deps` to simulate the RTL")
needs_yosys = pytest.mark.skipif(not have_yosys(), reason="yosys not installed: run `make hw-deps` to synthesise")

ROOT = Path(__file__).resolve().parents[1]
TORCH_VIEW = {"e4m3": (torch.uint8, torch.float8_e4m3fn), "e5m2": (torch.uint8, torch.float8_e5m2),
              "bf16": (torch.int16, torch.bfloat16), "fp16": (torch.int16, torch.float16)}


def torch_decode(codes: np.ndarray, fmt: str) -> torch.Tensor:
    """Operand values from torch's own dtype views (independent of lmul.hw's decoder)."""
    itype, dtype = TORCH_VIEW[fmt]
    raw = torch.from_numpy(codes.astype(np.int64)).to(torch.int32)
    if itype == torch.int16:
        raw = torch.where(raw >= 1 << 15, raw - (1 << 16), raw)
    return raw.to(itype).view(dtype).float()


def same_bits(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Equal as int32 views, or both NaN (the spec leaves a NaN's sign/payload open)."""
    return (got.view(torch.int32) == ref.view(torch.int32)) | (torch.isnan(got) & torch.isnan(ref))


def rtl_float32(spec: UnitSpec, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(simulate(spec, a, b).values()).float()


# --- interface ---------------------------------------------------------------------------------
# (fmt, unit, options, module name, operand width, e width, f width, output bias) — derived by hand:
# lmul: e = ea + eb + q in E+1 bits, bias 2 bias; fpmul exact: e = xa + xb + 2m - lz, bias 2 bias + 2m - 1,
# f = 2m + 1 bits; fpmul rne ftz: e = ea + eb + hi + round carry, bias 2 bias, f = m bits.
INTERFACE = [
    ("e4m3", "lmul", {}, "lmul_e4m3", 8, 5, 3, 14),
    ("e5m2", "lmul", {}, "lmul_e5m2", 8, 6, 2, 30),
    ("bf16", "lmul", {}, "lmul_bf16", 16, 9, 7, 254),
    ("fp16", "lmul", {}, "lmul_fp16", 16, 6, 10, 30),
    ("fp32", "lmul", {}, "lmul_fp32", 32, 9, 23, 254),
    ("e4m3", "lmul", {"offset": 0.0}, "lmul_e4m3_c0", 8, 5, 3, 14),
    ("e4m3", "fpmul", {}, "fpmul_e4m3_exact", 8, 6, 7, 19),
    ("e5m2", "fpmul", {}, "fpmul_e5m2_exact", 8, 7, 5, 33),
    ("bf16", "fpmul", {}, "fpmul_bf16_exact", 16, 10, 15, 267),
    ("fp16", "fpmul", {}, "fpmul_fp16_exact", 16, 7, 21, 49),
    ("e4m3", "fpmul", {"rounding": "rne", "subnormals": False}, "fpmul_e4m3_rne_ftz", 8, 6, 3, 14),
    ("fp32", "fpmul", {"rounding": "rne", "subnormals": False}, "fpmul_fp32_rne_ftz", 32, 9, 23, 254),
]


@pytest.mark.parametrize("fmt,unit,opts,name,n,ew,fw,bias", INTERFACE)
def test_interface_pinned(fmt, unit, opts, name, n, ew, fw, bias):
    spec = UnitSpec.make(fmt, unit, **opts)
    text = verilog(spec)
    assert spec.name == name
    assert re.search(rf"^module {name} \(", text, re.M)
    ports = re.findall(r"^\s+(input|output)\s+wire\s+(?:\[(\d+):0\]\s+)?(\w+)", text, re.M)
    got = [(d, p, int(hi) + 1 if hi else 1) for d, hi, p in ports]
    assert got == [("input", "a", n), ("input", "b", n), ("output", "s", 1), ("output", "zero", 1),
                   ("output", "inf", 1), ("output", "nan", 1), ("output", "e", ew), ("output", "f", fw)]
    assert f"localparam OUT_EXP_BITS = {ew};" in text
    assert f"localparam OUT_FRAC_BITS = {fw};" in text
    assert f"localparam OUT_BIAS = {bias};" in text


def test_lmul_unit_is_one_adder_with_offset_folded_in():
    # e4m3: C = c 2^m = 2^-3 2^3 = 1; bf16: C = 2^-4 2^7 = 8 (SPEC §2's 0x3F78 = (127 << 7) - 8)
    assert "wire [7:0] r = a[N-2:0] + b[N-2:0] + 8'd1;" in verilog(UnitSpec.make("e4m3"))
    assert "wire [15:0] r = a[N-2:0] + b[N-2:0] + 16'd8;" in verilog(UnitSpec.make("bf16"))
    assert "*" not in verilog(UnitSpec.make("bf16")).split("module")[1].split("//")[0]


@pytest.mark.parametrize("bad,match", [
    (dict(fmt="e4m3", unit="lmul", rounding="rne"), "fpmul options"),
    (dict(fmt="e4m3", unit="fpmul", offset=0.25), "lmul unit only"),
    (dict(fmt="e5m0", unit="lmul"), "man_bits >= 1"),
    (dict(fmt="e4m3", unit="adder"), "unit must be"),
    (dict(fmt="e4m3", unit="lmul", offset=0.3), "not a multiple"),
    (dict(fmt="e4m3", unit="fpmul", rounding="rtz"), "rounding must be"),
])
def test_bad_specs_raise(bad, match):
    fmt, unit = bad.pop("fmt"), bad.pop("unit")
    with pytest.raises(ValueError, match=match):
        UnitSpec.make(fmt, unit, **bad)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "bf16", "fp16"])
def test_operand_decoder_matches_torch(fmt):
    f = Format.parse(fmt)
    codes = np.arange(1 << f.bits)
    ref = torch_decode(codes, fmt).double().numpy()
    got = decode_operand(codes, f)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.int64), ref[~nan].view(np.int64))  # bit for bit, signed zeros too


# --- simulation: bit-exact against lmul.mul ----------------------------------------------------
@needs_iverilog
@pytest.mark.parametrize("unit,mode", [("lmul", "bit"), ("fpmul", "exact")])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_exhaustive_8bit_vs_lmul_mul(fmt, unit, mode):
    spec = UnitSpec.make(fmt, unit)
    a, b = all_pairs(spec.fmt)
    assert a.size == 65536
    x, y = torch_decode(a, fmt), torch_decode(b, fmt)
    ref = mul(x, y, fmt, mode)
    got = rtl_float32(spec, a, b)
    bad = ~same_bits(got, ref)
    assert not bad.any(), f"{int(bad.sum())} mismatches, first: x={x[bad][:3]} y={y[bad][:3]} rtl={got[bad][:3]} " \
                          f"ref={ref[bad][:3]}"
    # every class occurs: normal products, flushed/real zeros, NaN (and inf for e5m2)
    assert torch.isnan(ref).any() and (ref == 0).any() and (ref.abs() > 100).any()


@needs_iverilog
@pytest.mark.parametrize("unit,mode", [("lmul", "bit"), ("fpmul", "exact")])
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_random_16bit_vs_lmul_mul(fmt, unit, mode):
    spec = UnitSpec.make(fmt, unit)
    a, b = random_pairs(spec.fmt, 100_000, seed=9)
    x, y = torch_decode(a, fmt), torch_decode(b, fmt)
    ref = mul(x, y, fmt, mode)
    got = rtl_float32(spec, a, b)
    assert same_bits(got, ref).all(), f"{int((~same_bits(got, ref)).sum())} mismatches"


@needs_iverilog
@pytest.mark.parametrize("fmt", ["e2m1", "e3m2", "e3m4", "e6m1"])
def test_exhaustive_small_formats_vs_lmul_mul(fmt):
    # e3m4: m = 4, C = 2, so S = ma + mb + C reaches 2 2^m (the q = 2 carry of SPEC §2)
    f = Format.parse(fmt)
    a, b = all_pairs(f)
    x = torch.from_numpy(decode_operand(a, f)).float()
    y = torch.from_numpy(decode_operand(b, f)).float()
    for unit, mode in [("lmul", "bit"), ("fpmul", "exact")]:
        got = rtl_float32(UnitSpec.make(f, unit), a, b)
        assert same_bits(got, mul(x, y, f, mode)).all(), f"{unit} {fmt}"


@needs_iverilog
def test_offset_override_and_sensitivity():
    # offset=0 (Mitchell) unit equals lmul.mul(offset=0) and differs from the default-offset oracle
    spec = UnitSpec.make("e4m3", "lmul", offset=0.0)
    a, b = all_pairs(spec.fmt)
    x, y = torch_decode(a, "e4m3"), torch_decode(b, "e4m3")
    got = rtl_float32(spec, a, b)
    assert same_bits(got, mul(x, y, "e4m3", "bit", offset=0.0)).all()
    assert (~same_bits(got, mul(x, y, "e4m3", "bit"))).sum() > 10_000


# SPEC §3 golden values, e4m3 / e5m2 / bf16 bit mode (lmul.golden: x, y, e4m3, e5m2, bf16, note)
GOLDEN = [(x, y, *(want.get(f"{f}-bit", want.get("fp32-bit") if f == "bf16" else None)
                   for f in ("e4m3", "e5m2", "bf16")), note)
          for x, y, want, note in lmul.golden.GOLDEN if note != "s >= 2 carry, fp32"]


@needs_iverilog
@pytest.mark.parametrize("col,fmt", [(2, "e4m3"), (3, "e5m2"), (4, "bf16")])
def test_golden_values_in_rtl(col, fmt):
    rows = [r for r in GOLDEN if r[col] is not None]
    itype, dtype = TORCH_VIEW[fmt]
    bits = Format.parse(fmt).bits

    def encode(values):  # operand encodings from torch's cast
        return torch.tensor(values).to(dtype).view(itype).to(torch.int64).numpy() % (1 << bits)

    a, b = encode([r[0] for r in rows]), encode([r[1] for r in rows])
    got = simulate(UnitSpec.make(fmt, "lmul"), a, b).values()
    assert got.tolist() == [r[col] for r in rows]


@needs_iverilog
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding,subnormals", [("rne", False), ("rne", True), ("exact", False)])
def test_multiplier_variants_vs_quantize(fmt, rounding, subnormals):
    # oracle: float32 product (exact for 8-bit operands), rounded by lmul.quantize to m bits in a wide
    # exponent (e8m<m>: every such product is normal there); flushed variants zero subnormal operands
    f = Format.parse(fmt)
    spec = UnitSpec.make(fmt, "fpmul", rounding=rounding, subnormals=subnormals)
    a, b = all_pairs(f)
    x, y = torch_decode(a, fmt), torch_decode(b, fmt)
    if not subnormals:
        x = torch.where(x.abs() < f.min_normal, x * 0, x)
        y = torch.where(y.abs() < f.min_normal, y * 0, y)
    ref = x * y
    if rounding == "rne":
        ref = quantize(ref, Format(8, f.man_bits), "rne", overflow="ieee")
    got = rtl_float32(spec, a, b)
    assert same_bits(got, ref).all(), f"{int((~same_bits(got, ref)).sum())} mismatches"
    if rounding == "rne":  # rounding really happened
        assert not torch.equal(ref[torch.isfinite(ref)], (x * y)[torch.isfinite(ref)])


@needs_iverilog
def test_generated_verilog_compiles_without_warnings(tmp_path):
    for spec in [UnitSpec.make("e4m3"), UnitSpec.make("fp32", "fpmul"),
                 UnitSpec.make("bf16", "fpmul", rounding="rne", subnormals=False)]:
        src = tmp_path / f"{spec.name}.v"
        src.write_text(verilog(spec))
        proc = subprocess.run(["iverilog", "-g2005", "-Wall", "-o", str(tmp_path / "x.vvp"), str(src)],
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# --- MAC lane: product unit + IEEE binary32 adder ------------------------------------------------
def f32(bits: np.ndarray) -> torch.Tensor:
    u32 = (np.asarray(bits, np.int64) & 0xFFFFFFFF).astype(np.uint32)
    return torch.from_numpy(u32.view(np.int32)).view(torch.float32)


@needs_iverilog
def test_fadd_f32_vs_torch_add():
    from lmul.hw.mac import simulate_fadd

    rng = np.random.default_rng(11)
    n = 20_000
    ex = rng.integers(0, 256, n)
    ey = np.clip(ex + rng.integers(-30, 31, n), 0, 255)               # mostly close exponents
    ey = np.where(rng.random(n) < 0.2, rng.integers(0, 256, n), ey)  # some far apart
    ex, ey = np.where(rng.random(n) < 0.05, 0, ex), np.where(rng.random(n) < 0.05, 0, ey)  # subnormals

    def pattern(field):
        return (rng.integers(0, 2, n) << 31) | (field << 23) | rng.integers(0, 1 << 23, n)

    x, y = pattern(ex), pattern(ey)
    y = np.where(rng.random(n) < 0.1, x ^ (1 << 31), y)                                   # x + (-x)
    y = np.where(rng.random(n) < 0.1, ((x ^ (1 << 31)) + rng.integers(-2, 3, n)) & 0xFFFFFFFF, y)
    ref = f32(x) + f32(y)
    got = f32(simulate_fadd(x, y).astype(np.int64))
    assert same_bits(got, ref).all(), f"{int((~same_bits(got, ref)).sum())} mismatches"
    tiny = (ref != 0) & (ref.abs() < 2.0**-126)
    assert (ref == 0).sum() > 1000 and tiny.sum() > 50 and torch.isinf(ref).any() and torch.isnan(ref).any()


@needs_iverilog
@pytest.mark.parametrize("fmt,unit,mode", [("e4m3", "lmul", "bit"), ("e5m2", "fpmul", "exact"),
                                           ("fp16", "lmul", "bit"), ("fp16", "fpmul", "exact")])
def test_mac_lane_vs_lmul_mul(fmt, unit, mode):
    from lmul.hw.mac import MacSpec, accumulator_mix, simulate_mac

    lane = MacSpec(UnitSpec.make(fmt, unit))
    a, b = random_pairs(lane.unit.fmt, 10_000, seed=4)
    p = mul(torch_decode(a, fmt), torch_decode(b, fmt), fmt, mode)
    acc = accumulator_mix(p.numpy(), seed=4)
    ref = f32(acc) + p                                   # one float32 rounding, as an fp32 accumulator
    got = f32(simulate_mac(lane, a, b, acc).astype(np.int64))
    assert same_bits(got, ref).all(), f"{int((~same_bits(got, ref)).sum())} mismatches"
    assert (ref == 0).sum() > 500  # exact cancellations happened


def test_mac_lane_needs_float32_normal_products():
    from lmul.hw.mac import MacSpec

    with pytest.raises(ValueError, match="float32 normals"):
        MacSpec(UnitSpec.make("bf16", "lmul"))
    assert MacSpec(UnitSpec.make("e4m3", "lmul")).product_exponent_range() == (-12, 17)  # 2^-6 2^-6 .. 448 448
    assert MacSpec(UnitSpec.make("fp16", "fpmul")).product_exponent_range() == (-48, 31)


# --- synthesis ---------------------------------------------------------------------------------
@needs_yosys
def test_synthesis_counts_and_committed_table():
    lm = synthesize(UnitSpec.make("e4m3", "lmul"))
    fp = synthesize(UnitSpec.make("e4m3", "fpmul", rounding="rne", subnormals=False))
    for r in (lm, fp):
        assert set(r.cells) <= {"AND", "NAND", "OR", "NOR", "XOR", "XNOR", "NOT"}
        assert r.total_cells > 20 and r.depth > 3 and r.nand_cells >= r.total_cells
    assert lm.paper_gates < fp.paper_gates
    assert lm.datapath_gates < lm.paper_gates  # the flags cost something


def test_committed_table_lists_every_unit():
    table = (ROOT / "docs" / "hardware_table.md").read_text()
    assert "`mac_lmul_e4m3`" in table and "`fadd_f32`" in table
    for fmt in ("e4m3", "e5m2", "bf16", "fp16", "fp32"):
        assert f"`lmul_{fmt}`" in table and f"`fpmul_{fmt}_rne_ftz`" in table and f"`fpmul_{fmt}_exact`" in table


@needs_yosys
def test_committed_table_reproduces():
    # the committed table was generated by this code: with the same yosys its e4m3 L-Mul row reproduces
    table = (ROOT / "docs" / "hardware_table.md").read_text()
    version = subprocess.run(["yosys", "-V"], capture_output=True, text=True).stdout.strip()
    if version not in table.splitlines()[0]:
        pytest.skip(f"docs/hardware_table.md was made with another yosys than {version!r}: run `make hw-table`")
    lm = synthesize(UnitSpec.make("e4m3", "lmul"))
    row = next(line for line in table.splitlines() if "`lmul_e4m3`" in line).split("|")
    assert [int(row[4]), int(row[5]), int(row[6]), int(row[7])] == [lm.total_cells, lm.paper_gates, lm.nand_cells,
                                                                    lm.depth]


# --- cli ---------------------------------------------------------------------------------------
def test_cli_writes_verilog(tmp_path, capsys):
    from lmul.cli import main

    assert main(["rtl", "--fmt", "e5m2", "--unit", "fpmul", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "fpmul_e5m2_exact.v").read_text() == verilog(UnitSpec.make("e5m2", "fpmul"))
    assert (tmp_path / "tb_fpmul_e5m2_exact.v").exists()
    assert "output e[7]" in capsys.readouterr().out
    assert main(["rtl", "--unit", "lmul", "--rounding", "rne"]) == 2  # a bad invocation: one line, status 2
    assert "fpmul only" in capsys.readouterr().err


def test_unit_from_the_spec_vocabulary():
    assert UnitSpec.from_spec("e4m3-bit") == UnitSpec.make("e4m3", "lmul")
    assert UnitSpec.from_spec("lmul") == UnitSpec.make("bf16", "lmul")
    assert UnitSpec.from_spec("e5m2-bit-c0.0") == UnitSpec.make("e5m2", "lmul", offset=0.0)
    assert UnitSpec.from_spec("e5m2") == UnitSpec.make("e5m2", "fpmul", rounding="exact")
    for bad in ("e4m3-formula", "e4m3-bit-acce4m3"):
        with pytest.raises(ValueError, match=bad):
            UnitSpec.from_spec(bad)
