"""The scaled accumulator (``LMulSpec.acc_tile``, docs/semantics.md section 7, Table 6's reading (ii))
against an independent sequential oracle.

Oracle, written from the contract without lmul's matmul, scaling or accumulator code: the terms are
tests/test_scaling.py's ``oracle_terms`` (scaled operands) or ``tests.oracle.spec_products`` of the
quantized operands (unscaled), block sums are sequential NumPy float32 additions from +0, and after
each block every ``T x T`` output tile gets its scale from a Python loop over the tile (the amax of
its finite elements, the torchao rule of ``oracle_scale``) and is rounded with tests/test_acc.py's
``round_acc`` (torch's own casts) at that scale.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmul import kernels
from lmul.formats import Format, quantize
from lmul.matmul import matmul
from lmul.scaling import round_tiles
from lmul.spec import PRESETS, LMulSpec, resolve_offset
from tests.oracle import spec_products
from tests.test_acc import assert_bits, round_acc
from tests.test_scaling import oracle_scale, oracle_terms

BACKENDS = ["reference", "cpu", "decompose"]
MODES = ["bit", "formula", "exact"]


def oracle_round_tiles(y: np.ndarray, acc: str, tile: int) -> np.ndarray:
    """Each tile x tile block of y [M, N] at its own scale 2^t: quantize(y 2^-t, acc) 2^t. The tile's
    t is ``oracle_scale`` of its finite amax; tiles are cut by slicing, one scale each."""
    t = np.zeros(y.shape, dtype=np.int64)
    m, n = y.shape
    for i0 in range(0, m, tile):
        for j0 in range(0, n, tile):
            blk = y[i0:i0 + tile, j0:j0 + tile]
            fin = np.abs(blk[np.isfinite(blk)])
            t[i0:i0 + tile, j0:j0 + tile] = oracle_scale(float(fin.max()) if fin.size else 0.0, acc, "row")
    with np.errstate(all="ignore"):
        scaled = np.ldexp(y.astype(np.float64), -t).astype(np.float32)
        return np.ldexp(round_acc(scaled, acc).astype(np.float64), t).astype(np.float32)


def oracle(terms: np.ndarray, acc: str, block: int, tile: int) -> np.ndarray:
    """Section 4's order on the terms [M, N, K], every rounding per tile."""
    total = np.zeros(terms.shape[:-1], dtype=np.float32)
    with np.errstate(all="ignore"):
        for k0 in range(0, terms.shape[-1], block):
            s = np.zeros_like(total)
            for kk in range(k0, min(terms.shape[-1], k0 + block)):
                s = (s + terms[..., kk]).astype(np.float32)
            total = oracle_round_tiles((total + s).astype(np.float32), acc, tile)
    return total


def unscaled_terms(a: np.ndarray, b: np.ndarray, fmt: str, mode: str) -> np.ndarray:
    f = Format.parse(fmt)
    aq = quantize(torch.from_numpy(a).float(), f).double().numpy()
    bq = quantize(torch.from_numpy(b).float(), f).double().numpy()
    return spec_products(aq[:, None, :], bq.T[None], f.exp_bits, f.man_bits, mode, resolve_offset(f, mode))


def _operands(m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of very different sizes (so tiles see 2^40 between their largest and smallest
    sums, and literal e4m3 would clip), zeros, one NaN-free layout."""
    gen = np.random.default_rng(seed)
    a = gen.standard_normal((m, k)) * np.exp2(gen.integers(-12, 13, (m, 1))) * np.exp2(gen.integers(-3, 4, (m, k)))
    b = gen.standard_normal((k, n)) * np.exp2(gen.integers(-8, 9, (1, n))) * np.exp2(gen.integers(-3, 4, (k, n)))
    a[:, ::11] = 0.0
    b[3 % k, :] = 0.0
    return a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling", ["none", "row", "mx"])
@pytest.mark.parametrize("mode", MODES)
def test_sequential_oracle(mode, scaling, backend):
    """M = 9, N = 70, K = 150: ragged tiles (4, 32) and blocks (32, 128), tile 1 (a scale per output)."""
    a, b = _operands(9, 150, 70, seed=MODES.index(mode) * 5 + len(scaling))
    t = unscaled_terms(a, b, "e4m3", mode) if scaling == "none" else oracle_terms(a, b, "e4m3", mode, scaling)
    for acc, block, tile in [("e4m3", 32, 4), ("e4m3", 128, 32), ("e4m3", 16, 1), ("e5m2", 128, 128), ("e4m3", 150, 8)]:
        got = matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), "e4m3", mode, acc=acc, acc_block=block,
                     backend=backend, scaling=scaling, acc_tile=tile)
        assert_bits(got, oracle(t, acc, block, tile), f"{mode} {scaling} {backend} acc={acc}x{block}t{tile}")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 20), k=st.integers(1, 90), n=st.integers(1, 40),
       block=st.sampled_from([1, 7, 32, 1000]), tile=st.sampled_from([1, 3, 16, 2**40]),
       acc=st.sampled_from(["e4m3", "e5m2", "e3m2"]), mode=st.sampled_from(MODES),
       backend=st.sampled_from(["cpu", "decompose"]))
def test_property_matches_oracle(seed, m, k, n, block, tile, acc, mode, backend):
    a, b = _operands(m, k, n, seed)
    got = matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float(), "e4m3", mode, acc=acc, acc_block=block,
                 backend=backend, acc_tile=tile)
    assert_bits(got, oracle(unscaled_terms(a, b, "e4m3", mode), acc, block, min(tile, max(m, n))), "property")


@pytest.mark.parametrize("acc, wide", [("e4m3", "e8m3"), ("e5m2", "e8m2")])
@pytest.mark.parametrize("mode", MODES)
def test_tile_one_is_the_wide_accumulator(mode, acc, wide):
    """acc_tile=1: every running sum is its own tile, never subnormal nor saturated at its scale, so the
    result equals the e8m<m> accumulator (float32's range, acc's mantissa) bit for bit."""
    a, b = _operands(7, 130, 33, seed=11 + MODES.index(mode))
    a, b = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    for block in (1, 16, 128):
        got = matmul(a, b, "e4m3", mode, acc=acc, acc_block=block, acc_tile=1)
        assert torch.equal(got, matmul(a, b, "e4m3", mode, acc=wide, acc_block=block)), (mode, acc, block)


def test_by_hand_the_range_never_clips():
    """300 + 300 with e4m3 rounded after every product: the literal accumulator clips at 448; the
    scaled one holds 288 (300 in e4m3), then 588 at scale 2: 294 -> 288, so 576."""
    a, b = torch.tensor([[300.0, 300.0]]), torch.tensor([[1.0], [1.0]])
    assert matmul(a, b, "e4m3", "exact", acc="e4m3").item() == 448.0
    assert matmul(a, b, "e4m3", "exact", acc="e4m3", acc_tile=1).item() == 576.0


def test_round_tiles_by_hand():
    """One tile's scale comes from its largest finite value: 1000 puts the tile at 2^2 (1000 / 4 = 250
    <= 448), so 0.01 becomes 0.0025 in e4m3's subnormals (1 ulp = 2^-9) times 4; a tile of its own
    keeps 0.01 to e4m3's precision. NaN stays NaN; inf is left out of the amax and saturates as in
    section 4 (e4m3 has no inf: 448 at the tile's scale)."""
    y = torch.tensor([[1000.0, 0.01]])
    assert round_tiles(y, "e4m3", 2).tolist() == [[1024.0, 2.0**-9 * 4]]
    assert round_tiles(y, "e4m3", 1).tolist() == [[1024.0, float(quantize(torch.tensor(0.01), "e4m3"))]]
    z = round_tiles(torch.tensor([[float("inf"), 3.0, float("nan"), 0.0]]), "e4m3", 4)
    assert z[0, 0].item() == 448.0 / 128 and z[0, 1].item() == 3.0 and math.isnan(z[0, 2].item())
    assert z[0, 3].item() == 0.0
    assert torch.equal(round_tiles(torch.zeros(3, 5), "e4m3", 2), torch.zeros(3, 5))
    assert round_tiles(torch.tensor([[float("-inf"), 3.0]]), "e5m2", 2)[0, 0].item() == float("-inf")


@pytest.mark.parametrize("backend", ["cpu", "decompose"])
def test_pieces_and_batches(monkeypatch, backend):
    """Tiles are per batch element over the output's last two dims; the dispatcher's pieces (shrunk
    MATMUL_CHUNK: k, rows and columns split) and broadcast batches give the oracle's bits."""
    gen = np.random.default_rng(7)
    a = (gen.standard_normal((2, 3, 10, 150)) * 100).astype(np.float32)
    b = gen.standard_normal((150, 70)).astype(np.float32)
    spec = LMulSpec("e4m3", "bit", acc="e4m3", acc_block=32, acc_tile=4, backend=backend)
    want = np.stack([oracle(unscaled_terms(a[i, j].astype(np.float64), b.astype(np.float64), "e4m3", "bit"),
                            "e4m3", 32, 4) for i in range(2) for j in range(3)]).reshape(2, 3, 10, 70)
    got = matmul(torch.from_numpy(a), torch.from_numpy(b), spec=spec)
    assert_bits(got, want, "batched")
    monkeypatch.setattr(sys.modules["lmul.matmul"], "MATMUL_CHUNK", 8 * 64)
    assert_bits(matmul(torch.from_numpy(a), torch.from_numpy(b), spec=spec), want, "pieces")
    b3 = torch.from_numpy(b).expand(3, 150, 70)
    assert_bits(matmul(torch.from_numpy(a), b3, spec=spec), want, "broadcast batch")
    assert kernels.get("matmul", backend) is not None


def test_spec_names_presets_and_errors():
    spec = LMulSpec("e4m3", "bit", scaling="row", acc="e4m3", acc_block=128, acc_tile=128)
    assert spec.name == "e4m3-bit-row-acce4m3x128t128" and LMulSpec.from_name(spec.name) == spec
    assert LMulSpec.from_name("e4m3-exact-acce4m3t8") == LMulSpec("e4m3", "exact", acc="e4m3", acc_tile=8)
    assert spec.to_dict()["acc_tile"] == 128
    for arm in ("e4m3-all-row-sacc", "e5m2-all-row-sacc", "lmul-all-k3-row-sacc"):
        kw, scope = PRESETS[arm]
        assert scope == "all" and kw["scaling"] == "row" and kw["acc_tile"] == 128 and kw["acc_block"] == 128
    with pytest.raises(ValueError, match="acc_tile=4 scales the running sums"):
        LMulSpec("e4m3", "bit", acc_tile=4)
    for bad in (-1, True, 2.0, "8"):
        with pytest.raises(ValueError, match="acc_tile must be an int"):
            LMulSpec("e4m3", "bit", acc="e4m3", acc_tile=bad)
