"""formats.py against independent oracles: torch's casts (bit for bit, spec §1) and a
nearest-value search over every encoding of small formats (tests/oracle.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmul import BF16, E4M3, E5M2, FP16, FP32, Format, quantize
from tests.oracle import SmallFormat

TORCH_PAIRS = [  # (format, torch dtype, overflow mode that torch's cast implements)
    ("bf16", torch.bfloat16, "ieee"),
    ("fp16", torch.float16, "ieee"),
    ("e5m2", torch.float8_e5m2, "ieee"),
    ("e4m3", torch.float8_e4m3fn, "saturate"),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of float32 tensors, any NaN equal to any NaN."""
    a, b = a.float(), b.float()
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int32)[~nan], b.view(torch.int32)[~nan]))


def random_float32(n: int, seed: int) -> torch.Tensor:
    """Uniformly random float32 bit patterns: every exponent, subnormals, inf, NaN, -0."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)


def neighbourhood(values: torch.Tensor) -> torch.Tensor:
    """Each float32 value, its midpoints with the next value, and +-1 float32 ulp around them."""
    v = values[torch.isfinite(values)].double().unique()
    mids = ((v[1:] + v[:-1]) / 2).float()
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(np.inf)), torch.nextafter(mids, torch.tensor(-np.inf))])
    return torch.cat([values.float(), near, -near])


@pytest.mark.parametrize("name,dtype,overflow", TORCH_PAIRS)
def test_quantize_equals_torch_cast_random_bits(name, dtype, overflow):
    x = random_float32(1 << 20, seed=1)
    assert same_bits(quantize(x, name, "rne", overflow), x.to(dtype).float())


def all_bf16() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


def all_fp16() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def all_fp8(dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


@pytest.mark.parametrize("name,dtype,overflow", TORCH_PAIRS)
def test_quantize_equals_torch_cast_every_value_and_midpoint(name, dtype, overflow):
    values = {"bf16": all_bf16, "fp16": all_fp16}.get(name, lambda: all_fp8(dtype))()
    x = neighbourhood(values)
    edges = torch.tensor([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 2**-126, 2**-149])
    x = torch.cat([x, edges, x * 2**-20, x * 2**20])
    assert same_bits(quantize(x, name, "rne", overflow), x.to(dtype).float())


@given(st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_quantize_torch_cast_property(v):
    x = torch.tensor([v], dtype=torch.float32)
    for name, dtype, overflow in TORCH_PAIRS:
        assert same_bits(quantize(x, name, "rne", overflow), x.to(dtype).float()), (name, v)


def test_fp32_is_identity_and_float64_rounds_once():
    x = random_float32(1 << 16, seed=2)
    assert same_bits(quantize(x, "fp32", overflow="ieee"), x)
    # a float64 just above a bf16 tie must round up, not to even via a float32 double rounding
    tie = 1.0 + 2.0**-8  # midpoint of 1 and 1 + 2^-7
    x64 = torch.tensor([tie + 2.0**-40, tie - 2.0**-40, tie], dtype=torch.float64)
    assert quantize(x64, "bf16").tolist() == [1.0 + 2.0**-7, 1.0, 1.0]


SMALL = [(e, m, fo) for e in range(1, 9) for m in range(0, 9 - e) for fo in (False, True) if not (fo and m == 0)]


@pytest.mark.parametrize("e,m,finite_only", SMALL)
@pytest.mark.parametrize("rounding", ["rne", "trunc"])
@pytest.mark.parametrize("overflow", ["saturate", "ieee"])
def test_quantize_small_formats_vs_nearest_value_search(e, m, finite_only, rounding, overflow):
    oracle = SmallFormat(e, m, finite_only)
    fmt = Format(e, m, finite_only)
    vals = torch.from_numpy(oracle.all_values()).float()
    g = torch.Generator().manual_seed(e * 100 + m)
    x = torch.cat([neighbourhood(vals), torch.randn(4096, generator=g) * oracle.max, random_float32(4096, e * 100 + m)])
    got = quantize(x, fmt, rounding, overflow)
    want = torch.from_numpy(oracle.quantize(x.double().numpy(), rounding, overflow)).float()
    assert same_bits(got, want)
    assert fmt.max == oracle.max


@pytest.mark.parametrize("e,m,finite_only", SMALL)
def test_compiled_quantizer_small_formats_vs_nearest_value_search(e, m, finite_only):
    """The C++ quantizer (lmul.quantize's path for large float32 CPU tensors; saturating) on every
    value, tie and neighbour of every format with E + m <= 8: for m = 0 it rounded every tie up (issue 24)."""
    from lmul.kernels import cpu_ext

    try:
        cpu_ext.load()
    except RuntimeError as err:
        pytest.skip(str(err))
    oracle = SmallFormat(e, m, finite_only)
    fmt = Format(e, m, finite_only)
    vals = torch.from_numpy(oracle.all_values()).float()
    x = torch.cat([neighbourhood(vals), random_float32(4096, e * 100 + m)])
    for rounding in ("rne", "trunc"):
        want = torch.from_numpy(oracle.quantize(x.double().numpy(), rounding, "saturate")).float()
        assert same_bits(cpu_ext.quantize_cpu(x, fmt, rounding), want), rounding


@pytest.mark.parametrize("e,m,finite_only", SMALL)
def test_every_value_is_a_fixed_point(e, m, finite_only):
    vals = torch.from_numpy(SmallFormat(e, m, finite_only).all_values()).float()
    assert same_bits(quantize(vals, Format(e, m, finite_only), overflow="ieee"), vals)


def test_named_format_facts_match_torch_finfo():
    for fmt, dtype in [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2), (BF16, torch.bfloat16),
                       (FP16, torch.float16), (FP32, torch.float32)]:
        info = torch.finfo(dtype)
        assert fmt.max == info.max
        assert fmt.min_normal == info.tiny
        assert fmt.torch_dtype() == dtype
        assert Format.parse(dtype) == fmt
    assert (E4M3.max, E5M2.max, FP16.max) == (448.0, 57344.0, 65504.0)
    assert (E4M3.bias, E5M2.bias, BF16.bias) == (7, 15, 127)
    subnormals = [(E4M3, 2.0**-9), (E5M2, 2.0**-16), (BF16, 2.0**-133), (FP16, 2.0**-24), (FP32, 2.0**-149)]
    assert all(fmt.min_subnormal == v for fmt, v in subnormals)


@pytest.mark.parametrize("text,expected", [
    ("e4m3", E4M3), ("E4M3", E4M3), ("float8_e4m3fn", E4M3), ("e5m2", E5M2), ("bf16", BF16),
    ("bfloat16", BF16), ("fp16", FP16), ("fp32", FP32), ("e8m7", BF16), ("e8m3", Format(8, 3)),
    ("e5m6", Format(5, 6)), ("e4m3ieee", Format(4, 3)), ("e3m2fn", Format(3, 2, True)),
])
def test_parse(text, expected):
    assert Format.parse(text) == expected
    assert Format.parse(expected.name) == expected


@pytest.mark.parametrize("bad,match", [
    ("e9m2", "exp_bits"), ("e4m24", "man_bits"), ("e0m3", "exp_bits"), ("int8", "unknown format"),
    ("", "unknown format"), ("e4m0fn", "finite_only"),
])
def test_parse_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        Format.parse(bad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating dtype"):
        quantize(torch.tensor([1, 2]), "bf16")
    with pytest.raises(ValueError, match="rounding"):
        quantize(torch.ones(2), "bf16", rounding="nearest")
    with pytest.raises(ValueError, match="overflow"):
        quantize(torch.ones(2), "bf16", overflow="wrap")
    with pytest.raises(TypeError, match="format"):
        quantize(torch.ones(2), 3)
    with pytest.raises(ValueError, match="torch dtype"):
        Format.parse(torch.float64)


def test_empty_and_shapes():
    assert quantize(torch.empty(0, 3), "e4m3").shape == (0, 3)
    x = torch.randn(4, 5, 6).transpose(0, 2)
    assert same_bits(quantize(x, "bf16", overflow="ieee"), x.to(torch.bfloat16).float())
