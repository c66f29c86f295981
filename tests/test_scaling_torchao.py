"""lmul.scaling's quantization against torchao's own (test-only extra ``torchao``; checked with 0.18.0).

* float8 training recipes (``torchao.float8``): ``hp_tensor_to_float8_dynamic`` with
  ``round_scales_to_power_of_2=True``, tensorwise and axiswise (rowwise) along K, e4m3 and e5m2;
* MX (``torchao.prototype.mx_formats.to_mx``, FLOOR scale mode, blocks of 32 along the last dim):
  e4m3, e5m2 and fp4 e2m1.

Where the rules coincide the elements and scales are equal bit for bit. Where they differ, the test
checks that the difference is exactly the documented one (docs/semantics.md section 7):

1. an all-zero group: lmul stores ``X = 1``; torchao stores ``1 / r`` with ``r = max / 1e-12`` rounded
   down (float8: e4m3 ``2^-48``, e5m2 ``2^-55``) or ``2^-127`` (MX's E8M0 zero); every element is 0 either way;
2. float8: torchao rounds its multiplier ``r`` down with float32 ``torch.log2``, which can round an
   ``r`` just below ``2^k`` up to ``k``; there its scale is half of lmul's and the group's maximum saturates;
3. MX groups whose scale is ``2^-127`` (``amax < 2^(emax_elem - 126)``): torchao divides by ``2^-126``
   (its float32 minimum-normal clamp) but stores ``2^-127``, so its elements are half of lmul's
   (and its own dequantized values half of the input);
4. an MX block holding NaN: both store a NaN scale; lmul's elements are all NaN, torchao's are the
   block divided by its float32 scale (E8M0 0xFF read as +inf): ±0 except the NaN itself.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

torchao = pytest.importorskip("torchao")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_mx

from lmul.scaling import scaled_quantize  # noqa: E402

F8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MX_ELEM = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "fp4": torch.float4_e2m1fn_x2}
EMAX = {"e4m3": 8, "e5m2": 15, "fp4": 2}  # OCP MX v1.0: exponent of the element format's largest normal
SEEDS = range(12)


def operand(seed: int, rows: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random rows of wildly different magnitude (2^-140 .. 2^100 incl. float32 subnormals), with
    zero rows, zero runs, isolated huge values and exact powers of two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    mag = torch.randint(-140, 100, (rows, 1), generator=g).double()
    x = x * torch.exp2(mag + torch.randint(-6, 7, (rows, k), generator=g).double())
    x[0] = 0.0
    if k > 40:
        x[1, 3:37] = 0.0
    x[-1, k // 2] = 2.0 ** float(mag[-1, 0] + 9)
    x[rows // 2, 0] = -(2.0 ** float(mag[rows // 2, 0]))
    return x.to(dtype)


def float8_torchao(x: torch.Tensor, fmt: str, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's float8 data (as float32) and its scale as lmul's ``X`` (``1 / scale``)."""
    kw = dict(scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1) if scaling == "row" else {}
    t = hp_tensor_to_float8_dynamic(x, F8[fmt], LinearMMConfig(), round_scales_to_power_of_2=True, **kw)
    return t._data.float(), (1.0 / t._scale.double()).float()


def mx_torchao(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's MX elements (float32) and E8M0 scales (float32), blocks of 32 along the last dim."""
    scale, data = to_mx(x.contiguous(), MX_ELEM[fmt], 32)
    elems = f4_unpacked_to_f32(unpack_uint4(data)) if fmt == "fp4" else data.float()
    return elems, scale.float()


def _amax_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    k = x.shape[-1]
    pad = torch.nn.functional.pad(x.double().abs(), (0, -k % size))
    return pad.reshape(*x.shape[:-1], -1, size).amax(-1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


# -------------------------------------------------------------------------------- float8 recipes

@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scaling", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_float8_recipes_equal_torchao(fmt, scaling, dtype, seed):
    k = [1, 7, 32, 100, 129, 256][seed % 6]  # ragged K: a row is one group of any length
    x = operand(seed, 9, k, dtype)
    if scaling == "tensor":
        x = x[1:2] if seed % 2 else x * 0 + x[-1:]  # a nonzero tensor (the tensor's one amax)
    data, x_ao = float8_torchao(x, fmt, scaling)
    q, x_lm = scaled_quantize(x, fmt, scaling, "a")
    x_lm = x_lm.reshape(x_ao.shape)
    amax = x.double().abs().amax(-1, keepdim=True) if scaling == "row" else x.double().abs().amax()
    zero = (amax == 0).expand_as(x_ao)
    # difference 1: all-zero groups (lmul X = 1, torchao 1 / (max / 1e-12) rounded down: e4m3 2^-48, e5m2 2^-55),
    # elements 0 both ways
    fmax = torch.finfo(F8[fmt]).max
    assert (x_lm[zero] == 1.0).all() and (x_ao[zero] == 2.0 ** -math.floor(math.log2(fmax / 1e-12))).all()
    # difference 2: torchao's float32 log2 rounds the multiplier up to the next power of two
    r32 = (fmax / amax.clamp(min=1e-12)).float()
    up = (torch.floor(torch.log2(r32)) != torch.frexp(r32.double()).exponent - 1).expand_as(x_ao)
    assert same_bits(x_ao[up], x_lm[up] / 2)
    keep = ~zero & ~up
    assert same_bits(x_ao[keep], x_lm[keep])
    rows_ok = keep.expand_as(x) if scaling == "row" else keep.expand_as(x)
    assert same_bits(data[rows_ok], q[rows_ok])
    assert same_bits(data[zero.expand_as(x)], q[zero.expand_as(x)])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_float8_log2_rounding_is_the_only_other_difference(fmt):
    # amax chosen so that torchao's float32 multiplier r is the float32 just below 2^k: its float32 log2
    # may round to k; lmul takes floor(log2 r) = k - 1 exactly. Where torchao rounds up, its scale is half of
    # lmul's and the group's maximum saturates to the format's max; elsewhere the two agree.
    fmax = torch.finfo(F8[fmt]).max
    rows = []
    for k in range(-20, 21):
        target = torch.tensor(2.0**k, dtype=torch.float32).nextafter(torch.tensor(0.0))  # 2^k (1 - 2^-24)
        amax = torch.tensor(fmax / float(target), dtype=torch.float64).float()
        for step in range(-3, 4):  # the float32 amax values around it
            a = amax.clone()
            for _ in range(abs(step)):
                a = a.nextafter(torch.tensor(float("inf") if step > 0 else 0.0))
            row = torch.linspace(-1, 1, 48) * a
            row[5] = a
            rows.append(row)
    x = torch.stack(rows)
    data, x_ao = float8_torchao(x, fmt, "row")
    q, x_lm = scaled_quantize(x, fmt, "row", "a")
    r32 = (fmax / x.double().abs().amax(-1, keepdim=True)).float()
    up = (torch.floor(torch.log2(r32)) != torch.frexp(r32.double()).exponent - 1).flatten()
    assert same_bits(x_ao.flatten()[~up], x_lm.flatten()[~up])
    assert same_bits(data[~up], q[~up])
    assert same_bits(x_ao.flatten()[up], x_lm.flatten()[up] / 2)
    assert (data[up].abs().amax(-1) == fmax).all()  # torchao's maximum saturates there
    assert same_bits(data[up], lmul_quantize_sat(x[up] / (x_lm[up] / 2), fmt))


def lmul_quantize_sat(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """torch's own saturating cast (independent of lmul): clamp to the max, round to nearest even."""
    fmax = torch.finfo(F8[fmt]).max
    return x.clamp(-fmax, fmax).to(F8[fmt]).float()


# -------------------------------------------------------------------------------- MX

@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", SEEDS)
def test_mx_equals_torchao_to_mx(fmt, dtype, seed):
    k = [32, 64, 7, 100, 129, 256][seed % 6]  # ragged K: torchao needs whole blocks, so it gets the zero-padded x
    x = operand(seed, 9, k, dtype)
    padded = torch.nn.functional.pad(x, (0, -k % 32))
    elems, x_ao = mx_torchao(padded, fmt)
    elems = elems[:, :k]
    q, x_lm = scaled_quantize(x, fmt, "mx", "a")
    amax = _amax_rows(x, 32)
    zero = amax == 0
    tiny = (amax > 0) & (amax < 2.0 ** (EMAX[fmt] - 126))  # scale 2^-127
    # difference 1: all-zero blocks store 2^-127 (E8M0 0) in torchao, X = 1 in lmul; elements 0
    assert (x_lm[zero] == 1.0).all() and (x_ao[zero] == 2.0**-127).all()
    assert (x_lm[tiny] == 2.0**-127).all() and (x_ao[tiny] == 2.0**-127).all()
    assert same_bits(x_ao[~zero], x_lm[~zero])
    per = lambda t: t.repeat_interleave(32, dim=-1)[:, :k]  # noqa: E731
    plain = ~per(tiny)
    assert same_bits(elems[plain], q[plain])
    # difference 3: torchao divides those blocks by 2^-126 (its minimum-normal clamp), lmul by the stored 2^-127
    assert torch.equal(elems[~plain], mx_cast(x[~plain].float() * 2.0**126, fmt))
    assert torch.equal(q[~plain], mx_cast(x[~plain].float() * 2.0**127, fmt))


def mx_cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """torch's saturating float8 cast, or fp4 by nearest-value search (ties to the even code)."""
    if fmt != "fp4":
        return lmul_quantize_sat(x, fmt)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    a = x.abs().clamp(max=6.0)[..., None]
    d = (a - grid).abs()
    best = d.min(-1, keepdim=True).values
    cand = (d == best) * (torch.arange(8) % 2 == 0) * 2 + (d == best)  # prefer the even code on ties
    return torch.copysign(grid[cand.argmax(-1)], x)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4"])
def test_mx_right_operand_is_the_transposed_left_operand(fmt):
    # B [K, N] is scaled per column along K: torchao's to_mx of Bᵀ (blocks along its last dim) gives it
    x = operand(3, 96, 5)
    elems, x_ao = mx_torchao(x.t(), fmt)
    q, x_lm = scaled_quantize(x, fmt, "mx", "b")
    tiny = _amax_rows(x.t(), 32) < 2.0 ** (EMAX[fmt] - 126)
    ok = ~tiny.repeat_interleave(32, dim=-1)
    assert same_bits(elems[ok], q.t()[ok])
    assert same_bits(x_ao.t()[~tiny.t()], x_lm[~tiny.t()])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp4"])
def test_mx_nan_block(fmt):
    x = operand(4, 3, 64)
    x[1, 40] = float("nan")
    elems, x_ao = mx_torchao(x, fmt)
    q, x_lm = scaled_quantize(x, fmt, "mx", "a")
    assert torch.isnan(x_ao[1, 1]) and torch.isnan(x_lm[1, 1])
    assert torch.isnan(q[1, 32:]).all()  # lmul: the whole block NaN
    assert same_bits(elems[[0, 1, 2], :32], q[[0, 1, 2], :32]) and same_bits(elems[[0, 2]], q[[0, 2]])
    if fmt != "fp4":  # difference 4: torchao divides the block by +inf: ±0 except the NaN (fp4 has no NaN code)
        assert torch.isnan(elems[1, 40]) and (elems[1, 32:].nan_to_num(1.0) == torch.where(
            torch.arange(32) == 8, 1.0, 0.0)).all()
