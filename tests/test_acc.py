"""Reduced-precision accumulation (``acc=<format>``, docs/semantics.md section 4) on every backend.

The order is defined, so results are compared bit for bit (``.view(torch.int32)``; NaN only by
position). Oracle, written from the spec without lmul's matmul or products: the products are
:func:`tests.oracle.spec_products` (NumPy float64 from frexp, rounded once to float32), block sums
are sequential NumPy float32 additions starting from +0, and the running sum is rounded with
torch's own casts where the format has a torch dtype (``float8_e4m3fn`` saturates like
``quantize``; the IEEE casts to e5m2/fp16/bf16 overflow to inf, so a finite sum that casts to inf
is set to ±max: ``quantize`` saturates) and with the table search of ``tests.oracle.SmallFormat``
otherwise. Operands are quantized with :func:`lmul.quantize` (tested against torch's casts in
test_formats.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmul import kernels
from lmul.formats import Format, _quantize_torch, quantize
from lmul.matmul import matmul
from lmul.spec import LMulSpec, resolve_offset
from tests.oracle import SmallFormat, spec_products

FORMATS = ["e4m3", "e5m2", "e8m3", "bf16", "fp16", "fp32", "e5m6"]
MODES = ["bit", "formula", "exact"]
BACKENDS_ACC = ["reference", "cpu", "decompose"]
CASTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "bf16": torch.bfloat16, "fp16": torch.float16}


def round_acc(x: np.ndarray, acc: str) -> np.ndarray:
    """quantize(x, acc) (rne, saturating) of float32 ``x`` by an independent route."""
    fmt = Format.parse(acc)
    if acc in CASTS:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        r = t.to(CASTS[acc]).float()
        if acc != "e4m3":  # IEEE cast: finite overflow -> inf; quantize saturates to ±max
            r = torch.where(torch.isfinite(t) & torch.isinf(r), torch.copysign(torch.tensor(fmt.max), t), r)
        return r.numpy()
    small = SmallFormat(fmt.exp_bits, fmt.man_bits, fmt.finite_only)
    return small.quantize(x.astype(np.float64)).astype(np.float32)


def oracle(a: torch.Tensor, b: torch.Tensor, fmt: str, mode: str, acc: str, block: int,
           offset: float | None = None) -> np.ndarray:
    """[M, K] x [K, N] -> [M, N] per the defined order."""
    f = Format.parse(fmt)
    c = resolve_offset(f, mode, offset)
    aq = quantize(a, f).double().numpy()
    bq = quantize(b, f).double().numpy()
    p = spec_products(aq[:, None, :], bq.T[None, :, :], f.exp_bits, f.man_bits, mode, c)  # [M, N, K] f32
    k = p.shape[-1]
    total = np.zeros(p.shape[:-1], dtype=np.float32)
    with np.errstate(all="ignore"):
        for k0 in range(0, k, block):
            s = np.zeros_like(total)                     # +0
            for kk in range(k0, min(k, k0 + block)):
                s = (s + p[..., kk]).astype(np.float32)  # one float32 addition
            total = round_acc((total + s).astype(np.float32), acc)
    return total


def assert_bits(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    want_t = torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))
    assert got.shape == want_t.shape and got.dtype == torch.float32, (what, got.shape, want_t.shape)
    nan_g, nan_w = torch.isnan(got), torch.isnan(want_t)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN positions differ ({int((nan_g ^ nan_w).sum())})"
    gb = got.masked_fill(nan_g, 0).view(torch.int32)
    wb = want_t.masked_fill(nan_w, 0).view(torch.int32)
    bad = gb != wb
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} differ, e.g. got {got[bad][:4].tolist()} "
        f"want {want_t[bad][:4].tolist()}")


def _refuses(backend: str, fmt: str, mode: str) -> str | None:
    """Why ``backend`` refuses acc=e4m3 for this config; the only refusal allowed: decompose's bit
    mode needs m <= 4 (its carry table)."""
    spec = LMulSpec(fmt, mode, acc="e4m3")
    why = kernels.get("matmul", backend).unavailable(torch.zeros(1, 1, 1), spec)
    if why:
        assert backend == "decompose" and mode == "bit" and Format.parse(fmt).man_bits > 4, why
    return why


def _skip_unless(backend: str, fmt: str, mode: str) -> None:
    why = _refuses(backend, fmt, mode)
    if why:
        pytest.skip(f"{backend}: {why}")


def _operands(fmt: str, m: int, k: int, n: int, seed: int, spread: bool = False) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    if spread:  # magnitudes over many binades: sums that cancel, saturate and underflow
        a = a * torch.pow(2.0, torch.randint(-12, 6, (m, k), generator=gen).float())
        b = b * torch.pow(2.0, torch.randint(-12, 6, (k, n), generator=gen).float())
    # a few zeros and format-subnormals (flushed in bit/formula mode)
    a[:, ::7] = 0.0
    b[::11, :] = Format.parse(fmt).min_subnormal * 3.0
    return a, b


# -- every backend x operand format x mode, blocks 1, 2, 16, 128, K, > K --------------------------

K_MAIN = 150


@pytest.mark.parametrize("backend", BACKENDS_ACC)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_sequential_oracle(backend, fmt, mode):
    _skip_unless(backend, fmt, mode)
    a, b = _operands(fmt, 5, K_MAIN, 70, seed=3 * FORMATS.index(fmt) + MODES.index(mode), spread=True)
    for acc in ("e4m3", "e5m2"):
        for block in (1, 2, 16, 128, K_MAIN, K_MAIN + 7):
            got = matmul(a, b, fmt, mode, acc=acc, acc_block=block, backend=backend)
            assert_bits(got, oracle(a, b, fmt, mode, acc, block), f"{backend} {fmt} {mode} acc={acc} block={block}")


@pytest.mark.parametrize("backend", BACKENDS_ACC)
@pytest.mark.parametrize("acc", ["bf16", "fp16", "e8m3", "e3m2", "e5m0", "e4m3ieee", "e2m1fn"])
def test_accumulator_formats(backend, acc):
    """Other accumulators: the cpu kernel's integer rounding path (8-bit exponent, m = 0) and its
    magic-number path (with and without inf), tiny formats that saturate at once."""
    for fmt, mode in (("e4m3", "bit"), ("bf16", "exact"), ("e5m2", "formula")):
        a, b = _operands(fmt, 6, 70, 37, seed=3, spread=True)
        for block in (1, 16, 70):
            got = matmul(a, b, fmt, mode, acc=acc, acc_block=block, backend=backend)
            assert_bits(got, oracle(a, b, fmt, mode, acc, block), f"{backend} {fmt} {mode} acc={acc} block={block}")


# -- hand-computed saturation, inf/NaN and signed zeros ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS_ACC)
def test_saturation_by_hand(backend):
    # e4m3 exact products 320, 320, -320, -320 (16 x ±20, all representable; max 448)
    a = torch.full((1, 4), 16.0)
    b = torch.tensor([[20.0], [20.0], [-20.0], [-20.0]])
    want = {1: -192.0, 2: -192.0, 4: 0.0}  # block 1: 320, 448 (saturated), 128, -192
    for block, value in want.items():
        got = matmul(a, b, "e4m3", "exact", acc="e4m3", acc_block=block, backend=backend)
        assert got.item() == value, (block, got.item())
    # e5m2 (has inf): a finite sum beyond max 57344 saturates, it does not become inf
    a = torch.full((1, 4), 256.0)
    b = torch.tensor([[256.0], [256.0], [-256.0], [-256.0]])
    got = [matmul(a, b, "e5m2", "exact", acc="e5m2", acc_block=k, backend=backend).item() for k in (1, 2)]
    assert got == [-57344.0, -57344.0], got  # block 1: 57344, 57344, -8192, -57344; block 2: 57344, -57344


@pytest.mark.parametrize("backend", BACKENDS_ACC)
def test_inf_nan_by_hand(backend):
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([[1.0, 1.0, 1.0]])
    cases = [  # (b column, e4m3 result, e5m2 result) for block 1, exact mode
        ([inf, 1.0, 1.0], 448.0, inf),     # e4m3 has no inf: quantize(inf) is max
        ([inf, -inf, 1.0], -448.0, nan),   # e4m3: 448 + -inf = -inf -> -448; e5m2: inf - inf
        ([nan, 1.0, 1.0], nan, nan),
        ([1.0, 2.0, -inf], -448.0, -inf),
    ]
    for col, w4, w5 in cases:
        b = torch.tensor(col)[:, None]
        for acc, want in (("e4m3", w4), ("e5m2", w5)):
            got = matmul(a, b, "bf16", "exact", acc=acc, backend=backend).item()  # bf16 operands keep inf
            assert (np.isnan(want) and np.isnan(got)) or got == want, (col, acc, got, want)
    # inf x 0 is NaN; in bit mode inf x subnormal is NaN too (the flush comes first)
    b = torch.tensor([[inf], [1.0], [1.0]])
    for mode, fmt, a0 in (("exact", "bf16", 0.0), ("bit", "e5m2", 2.0**-15)):  # 2^-15: subnormal in e5m2
        got = matmul(torch.tensor([[a0, 1.0, 1.0]]), b, fmt, mode, acc="e4m3", backend=backend)
        assert torch.isnan(got).all(), (mode, got)


@pytest.mark.parametrize("backend", BACKENDS_ACC)
def test_signed_zero_by_hand(backend):
    # 2^-5 x -2^-5 = -2^-10 is half e4m3's smallest subnormal: rounds (tie, even) to -0
    a = torch.tensor([[2.0**-5, 0.0]])
    b = torch.tensor([[-(2.0**-5)], [1.0]])
    one = matmul(a[:, :1], b[:1], "e4m3", "exact", acc="e4m3", backend=backend)
    assert one.view(torch.int32).item() == torch.tensor(-0.0).view(torch.int32).item()
    # block 1: -0, then -0 + (+0 block sum) = +0; block 2: one sum -2^-10 -> -0
    assert matmul(a, b, "e4m3", "exact", acc="e4m3", acc_block=1, backend=backend).view(torch.int32).item() == 0
    two = matmul(a, b, "e4m3", "exact", acc="e4m3", acc_block=2, backend=backend)
    assert two.view(torch.int32).item() == torch.tensor(-0.0).view(torch.int32).item()


@pytest.mark.parametrize("backend", BACKENDS_ACC)
def test_overflowing_products_without_special_operands(backend):
    """Finite operands whose products overflow float32 (no inf/NaN operand, so no reference
    fix-up: the fast kernels' own range handling), and products near float32's subnormals."""
    gen = torch.Generator().manual_seed(5)
    for fmt, mode in (("fp32", "exact"), ("fp32", "bit"), ("bf16", "formula"), ("fp32", "formula")):
        if _refuses(backend, fmt, mode):
            continue
        a = torch.randn(5, 40, generator=gen) * 2.0**100
        b = torch.randn(40, 66, generator=gen) * 2.0**27
        a[2] = torch.randn(40, generator=gen) * 2.0**-100   # row 2 x column 3: float32 subnormal products
        b[:, 3] = torch.randn(40, generator=gen) * 2.0**-40
        a[1, :20] *= -1.0
        for acc in ("bf16", "e5m2", "e4m3"):
            for block in (1, 3, 40):
                got = matmul(a, b, fmt, mode, acc=acc, acc_block=block, backend=backend)
                assert_bits(got, oracle(a, b, fmt, mode, acc, block), f"{backend} {fmt} {mode} {acc} {block}")


@pytest.mark.parametrize("backend", ["cpu", "decompose"])
def test_batches_layouts_and_auto(backend):
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(3, 1, 9, 33, generator=gen)
    b = torch.randn(2, 33, 130, generator=gen)[..., ::2]  # strided, broadcast batch
    ref = matmul(a, b, "e4m3", "bit", acc="e4m3", acc_block=4, backend="reference")
    got = matmul(a, b, "e4m3", "bit", acc="e4m3", acc_block=4, backend=backend)
    assert got.shape == (3, 2, 9, 65)
    for i in range(3):
        for j in range(2):
            assert_bits(got[i, j], oracle(a[i, 0], b[j], "e4m3", "bit", "e4m3", 4), f"batch {i},{j}")
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    auto = matmul(a, b, "e4m3", "bit", acc="e4m3", acc_block=4)
    assert torch.equal(auto.view(torch.int32), ref.view(torch.int32))
    vec = matmul(a[0, 0, 0], b[0], "e4m3", "exact", acc="e4m3", backend=backend)  # 1-D operand
    assert_bits(vec, oracle(a[0, 0, :1], b[0], "e4m3", "exact", "e4m3", 1)[0], "vector")
    assert matmul(torch.ones(4, 0), torch.ones(0, 3), "e4m3", acc="e4m3", backend=backend).eq(0).all()


def test_the_accumulator_rounding_is_visible():
    a, b = _operands("e4m3", 4, 64, 8, seed=1)
    fp32 = matmul(a, b, "e4m3", "bit", backend="cpu")
    for block in (1, 16):
        assert not torch.equal(matmul(a, b, "e4m3", "bit", acc="e4m3", acc_block=block, backend="cpu"), fp32)


# -- the compiled accumulator quantizers against quantize, on random float32 bit patterns --------

@pytest.mark.parametrize("acc", ["e4m3", "e5m2", "bf16", "fp16", "e8m3", "e3m2", "e5m0", "e6m22", "e5m23",
                                 "e2m1fn", "e1m2", "e8m21", "e3m1fn"])
def test_compiled_accumulator_quantizer(acc):
    from lmul.kernels import cpu_ext
    try:
        lib = cpu_ext.load()
    except RuntimeError as err:
        pytest.skip(str(err))
    fmt = Format.parse(acc)
    gen = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    # values near the format's range and its rounding ties
    near = torch.rand(1 << 14, generator=gen) * fmt.max * 1.1
    near[::2] = torch.tensor(fmt.max) + torch.randn(1 << 13, generator=gen) * fmt.max * 2.0**-(fmt.man_bits + 1)
    small = (torch.randint(0, 1 << (fmt.man_bits + 3), (1 << 14,), generator=gen).float() * 0.5
             * fmt.min_subnormal)  # exact multiples of half the subnormal spacing: ties
    e = torch.randint(fmt.emin - fmt.man_bits - 3, fmt.emax + 3, (1 << 14,), generator=gen)
    logu = (1.0 + torch.rand(1 << 14, generator=gen, dtype=torch.float64)) * torch.pow(2.0, e.double())
    logu = logu.clamp(max=3e38).float()
    x = torch.cat([x, near, -near, small, -small, logu, -logu, torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                 float("nan"), fmt.max, -fmt.max] + [1.0] * 9)])
    x = x[: x.numel() // 16 * 16].contiguous()
    want = _quantize_torch(x, fmt, "rne", "saturate")
    qp = cpu_ext._qparams(fmt, "rne")
    for path in (0, 1):
        out = torch.empty_like(x)
        ran = lib.lmul_quantize_acc(cpu_ext._ptr(x), ctypes.c_int64(x.numel()), cpu_ext._ptr(out),
                                    ctypes.byref(qp), path)
        if not ran:
            continue  # path 1 (magic number) does not apply to this format
        assert_bits(out, want.numpy(), f"{acc} path {path}")


# -- property test: small random shapes, formats, modes, blocks -----------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 6), k=st.integers(1, 40), n=st.integers(1, 70), block=st.integers(1, 45),
       fmt=st.sampled_from(FORMATS), mode=st.sampled_from(MODES), acc=st.sampled_from(["e4m3", "e5m2", "fp16"]),
       scale=st.integers(-8, 8), seed=st.integers(0, 2**16))
def test_property_fast_backends_match_oracle(m, k, n, block, fmt, mode, acc, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen) * 2.0**scale
    b = torch.randn(k, n, generator=gen)
    pick = torch.rand(m, k, generator=gen)
    a = torch.where(pick < 0.1, torch.zeros_like(a), a)
    a = torch.where((pick > 0.95) & (pick < 0.97), torch.full_like(a, float("inf")), a)
    a = torch.where(pick > 0.99, torch.full_like(a, float("nan")), a)
    want = oracle(a, b, fmt, mode, acc, block)
    for backend in ("cpu", "decompose"):
        spec = LMulSpec(fmt, mode, acc=acc, acc_block=block)
        if kernels.get("matmul", backend).unavailable(a[None], spec):
            continue
        got = matmul(a, b, fmt, mode, acc=acc, acc_block=block, backend=backend)
        assert_bits(got, want, f"{backend} {fmt} {mode} acc={acc} block={block}")


# -- k split by the dispatcher: the accumulator carried across pieces (issue 24, finding 6) ------

def _recording_backend(monkeypatch, backend: str, chunk: int) -> list:
    """Shrink MATMUL_CHUNK (k pieces of chunk / 64) and record every call's k and state kind."""
    import sys

    calls = []
    entry = kernels.get("matmul", backend)

    def fn(a, b, spec, **state):
        calls.append((a.shape[-1], "within" if state.get("within_block") else "init" if state else "fresh"))
        return entry.fn(a, b, spec, **state)

    monkeypatch.setattr(sys.modules["lmul.matmul"], "MATMUL_CHUNK", chunk)
    wrapped = kernels.Backend(backend, "matmul", fn, entry.unavailable, "")
    monkeypatch.setitem(kernels._BY_KEY, ("matmul", backend), wrapped)
    return calls


@pytest.mark.parametrize("backend", ["cpu", "decompose"])
@pytest.mark.parametrize("mode", MODES)
def test_k_split_carries_the_accumulator(monkeypatch, backend, mode):
    """K = 150 in pieces of 8 k: blocks that fit a piece (1, 3, 8: the running sum continues) and
    blocks longer than a piece (20, 157: the float32 block sum continues), an inf row and a NaN
    column (recomputed by the reference with the carried state): the oracle's bits."""
    _skip_unless(backend, "e4m3", mode)
    a, b = _operands("e4m3", 5, K_MAIN, 3, seed=40 + MODES.index(mode), spread=True)
    a[1, 60] = float("inf")
    b[100, 2] = float("nan")
    calls = _recording_backend(monkeypatch, backend, 8 * 64)
    for acc in ("e4m3", "e5m2"):
        for block in (1, 3, 8, 20, K_MAIN + 7):
            calls.clear()
            got = matmul(a, b, "e4m3", mode, acc=acc, acc_block=block, backend=backend)
            assert_bits(got, oracle(a, b, "e4m3", mode, acc, block), f"{backend} {mode} acc={acc} block={block}")
            assert max(k for k, _ in calls) <= 8 and {kind for _, kind in calls} == (
                {"fresh", "init"} if block <= 8 else {"within"}), calls


_MEMORY_SCRIPT = r"""
import re, sys
import numpy as np, torch
import lmul

def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

k, block = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(5)
a = lmul.quantize(torch.randn(3, k, generator=g), "e4m3")
b = lmul.quantize(torch.randn(k, generator=g), "e4m3")
lmul.matmul(a[:, :256], b[:256], "e4m3", "exact", acc="e4m3", acc_block=block, backend="cpu")  # compile, load
base = hwm()
got = lmul.matmul(a, b, "e4m3", "exact", acc="e4m3", acc_block=block, backend="cpu")
grow = hwm() - base
np.save(sys.argv[3], got.numpy())
print(grow)
"""


@pytest.mark.parametrize("block", [4096, 2**20 + 3])
def test_narrow_fp8_accumulation_memory_is_bounded(tmp_path, block):
    """(3, 2^21) @ (2^21,) with acc=e4m3 on cpu (B padded to 64 columns, K = 2^21): the peak RSS
    growth of the call (C++ allocations included: VmHWM, in a fresh process) stays within the
    inputs' size plus 64 MiB (it was 1 GiB: K unsplit, 512 bytes of B per k); and the result is the
    defined sum, bit for bit: exact e4m3 products are exact in float32, float32 block sums are
    NumPy's sequential add.accumulate, the running sum rounded by torch's saturating e4m3 cast."""
    import subprocess
    import sys

    if kernels.get("matmul", "cpu").machine():
        pytest.skip("cpu backend unavailable")
    k = 2**21
    out = tmp_path / "got.npy"
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(k), str(block), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    inputs = 4 * k * 4
    assert int(proc.stdout.split()[-1]) <= inputs + (64 << 20), proc.stdout
    g = torch.Generator().manual_seed(5)
    a = quantize(torch.randn(3, k, generator=g), "e4m3").numpy()
    b = quantize(torch.randn(k, generator=g), "e4m3").numpy()
    p = a * b  # [3, K] float32, exact
    want = np.zeros(3, dtype=np.float32)
    for k0 in range(0, k, block):
        s = np.add.accumulate(p[:, k0:k0 + block], axis=1, dtype=np.float32)[:, -1]
        want = round_acc((want + s).astype(np.float32), "e4m3")
    assert_bits(torch.from_numpy(np.load(out)), want, f"K=2^21 block={block}")


def test_oversized_workspace_is_not_kept(monkeypatch):
    """Scratch buffers above WORKSPACE_CAP are temporaries: a direct backend call on big operands
    does not leave them allocated (they were kept at the largest size until release_workspace)."""
    from lmul.kernels import cpu_ext

    if cpu_ext.machine():
        pytest.skip("cpu backend unavailable")
    cpu_ext.release_workspace()
    monkeypatch.setattr(cpu_ext, "WORKSPACE_CAP", 1 << 16)
    a, b = torch.randn(1, 8, 600), torch.randn(1, 600, 3)  # B padded: 600 x 64 x 4 bytes > 64 KiB
    got = cpu_ext.cpu_matmul(a, b, LMulSpec("e4m3", acc="e4m3"))
    kept = cpu_ext._WORKSPACE.__dict__.get("bufs", {})
    assert all(t.numel() * t.element_size() <= 1 << 16 for t in kept.values()), {n: t.numel() for n, t in kept.items()}
    assert_bits(got[0], oracle(a[0], b[0], "e4m3", "bit", "e4m3", 1), "capped workspace")


# -- the reference/decompose accumulator loop (issue 24, finding 11d) ----------------------------

@pytest.mark.parametrize("acc", ["e4m3", "e5m2", "bf16", "fp16", "e3m2"])
def test_round_acc_equals_quantize(acc):
    """The loops' accumulator rounding (a torch cast, saturated, where the format is a torch dtype)
    is lmul.formats.quantize (rne, saturating; bit manipulation, tested against the casts) on random
    float32 bit patterns, the edges of the format and inf/NaN."""
    from lmul.kernels.reference import round_acc as loop_round

    fmt = Format.parse(acc)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=torch.Generator().manual_seed(7), dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    edges = torch.tensor([fmt.max, fmt.max * (1 + 2.0**-(fmt.man_bits + 1)), fmt.max * 1.5, 3e38, fmt.min_subnormal / 2,
                          fmt.min_subnormal * 0.75, 0.0, -0.0, float("inf"), float("nan")])
    x = torch.cat([x, edges, -edges])
    assert_bits(loop_round(x, fmt), quantize(x, fmt).numpy(), acc)


@pytest.mark.parametrize("backend", ["reference", "decompose"])
def test_accumulator_loop_has_no_per_k_quantize(monkeypatch, backend):
    """Per k the loops do one float32 add over every output (and per block one torch cast for an
    e4m3 accumulator): no lmul.formats.quantize call per k or per block (about 30 torch ops each, the
    ~230 us per k of the issue); only the two operands are quantized. The bits stay the oracle's."""
    import lmul.kernels.decompose as dec
    import lmul.kernels.reference as ref

    calls = []

    def counting(x, *args, **kw):
        calls.append(x.shape)
        return quantize(x, *args, **kw)

    monkeypatch.setattr(ref, "quantize", counting)
    monkeypatch.setattr(dec, "quantize", counting)
    a, b = _operands("e4m3", 4, 300, 6, seed=50)
    for block in (1, 16):
        calls.clear()
        got = matmul(a, b, "e4m3", "exact", acc="e4m3", acc_block=block, backend=backend)
        assert len(calls) <= 2, (block, calls)
        assert_bits(got, oracle(a, b, "e4m3", "exact", "e4m3", block), f"{backend} block={block}")
