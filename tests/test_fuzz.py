"""Fuzzing lmul.matmul (hypothesis): random torch.matmul shapes (broadcast batches, vectors, empty
dims), formats, modes and special values (zeros, subnormals, inf, NaN, values near float32's max)
on every available backend against the reference backend: the same inf/NaN pattern and signs, and
finite entries within the contract's float32-summation bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmul import kernels
from lmul.matmul import matmul
from lmul.spec import LMulSpec

SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 3.0e38, -3.3e38, 2.0**127, 448.0]


@st.composite
def shapes(draw):
    batch_a = draw(st.lists(st.integers(1, 3), max_size=2))
    batch_b = [draw(st.sampled_from([1, d])) for d in batch_a][len(batch_a) - draw(st.integers(0, len(batch_a))):]
    m, k, n = draw(st.integers(0, 5)), draw(st.integers(0, 9)), draw(st.integers(0, 5))
    a = [*batch_a, m, k] if draw(st.booleans()) else [k]
    b = [*batch_b, k, n] if draw(st.booleans()) else [k]
    return a, b


def _operand(shape, data, seed):
    g = torch.Generator().manual_seed(seed)
    scale = data.draw(st.sampled_from([1.0, 2.0**60, 2.0**-70]))
    x = torch.randn(*shape, generator=g) * scale
    if x.numel():
        for _ in range(data.draw(st.integers(0, 3))):
            i = data.draw(st.integers(0, x.numel() - 1))
            x.view(-1)[i] = data.draw(st.sampled_from(SPECIAL))
    return x


@settings(max_examples=60, deadline=None)
@given(shape=shapes(), fmt=st.sampled_from(["e4m3", "e5m2", "bf16", "fp16", "e8m3", "fp32"]),
       mode=st.sampled_from(["bit", "formula", "exact"]), seed=st.integers(0, 2**16), data=st.data())
def test_every_backend_agrees_with_the_reference(shape, fmt, mode, seed, data):
    a, b = _operand(shape[0], data, seed), _operand(shape[1], data, seed + 1)
    spec = LMulSpec(fmt, mode)
    want = matmul(a, b, spec=spec.replace(backend="reference"))
    assert want.shape == torch.matmul(a, b).shape
    k = a.shape[-1]
    for entry in kernels.BACKENDS:
        if entry.op != "matmul" or entry.name == "reference" or entry.unavailable(a, spec):
            continue
        if entry.name == "triton" and a.numel() * b.numel() > 4000:
            continue  # Triton's CPU interpreter is slow
        got = matmul(a, b, spec=spec.replace(backend=entry.name))
        assert got.shape == want.shape, entry.name
        assert torch.equal(torch.isnan(got), torch.isnan(want)), entry.name
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf), entry.name
        assert torch.equal(got[inf], want[inf]), entry.name
        fin = torch.isfinite(want)
        # |C - C_ref| <= K 2^-24 sum|P| + ulp; sum|P| <= 4 K max|a| max|b| bounds it from above
        mag = (a.abs().nan_to_num(0, 0, 0).amax() if a.numel() else 0) * (
            b.abs().nan_to_num(0, 0, 0).amax() if b.numel() else 0)
        bound = 4.0 * max(k, 1) ** 2 * 2.0**-24 * float(mag) * 2 + 1e-45
        if fin.any():
            err = (got[fin].double() - want[fin].double()).abs().max().item()
            assert err <= bound, (entry.name, err, bound)


def test_fuzz_covers_the_fast_backends():
    spec = LMulSpec("e4m3")
    names = {e.name for e in kernels.BACKENDS if e.op == "matmul" and not e.unavailable(torch.ones(1), spec)}
    if "cpu" not in names:
        pytest.skip("no compiled CPU backend here")
    assert {"cpu", "decompose"} <= names
