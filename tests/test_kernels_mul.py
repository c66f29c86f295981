"""The compiled elementwise L-Mul kernel (``lmul.kernels.cpu_ext.cpu_mul``, the CPU fast path of
:func:`lmul.mul`) against the torch implementation :func:`lmul.ops.products` of
:func:`lmul.formats.quantize`'d operands: bit-identical (int32 views) for every format, mode,
rounding and offset, on random, special and edge values, broadcast and non-contiguous operands."""

from __future__ import annotations

import pytest
import torch

from lmul import kernels, mul
from lmul.formats import Format, _quantize_torch
from lmul.kernels import cpu_ext
from lmul.ops import products
from lmul.spec import LMulSpec, resolve_offset

FORMATS = ["e4m3", "e5m2", "e8m3", "bf16", "fp16", "fp32", "e5m6"]
MODES = ["bit", "formula", "exact"]


def _needs_kernel() -> None:
    try:
        cpu_ext.load()
    except RuntimeError as err:
        pytest.skip(f"no compiled CPU kernels: {err}")


def _oracle(x, y, fmt, mode, offset=None, rounding="rne"):
    f = Format.parse(fmt)
    c = resolve_offset(f, mode, offset)
    xq, yq = (_quantize_torch(v, f, rounding, "saturate") for v in (x, y))  # torch ops, no fast path
    return products(xq, yq, f, mode, c)


def _fast(x, y, fmt, mode, offset=None, rounding="rne"):
    f = Format.parse(fmt)
    out = cpu_ext.cpu_mul(x, y, LMulSpec(f, mode, None if mode == "exact" else offset, rounding))
    assert out is not None
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a.view(torch.int32) != b.view(torch.int32)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} differing elements, first at {diff[0].tolist()}: " \
        f"{a[tuple(diff[0])].item()!r} vs {b[tuple(diff[0])].item()!r}"


def _edge_values(fmt: str) -> torch.Tensor:
    f = Format.parse(fmt)
    vals = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 1.5, 1.75, 1.9999, 3.0, 4.0,
            f.max, -f.max, f.max * 4, 2.0 ** f.emin, 2.0 ** (f.emin - 1), 2.0 ** (f.emin - 3) * 3, 2.0 ** -149,
            1e-30, 1e30, 3.4e38, -3.4e38, 1.2e-38, 65504.0, 448.0, 57344.0, 2.0 ** 127 * 1.99, 2.0 ** -126]
    for e in (-130, -100, -20, -1, 0, 1, 20, 100, 127):
        for frac in (0.0, 0.5, 0.875, 0.9375, 0.99):
            vals.append((1 + frac) * 2.0 ** e)
            vals.append(-(1 + frac) * 2.0 ** e)
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rounding", ["rne", "trunc"])
def test_random_and_edges_bit_identical(fmt, mode, rounding):
    _needs_kernel()
    g = torch.Generator().manual_seed(hash((fmt, mode, rounding)) % 2**31)
    x = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-20, 20, (3000,), generator=g).float())
    y = torch.randn(3000, generator=g) * torch.exp2(torch.randint(-20, 20, (3000,), generator=g).float())
    _same_bits(_fast(x, y, fmt, mode, rounding=rounding), _oracle(x, y, fmt, mode, rounding=rounding))
    e = _edge_values(fmt)
    ex, ey = e[:, None].expand(-1, e.numel()), e[None, :].expand(e.numel(), -1)  # every pair
    _same_bits(_fast(ex, ey, fmt, mode, rounding=rounding), _oracle(ex, ey, fmt, mode, rounding=rounding))


@pytest.mark.parametrize("fmt", ["e4m3", "bf16", "fp32"])
@pytest.mark.parametrize("offset", [0.0, 0.5, 0.875])
def test_offsets_and_carries(fmt, offset):
    """Large offsets make S >= 2^(m+1)-ish sums (carries) common; all mantissa pairs of the format."""
    _needs_kernel()
    m = min(Format.parse(fmt).man_bits, 6)
    man = (1 + torch.arange(2**m, dtype=torch.float32) / 2**m)
    x = man[:, None] * 2.0 ** 3
    y = -man[None, :] * 2.0 ** -5
    for mode in MODES:
        _same_bits(_fast(x, y, fmt, mode, offset), _oracle(x, y, fmt, mode, offset))


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_noncontiguous_dtypes(mode):
    _needs_kernel()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, 5, generator=g).transpose(0, 2)  # [5, 6, 4] non-contiguous
    y = torch.randn(6, 1, generator=g)
    _same_bits(_fast(x, y, "bf16", mode), _oracle(x, y, "bf16", mode))
    xd, yh = torch.randn(3, 7, dtype=torch.float64, generator=g), torch.randn(7, generator=g).half()
    _same_bits(_fast(xd, yh, "e4m3", mode), _oracle(xd, yh, "e4m3", mode))
    yb = torch.randn(3, 1, generator=g).bfloat16()
    _same_bits(_fast(xd[:, ::2], yb, "fp32", mode), _oracle(xd[:, ::2], yb, "fp32", mode))
    z = torch.empty(0, 3)
    assert _fast(z, torch.ones(3), "bf16", mode).shape == (0, 3)


def test_mul_uses_kernel_and_autograd_path():
    """``lmul.mul`` without grad goes through the registered kernel; with grad it keeps the
    autograd path; both give the oracle's bits."""
    _needs_kernel()
    assert kernels.select("mul", x := torch.randn(64, 32), LMulSpec()).name == "cpu"
    y = torch.randn(32)
    _same_bits(mul(x, y, "bf16", "bit"), _oracle(x, y, "bf16", "bit"))
    xg = x.clone().requires_grad_(True)
    out = mul(xg, y, "bf16", "bit")
    assert out.grad_fn is not None
    _same_bits(out.detach(), _oracle(x, y, "bf16", "bit"))
    out.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_fallback_without_kernel(monkeypatch):
    """With the kernel unregistered, ``lmul.mul`` uses the torch ops and gives the same bits."""
    x, y = torch.randn(50), torch.randn(50)
    fast = mul(x, y, "e4m3", "formula")
    monkeypatch.setitem(kernels.AUTO_ORDER, "mul", ("reference",))
    _same_bits(mul(x, y, "e4m3", "formula"), fast)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m4"])
@pytest.mark.parametrize("mode", MODES)
def test_every_operand_pair_bit_identical(fmt, mode):
    """Every pair of values of the 8-bit formats (all 2^16), normal-range shortcut and the paths
    around it: the result exponent crosses float32's normal range only through the scale below."""
    _needs_kernel()
    f = Format.parse(fmt)
    steps = torch.arange(2 ** f.man_bits, dtype=torch.float32) / 2 ** f.man_bits
    mags = torch.cat([steps * 2.0 ** f.emin] + [(1 + steps) * 2.0 ** e for e in range(f.emin, f.emax + 1)])
    vals = _quantize_torch(torch.cat([mags, -mags]), f, "rne", "saturate").unique()  # every finite value
    assert vals.numel() >= 2 ** (f.bits - 1) - 2 ** (f.man_bits + 1), vals.numel()
    for scale in (1.0, 2.0 ** 100, 2.0 ** -110):  # products near 2^127 and 2^-126 as well
        x = (vals * scale)[:, None].expand(-1, vals.numel())
        y = vals[None, :].expand(vals.numel(), -1)
        _same_bits(_fast(x, y, "fp32" if scale != 1.0 else fmt, mode), _oracle(x, y, "fp32" if scale != 1.0 else fmt,
                                                                               mode))
