"""matmul (reference backend) against a float64 sum of the spec's products (tests/oracle.py),
within the contract's tolerance |C - C_ref| <= K 2^-24 sum|P| (+ one float32 ulp)."""

import sys

import numpy as np
import pytest
import torch

from lmul import Format, matmul, quantize
from lmul.kernels.reference import REFERENCE_CHUNK
from tests.oracle import SmallFormat, default_offset, spec_products


def oracle_matmul(a: torch.Tensor, b: torch.Tensor, fmt: str, mode: str, rounding: str = "rne",
                  offset: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 sum of the spec's float32 products, and sum |P|, with torch.matmul shapes."""
    f = Format.parse(fmt)
    c = default_offset(f.man_bits) if offset is None else offset
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    aq = quantize(a2, f, rounding).double().numpy()
    bq = quantize(b2, f, rounding).double().numpy()
    p = spec_products(aq[..., :, :, None], bq[..., None, :, :], f.exp_bits, f.man_bits, mode, c).astype(np.float64)
    total, mag = p.sum(-2), np.abs(p).sum(-2)
    if a.dim() == 1:
        total, mag = total[..., 0, :], mag[..., 0, :]
    if b.dim() == 1:
        total, mag = total[..., 0], mag[..., 0]
    return total, mag


def assert_within_contract(c: torch.Tensor, want: np.ndarray, mag: np.ndarray, k: int) -> None:
    got = c.double().numpy()
    assert got.shape == want.shape
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    bound = max(k, 1) * 2.0**-24 * mag + ulp
    finite = np.isfinite(want)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    err = np.abs(got[finite] - want[finite])
    assert np.all(err <= bound[finite]), f"max excess {np.max(err - bound[finite])}"


SHAPES = [  # (a shape, b shape): 2-D, odd sizes, batched, broadcast, vectors
    ((5, 7), (7, 3)), ((1, 33), (33, 1)), ((3, 5, 17), (3, 17, 4)), ((2, 1, 4, 9), (3, 9, 5)),
    ((9,), (9, 4)), ((4, 9), (9,)), ((9,), (9,)), ((6, 8), (2, 8, 3)),
]


@pytest.mark.parametrize("fmt", ["bf16", "e4m3", "e5m2", "fp16", "e8m3", "fp32"])
@pytest.mark.parametrize("mode", ["bit", "formula", "exact"])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_matches_float64_sum_of_spec_products(fmt, mode, shapes):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(*shapes[0], generator=g) * 3
    b = torch.randn(*shapes[1], generator=g)
    want, mag = oracle_matmul(a, b, fmt, mode)
    c = matmul(a, b, fmt, mode)
    assert c.dtype == torch.float32 and c.shape == torch.matmul(a, b).shape
    assert_within_contract(c, want, mag, shapes[0][-1])


@pytest.mark.parametrize("rounding", ["rne", "trunc"])
def test_options_and_input_dtypes(rounding):
    g = torch.Generator().manual_seed(8)
    a = torch.randn(6, 40, generator=g, dtype=torch.float64)
    b = torch.randn(40, 5, generator=g).to(torch.bfloat16)
    want, mag = oracle_matmul(a, b.float(), "e8m3", "bit", rounding, offset=0.0)
    assert_within_contract(matmul(a, b, "e8m3", "bit", offset=0.0, rounding=rounding), want, mag, 40)


def test_non_contiguous_and_transposed():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(20, 30, generator=g).t()           # (30, 20), transposed view
    b = torch.randn(40, 20, generator=g)[::2].t()     # (20, 20), strided view
    want, mag = oracle_matmul(a.contiguous(), b.contiguous(), "bf16", "bit")
    assert_within_contract(matmul(a, b, "bf16", "bit"), want, mag, 20)


def test_chunking_covers_large_problems(monkeypatch):
    """Force tiny chunks so every chunk boundary (batch, rows, k) is crossed."""
    monkeypatch.setattr(sys.modules["lmul.kernels.reference"], "REFERENCE_CHUNK", 37)
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(2, 11, 13, generator=g), torch.randn(2, 13, 5, generator=g)
    want, mag = oracle_matmul(a, b, "e4m3", "bit")
    assert_within_contract(matmul(a, b, "e4m3", "bit"), want, mag, 13)
    assert REFERENCE_CHUNK >= 1 << 20


def test_special_values_propagate():
    a = torch.tensor([[1.0, float("inf")], [2.0, 3.0], [float("nan"), 1.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    c = matmul(a, b, "bf16", "bit")
    assert c[0, 0] == float("inf") and torch.isnan(c[0, 1]) and torch.isnan(c[2]).all()
    assert c[1, 1] == 0.0


def test_empty():
    assert matmul(torch.empty(3, 0), torch.empty(0, 4)).eq(0).all()
    assert matmul(torch.empty(3, 0), torch.empty(0, 4)).shape == (3, 4)
    assert matmul(torch.empty(0, 5), torch.ones(5, 4)).shape == (0, 4)
    assert matmul(torch.ones(2, 0, 5), torch.ones(5, 4)).shape == (2, 0, 4)


def sequential_acc_oracle(p: np.ndarray, acc: SmallFormat, block: int) -> np.ndarray:
    """Running sum over k (last axis), rounded to ``acc`` after adding each block's float32 sum
    (sequential from +0 in increasing k: numpy's own float32 ``sum`` is pairwise)."""
    total = np.zeros(p.shape[:-1])
    for k0 in range(0, p.shape[-1], block):
        blk = np.zeros(p.shape[:-1], dtype=np.float32)
        for kk in range(k0, min(p.shape[-1], k0 + block)):
            blk = (blk + p[..., kk].astype(np.float32)).astype(np.float32)
        total = acc.quantize((total.astype(np.float32) + blk).astype(np.float64))
    return total


@pytest.mark.parametrize("block", [1, 4, 64])
def test_reduced_precision_accumulation(block):
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(4, 24, generator=g), torch.randn(24, 3, generator=g)
    f = Format.parse("e4m3")
    aq, bq = quantize(a, f).double().numpy(), quantize(b, f).double().numpy()
    p = spec_products(aq[:, None, :], bq.T[None, :, :], 4, 3, "bit", default_offset(3))  # [4, 3, 24]
    want = sequential_acc_oracle(p, SmallFormat(4, 3, True), block)
    got = matmul(a, b, "e4m3", "bit", acc="e4m3", acc_block=block)
    np.testing.assert_array_equal(got.double().numpy(), want)
    exact = matmul(a, b, "e4m3", "bit")
    assert not torch.equal(got, exact)  # the accumulator rounding is visible


def test_errors():
    a = torch.ones(3, 4)
    with pytest.raises(ValueError, match="do not match"):
        matmul(a, torch.ones(5, 2))
    with pytest.raises(ValueError, match="do not broadcast"):
        matmul(torch.ones(2, 3, 4), torch.ones(3, 4, 2))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        matmul(torch.tensor(1.0), a)
    with pytest.raises(TypeError, match="floating dtype"):
        matmul(a.long(), torch.ones(4, 2))
    with pytest.raises(ValueError, match="different devices"):
        matmul(a, torch.ones(4, 2, device="meta"))
    with pytest.raises(ValueError, match="unknown backend"):
        matmul(a, torch.ones(4, 2), backend="cuda-magic")
    with pytest.raises(ValueError, match="acc_block"):
        matmul(a, torch.ones(4, 2), acc="e4m3", acc_block=0)
    with pytest.raises(ValueError, match="unknown format"):
        matmul(a, torch.ones(4, 2), acc="int8")


# -- bounded memory: the dispatcher's pieces (lmul.matmul.MATMUL_CHUNK) ------------------------

CHUNK_SHAPES = [  # matrix-vector with long K, both broadcast folds, a gathered broadcast batch, square
    ((3, 700), (700,)), ((40, 30), (6, 30, 1)), ((2, 5, 40, 30), (30, 7)), ((4, 1, 9, 30), (1, 5, 30, 6)),
    ((33, 65), (65, 31)),
]


def _recording(monkeypatch, name: str, chunk: int) -> list:
    """Shrink MATMUL_CHUNK and wrap backend ``name`` so that every call's operand sizes are kept."""
    from lmul import kernels

    calls = []
    entry = kernels.get("matmul", name)

    def fn(a, b, spec, **state):
        calls.append((a.numel(), b.numel(), a.shape[1] * b.shape[-1] * a.shape[0]))
        return entry.fn(a, b, spec, **state)

    monkeypatch.setattr(sys.modules["lmul.matmul"], "MATMUL_CHUNK", chunk)
    monkeypatch.setitem(kernels._BY_KEY, ("matmul", name), kernels.Backend(name, "matmul", fn, entry.unavailable, ""))
    return calls


@pytest.mark.parametrize("backend", ["reference", "cpu", "decompose"])
@pytest.mark.parametrize("shapes", CHUNK_SHAPES, ids=str)
def test_pieces_are_bounded_and_invisible(monkeypatch, backend, shapes):
    from lmul import kernels
    from lmul.spec import LMulSpec

    spec = LMulSpec("e4m3", "formula" if backend == "decompose" else "bit", backend=backend)
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(*shapes[0], generator=g), torch.randn(*shapes[1], generator=g)
    if kernels.get("matmul", backend).unavailable(a, spec):
        pytest.skip(f"{backend} unavailable")
    whole = matmul(a, b, spec=spec)
    calls = _recording(monkeypatch, backend, 64)
    got = matmul(a, b, spec=spec)
    k = shapes[0][-1]
    assert len(calls) > 1
    # the reference is never split over k (it chunks k itself, into a float64 sum): whole rows of K
    bound = max(64, k) if backend == "reference" else 64
    assert all(x <= bound and y <= bound and z <= 64 for x, y, z in calls), calls
    want, mag = oracle_matmul(a, b, "e4m3", spec.mode)
    assert_within_contract(got, want, mag, k)
    assert_within_contract(whole, want, mag, k)


@pytest.mark.parametrize("acc,block", [("e4m3", 1), ("e5m2", 4), ("e4m3", 2)])
def test_reduced_accumulation_pieces_are_bit_identical(monkeypatch, acc, block):
    """The running sum is rounded in k order: pieces split rows, columns and k, k at block
    boundaries with the accumulator carried (MATMUL_CHUNK = 128: pieces of 2 k); bit-identical."""
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(2, 7, 90, generator=g), torch.randn(90, 5, generator=g)
    whole = matmul(a, b, "e4m3", acc=acc, acc_block=block)
    from lmul import kernels
    from lmul.spec import LMulSpec

    calls = _recording(monkeypatch, kernels.select("matmul", a, LMulSpec("e4m3", acc=acc)).name, 128)
    got = matmul(a, b, "e4m3", acc=acc, acc_block=block)
    assert len(calls) > 1 and all(x <= 128 and y <= 128 for x, y, _ in calls)
    assert torch.equal(got.view(torch.int32), whole.view(torch.int32))


def test_mul_pieces_are_bit_identical(monkeypatch):
    from lmul import elementwise

    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(6, 1, 50, generator=g), torch.randn(7, 50, generator=g)
    whole = elementwise.mul(x, y, "e4m3", "bit")
    monkeypatch.setattr(elementwise, "MUL_CHUNK", 40)
    assert torch.equal(elementwise.mul(x, y, "e4m3", "bit").view(torch.int32), whole.view(torch.int32))
    assert list(elementwise._slices((6, 7, 50), 40))[:2] == [(0, 0, slice(0, 40)), (0, 0, slice(40, 50))]
    assert list(elementwise._slices((6, 7, 5), 40)) == [(slice(i, i + 1),) for i in range(6)]


# -- the contract at float32's edge -----------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "decompose"])
@pytest.mark.parametrize("mode", ["bit", "formula", "exact"])
def test_overflowing_products_and_sums_follow_the_reference(backend, mode):
    """Products above float32's max (the issue's reproduction) and sums that leave float32's range:
    every backend gives the reference's inf, NaN and sign; finite entries within the contract."""
    from lmul import kernels
    from lmul.spec import LMulSpec

    fmt = "e4m3" if backend == "decompose" and mode == "bit" else "bf16"
    spec = LMulSpec(fmt, mode, backend=backend)
    a = torch.full((1, 2), 1.5 * 2.0**127)
    b = torch.tensor([[1.5], [-1.0]])
    if kernels.get("matmul", backend).unavailable(a, spec):
        pytest.skip(f"{backend} unavailable")
    ref = spec.replace(backend="reference")
    if fmt == "bf16":
        assert torch.equal(matmul(a, b, spec=spec), matmul(a, b, spec=ref))
        assert torch.isinf(matmul(a, b, spec=ref)).all()
    g = torch.Generator().manual_seed(14)
    for scale_a, scale_b in [(2.0**100, 2.0**27), (2.0**120, 2.0**6), (2.0**-100, 2.0**-40)]:
        x = torch.randn(6, 40, generator=g) * scale_a
        y = torch.randn(40, 5, generator=g) * scale_b
        y[3, 2] = -y[3, 2].abs() * 4
        got, want = matmul(x, y, spec=spec), matmul(x, y, spec=ref)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.signbit(got[torch.isinf(want)]), torch.signbit(want[torch.isinf(want)]))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=40 * 2.0**-24, atol=1e-30)


# -- the reference is the oracle for every K (issue 24, finding 5) ------------------------------

def _float64_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 exact mode with products that are exact in float32 (b holds ±1 and 0): the contract's
    sum of the products, in float64, rounded once."""
    return (a.double() @ b.double()).float()


def test_reference_sums_the_whole_k_when_the_dispatcher_splits_k():
    """K > 65 536 with N >= 64 makes the dispatcher split K for the fast backends (the issue's
    reproduction); the reference still gives the float64 sum rounded once: 0, not the NaN of
    inf + -inf float32 partial sums."""
    k = 65600
    a = torch.zeros(1, k)
    a[0, :2], a[0, 65540:65542] = 3e38, -3e38
    b = torch.ones(k, 64)
    want = _float64_sum(a, b)
    assert want.eq(0).all()
    assert torch.equal(matmul(a, b, "fp32", "exact", backend="reference"), want)


@pytest.mark.parametrize("backend", ["reference", "cpu", "decompose"])
@pytest.mark.parametrize("b_shape", [(1000,), (1000, 70)], ids=str)
def test_k_split_gives_the_whole_sums_inf_and_nan(monkeypatch, backend, b_shape):
    """The dispatcher's K split, made small (MATMUL_CHUNK = 256 splits K into pieces of 4, for a
    vector and for N >= 64): partial sums that overflow or meet inf/NaN give what the whole float64
    sum gives on every backend; the reference also rounds once (2^25 + 1 - 2^25 is 1, where float32
    partial sums give 0, which the fp32 contract allows the fast backends)."""
    monkeypatch.setattr(sys.modules["lmul.matmul"], "MATMUL_CHUNK", 256)
    g = torch.Generator().manual_seed(15)
    a = torch.zeros(5, 1000)
    a[0, :2], a[0, 500:502] = 3e38, -3e38                      # 0 (inf - inf of the pieces)
    a[1, 0], a[1, 1], a[1, 900] = 2.0**25, 1.0, -(2.0**25)     # 1
    a[2, 3], a[2, 700] = float("inf"), float("-inf")           # NaN
    a[3, 10], a[3, 20] = float("inf"), 3e38                    # inf
    a[4] = torch.randint(-4, 5, (1000,), generator=g).float()  # small integers: exact in any order
    b = torch.ones(b_shape)
    want = _float64_sum(a, b)
    assert want[0].eq(0).all() and want[1].eq(1).all() and want[2].isnan().all() and want[3].isinf().all()
    got = matmul(a, b, "fp32", "exact", backend=backend)
    rows = [0, 1, 2, 3, 4] if backend == "reference" else [0, 2, 3, 4]
    assert torch.equal(got[rows].nan_to_num(7.0), want[rows].nan_to_num(7.0))


# -- memory of narrow products on the cpu backend (issue 24, finding 6's audit) ------------------

_PEAK_SCRIPT = r"""
import re, sys
import torch
import lmul

def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024

a, b = torch.randn(*eval(sys.argv[1])), torch.randn(*eval(sys.argv[2]))
lmul.matmul(a[..., :64], b[..., :64, :] if b.dim() > 1 else b[:64], "e4m3", backend="cpu")  # compile, load
base = hwm()
lmul.matmul(a, b, "e4m3", backend="cpu")
print(hwm() - base, (a.numel() + b.numel()) * 4)
"""


@pytest.mark.parametrize("shapes", [((3, 2**22 - 64), (2**22 - 64,)), ((2**19, 1, 8), (2**19, 8, 1))], ids=str)
def test_narrow_products_memory_is_bounded(shapes):
    """The cpu kernels pad B to 64 columns (and A to 4 rows): a matrix-vector product with K just
    under 2^22 (not split over k before: 2.1 GiB) and a batch of dot products (2^19 batches in one
    piece before: 2.6 GiB) stay within their inputs' size plus 64 MiB (VmHWM of a fresh process)."""
    import subprocess

    from lmul import kernels

    if kernels.get("matmul", "cpu").machine():
        pytest.skip("cpu backend unavailable")
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(shapes[0]), str(shapes[1])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grow, inputs = map(int, proc.stdout.split()[-2:])
    assert grow <= inputs + (64 << 20), (grow >> 20, inputs >> 20)
