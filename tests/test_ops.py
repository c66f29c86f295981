"""ops.mul against the spec's golden values, the paper's Figure 2 PTX formula, and an exhaustive
float64 evaluation of the spec's formulas (tests/oracle.py) for every format with E + m <= 8."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmul import Format, mul, offset_exponent
from lmul.golden import GOLDEN
from tests.oracle import SmallFormat, default_offset, spec_products
from tests.test_formats import same_bits

GOLDEN_CASES = [(x, y, arm, want, note) for x, y, arms, note in GOLDEN for arm, want in arms.items()]  # lmul.golden


@pytest.mark.parametrize("x,y,arm,want,note", GOLDEN_CASES)
def test_golden(x, y, arm, want, note):
    fmt, mode = arm.split("-")
    got = mul(torch.tensor(float(x)), torch.tensor(float(y)), fmt, mode).item()
    if note == "s >= 2 carry, fp32":  # the contract prints 7 significant digits
        assert got == pytest.approx(want, rel=5e-7)
    else:
        assert got == want
    if fmt == "fp32":  # fp32 and bf16 columns are one column in the contract
        assert mul(torch.tensor(float(x)), torch.tensor(float(y)), "bf16", mode).item() == got or note.endswith("fp32")


def test_offset_exponent_rule():
    assert [offset_exponent(m) for m in range(0, 11)] == [0, 1, 2, 3, 3, 4, 4, 4, 4, 4, 4]


def ptx_fp32(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paper Figure 2: (X & 0x7FFFFFFF) + (Y & 0x7FFFFFFF) - 0x3F780000, sign XOR. Also returns
    where the integer result is the encoding of a normal float32 (no wrap-around)."""
    xi = x.view(np.int32).astype(np.int64)
    yi = y.view(np.int32).astype(np.int64)
    mag = (xi & 0x7FFFFFFF) + (yi & 0x7FFFFFFF) - 0x3F780000
    sign = (xi ^ yi) & -0x80000000
    normal_result = (mag >= 0x00800000) & (mag < 0x7F800000)
    return ((mag | sign) & 0xFFFFFFFF).astype(np.uint32).view(np.float32), normal_result


def test_fp32_bit_mode_equals_paper_ptx():
    rng = np.random.default_rng(0)
    n = 1 << 20
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    y = (rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n))).astype(np.float32)
    want, normal_result = ptx_fp32(x, y)
    tiny = np.finfo(np.float32).tiny
    ok = (np.abs(x) >= tiny) & (np.abs(y) >= tiny) & normal_result
    got = mul(torch.from_numpy(x), torch.from_numpy(y), "fp32", "bit").numpy()
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(got[ok].view(np.int32), want[ok].view(np.int32))


@given(st.floats(width=32, allow_nan=False, allow_infinity=False),
       st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_fp32_ptx_property(a, b):
    x, y = np.array([a], np.float32), np.array([b], np.float32)
    want, normal_result = ptx_fp32(x, y)
    tiny = np.finfo(np.float32).tiny
    if min(abs(a), abs(b)) < tiny or not normal_result[0]:
        return
    got = mul(torch.from_numpy(x), torch.from_numpy(y), "fp32", "bit").numpy()
    assert got.view(np.int32)[0] == want.view(np.int32)[0]


@pytest.mark.parametrize("name,dtype,itype,const", [
    ("bf16", torch.bfloat16, np.int16, 0x3F78), ("fp16", torch.float16, np.int16, 0x3BC0),
    ("e4m3", torch.float8_e4m3fn, np.uint8, 55),
])
def test_bit_mode_is_integer_addition_of_encodings(name, dtype, itype, const):
    """Spec §2: the subtracted constant is (bias << m) - c 2^m: 0x3F78, 0x3BC0, 55."""
    fmt = Format.parse(name)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1 << 16, generator=g) * 4).to(dtype)
    y = (torch.randn(1 << 16, generator=g) * 4).to(dtype)
    width = 8 * np.dtype(itype).itemsize
    xi = x.view(torch.uint8 if width == 8 else torch.int16).numpy().view(itype).astype(np.int64)
    yi = y.view(torch.uint8 if width == 8 else torch.int16).numpy().view(itype).astype(np.int64)
    low = (1 << (width - 1)) - 1
    total = (xi & low) + (yi & low) - const  # exponent field may grow beyond E bits
    m = fmt.man_bits
    field, man = total >> m, total & ((1 << m) - 1)
    want = (1 + man / 2**m) * np.exp2(field - fmt.bias) * np.where(((xi ^ yi) >> (width - 1)) & 1, -1, 1)
    xv, yv = x.float(), y.float()
    normal = (xv.abs() >= fmt.min_normal) & (yv.abs() >= fmt.min_normal) & xv.isfinite() & yv.isfinite()
    got = mul(xv, yv, name, "bit")
    np.testing.assert_array_equal(got[normal].numpy(), want[normal.numpy()].astype(np.float32))


SMALL = [(e, m, fo) for e in range(1, 9) for m in range(0, 9 - e) for fo in (False, True) if not (fo and m == 0)]


@pytest.mark.parametrize("mode", ["bit", "formula", "exact"])
@pytest.mark.parametrize("e,m,finite_only", SMALL)
def test_exhaustive_small_formats(e, m, finite_only, mode):
    oracle = SmallFormat(e, m, finite_only)
    vals = oracle.all_values()
    x, y = np.meshgrid(vals, vals, indexing="ij")
    c = default_offset(m)
    want = spec_products(x.ravel(), y.ravel(), e, m, mode, c)
    got = mul(torch.from_numpy(x.ravel()).float(), torch.from_numpy(y.ravel()).float(), Format(e, m, finite_only), mode)
    assert same_bits(got, torch.from_numpy(want))


@pytest.mark.parametrize("offset", [0.0, 0.25, 0.5, 0.875])
@pytest.mark.parametrize("mode", ["bit", "formula"])
def test_exhaustive_offsets_e4m3(offset, mode):
    vals = SmallFormat(4, 3, True).all_values()
    x, y = np.meshgrid(vals, vals, indexing="ij")
    want = spec_products(x.ravel(), y.ravel(), 4, 3, mode, offset)
    got = mul(torch.from_numpy(x.ravel()).float(), torch.from_numpy(y.ravel()).float(), "e4m3", mode, offset=offset)
    assert same_bits(got, torch.from_numpy(want))


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32", "e5m6", "e8m3"])
@pytest.mark.parametrize("mode", ["bit", "formula", "exact"])
@pytest.mark.parametrize("rounding", ["rne", "trunc"])
def test_random_wide_formats_vs_oracle(fmt, mode, rounding):
    f = Format.parse(fmt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 16, generator=g) * torch.exp2(torch.randint(-30, 30, (1 << 16,), generator=g).float())
    y = torch.randn(1 << 16, generator=g)
    from lmul import quantize  # operands in the format; the oracle checks the product rule

    xq, yq = quantize(x, f, rounding), quantize(y, f, rounding)
    want = spec_products(xq.double().numpy(), yq.double().numpy(), f.exp_bits, f.man_bits, mode,
                         default_offset(f.man_bits))
    assert same_bits(mul(x, y, f, mode, rounding=rounding), torch.from_numpy(want))


@given(st.floats(width=32), st.floats(width=32), st.sampled_from(["bf16", "e4m3", "e5m2", "fp16", "e8m3"]),
       st.sampled_from(["bit", "formula", "exact"]))
def test_property_symmetry(a, b, fmt, mode):
    x, y = torch.tensor([a]), torch.tensor([b])
    p = mul(x, y, fmt, mode)
    assert same_bits(p, mul(y, x, fmt, mode))          # commutative
    assert same_bits(mul(-x, y, fmt, mode), -p)        # sign is the XOR of the signs


def test_special_values():
    inf, nan = math.inf, math.nan
    x = torch.tensor([inf, inf, -inf, nan, 0.0, -0.0, 1e-40, inf, 2.0])
    y = torch.tensor([2.0, 0.0, 3.0, 1.0, 5.0, 5.0, 3.0, 1e-40, -1e-40])
    got = mul(x, y, "bf16", "bit")
    want = torch.tensor([inf, nan, -inf, nan, 0.0, -0.0, 0.0, nan, -0.0])
    assert same_bits(got, want)
    # exact mode keeps subnormals as values
    assert mul(torch.tensor([2.0**-130]), torch.tensor([2.0**10]), "bf16", "exact").item() == 2.0**-120


def test_overflow_and_underflow_of_the_product():
    assert mul(torch.tensor([2.0**100]), torch.tensor([2.0**100]), "bf16", "bit").item() == math.inf
    assert mul(torch.tensor([2.0**-100]), torch.tensor([2.0**-100]), "bf16", "bit").item() == 0.0
    # rounded once into float32's subnormal range: 2^-140 * 1.0625 -> 2^-140 + 2^-144
    assert mul(torch.tensor([2.0**-70]), torch.tensor([2.0**-70]), "bf16", "bit").item() == 2.0**-140 * 1.0625


def test_errors():
    one = torch.ones(3)
    with pytest.raises(TypeError, match="floating dtype"):
        mul(torch.ones(3, dtype=torch.int32), one)
    with pytest.raises(ValueError, match="unknown format"):
        mul(one, one, "fp8")
    with pytest.raises(ValueError, match="multiple of 2\\^-3"):
        mul(one, one, "e4m3", "bit", offset=0.1)
    mul(one, one, "e4m3", "formula", offset=0.1)  # any offset is fine in formula mode
    with pytest.raises(ValueError, match="0 <= offset <= 1"):
        mul(one, one, offset=-0.5)
    with pytest.raises(ValueError, match="0 <= offset <= 1"):
        mul(one, one, offset=math.nan)
    with pytest.raises(ValueError, match="0 <= offset <= 1"):
        mul(one, one, offset=1.0 + 2.0**-7)
    with pytest.raises(ValueError, match="mode"):
        mul(one, one, mode="approx")
    with pytest.raises(ValueError, match="do not broadcast"):
        mul(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="different devices"):
        mul(torch.ones(3), torch.ones(3, device="meta"))


def test_empty_broadcast_and_dtypes():
    assert mul(torch.empty(0), torch.ones(1)).shape == (0,)
    out = mul(torch.ones(2, 1, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16) * 3)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert torch.all(out == 3.125)  # 1 x 1.5*2^1: (1 + 0.5 + 0.0625) * 2
    assert mul(torch.tensor([3.0], dtype=torch.float64), torch.tensor([4.0]), "fp32").item() == 12.5
