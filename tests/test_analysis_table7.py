"""Closed-form Table 7 expectations against independent exhaustive enumeration.

The paper's printed Table 7 digits could not be obtained in this project (see docs/analysis.md),
so these tests check the closed forms, not the printed values.
"""

from fractions import Fraction

import pytest
import torch

from lmul.analysis import errors, table7


def _mean(k, f):
    n = 2**k
    return sum((f(Fraction(a, n), Fraction(b, n)) for a in range(n) for b in range(n)), Fraction(0)) / (n * n)


@pytest.mark.parametrize("k", range(1, 8))
def test_lmul_expectation_brute_force(k):
    for c in (Fraction(1, 16), Fraction(1, 2 ** (k if k <= 3 else (3 if k == 4 else 4)))):
        # (1 + xm + ym + c) - (1 + xm)(1 + ym), averaged over every pair
        ref = _mean(k, lambda xm, ym, c=c: (1 + xm + ym + c) - (1 + xm) * (1 + ym))
        assert table7.lmul_expectation(k, c) == ref
    assert table7.lmul_expectation(k) == table7.lmul_expectation(k, Fraction(1, 2 ** errors.offset_exponent(k)))


@pytest.mark.parametrize("k", range(1, 8))
def test_truncation_expectation_brute_force(k):
    grid = Fraction(1, 2**k)

    def trunc_err(xm, ym):  # keep k fraction bits of 1 + xm + ym + xm ym (no renormalisation)
        v = 1 + xm + ym + xm * ym
        return (v // grid) * grid - v

    assert table7.truncation_expectation(k) == _mean(k, trunc_err)


@pytest.mark.parametrize("k", range(1, 8))
def test_normalised_truncation_matches_lmul_quantize(k):
    # a second implementation: lmul's exact product truncated with formats.quantize, exponent 0,
    # so the absolute error is the significand error
    x, y = errors.grid_pairs(k)
    p = errors.arm_products(x, y, k, "fp-trunc").double()
    mean = (p - x.double() * y.double()).mean().item()
    assert mean == pytest.approx(float(table7.normalised_truncation_expectation(k)), abs=1e-15)


def test_hand_values():
    assert table7.lmul_expectation(1, Fraction(1, 16)) == 0  # 1/16 - (1/4)^2
    assert table7.lmul_expectation(3, Fraction(1, 16)) == Fraction(-33, 256)
    assert table7.lmul_expectation(3) == Fraction(-17, 256)  # c = 2^-3
    assert table7.truncation_expectation(1) == Fraction(-1, 16)
    # c = 2^-4 and 2^-l(k) agree for k >= 5 (l = 4), differ below
    rows = table7.table7_rows()
    assert [r["lmul_c_2^-4"] == r["lmul_c_2^-l(k)"] for r in rows] == [False] * 4 + [True] * 3
    assert "-33/256" in table7.table7_markdown(rows)


def test_bad_k():
    with pytest.raises(ValueError, match="mantissa bits"):
        table7.lmul_expectation(0)
    with pytest.raises(ValueError, match="mantissa bits"):
        table7.truncation_expectation(17)
    assert torch.is_tensor(errors.mantissa_grid(1))


def test_relative_rows_by_hand():
    # k = 1, formula mode, c = 1/16: pairs (1,1), (1,1.5), (1.5,1), (1.5,1.5)
    # relative errors 1/16, 1.5625/1.5 - 1 (twice), 2.0625/2.25 - 1 -> mean 1/64
    row = table7.relative_rows(range(1, 2))[0]
    assert row["formula_c_2^-4"] == pytest.approx(1 / 64, abs=1e-15)
    assert row["trunc"] == pytest.approx(-1 / 36, abs=1e-15)  # only 2.25 -> 2 loses: -1/9 / 4


# --- Table 7 as printed: Eq. 4-5 with n = 7 (bf16) operands truncated to k bits ----------------


def _eq45_enumerated(p, k, c):
    """Oracle: every pair of 7-bit fields (a, b), weighted p[a] p[b], float64, truncation by shifts."""
    import numpy as np

    p = np.asarray(p, dtype=np.float64)
    a = np.arange(128)
    xm, xk = a / 128.0, (a >> (7 - k)) / 2.0**k
    exact = np.outer(1 + xm, 1 + xm)
    e1 = np.outer(1 + xk, 1 + xk) - exact          # k-bit operands, exact multiply
    el = (1 + xk[:, None] + xk[None, :] + c) - exact  # L-Mul (Eq. 1) on the k-bit operands
    w = np.outer(p, p)
    return float((w * e1).sum()), float((w * el).sum())


@pytest.mark.parametrize("k", range(1, 7))
@pytest.mark.parametrize("dist", ["even", "log", "random", "spiky"])
def test_eq45_against_enumeration(k, dist):
    gen = torch.Generator().manual_seed(k)
    p = {"even": table7.even_distribution(), "log": table7.log_distribution(),
         "random": torch.rand(128, generator=gen, dtype=torch.float64),
         "spiky": torch.zeros(128, dtype=torch.float64).index_fill_(0, torch.tensor([0, 5, 64, 127]), 1.0)}[dist]
    p = p / p.sum()
    for c in (1 / 16, 2.0 ** -errors.offset_exponent(k)):
        f1, f2 = table7.eq45_expectations(p, k, c)
        ref_f1, ref_lmul = _eq45_enumerated(p.numpy(), k, c)
        assert f1 == pytest.approx(ref_f1, abs=1e-14)
        assert f1 + f2 == pytest.approx(ref_lmul, abs=1e-14)
    assert table7.eq45_expectations(p, k) == table7.eq45_expectations(p, k, 2.0 ** -errors.offset_exponent(k))


def test_eq45_even_hand_values():
    # uniform 7-bit fields: E[xm] = 127/256, E[x1] = 1/4; f1 = 2 (1/4 - 127/256) + 1/16 - (127/256)^2
    f1, f2 = table7.eq45_expectations(table7.even_distribution(), 1, 1 / 16)
    assert f1 == pytest.approx(float(Fraction(-44289, 65536)), abs=1e-15)
    assert f2 == 0  # 1/16 - (1/4)^2
    f1, f2 = table7.eq45_expectations(table7.even_distribution(), 3)  # c = 2^-3, E[x3] = 7/16
    assert f1 + f2 == pytest.approx(float(2 * (Fraction(7, 16) - Fraction(127, 256)) + Fraction(49, 256)
                                          - Fraction(127, 256) ** 2 + Fraction(1, 8) - Fraction(49, 256)), abs=1e-15)
    assert table7.log_distribution().sum().item() == pytest.approx(1.0, abs=1e-12)


def _bf16(a, e):
    return (1 + a / 128) * 2.0**e  # exactly representable in bf16 for a < 128, |e| < 127


def test_mantissa_histogram_synthetic():
    gen = torch.Generator().manual_seed(0)
    fields = torch.randint(0, 128, (5000,), generator=gen)
    exps = torch.randint(-30, 30, (5000,), generator=gen)
    signs = torch.where(torch.rand(5000, generator=gen) < 0.5, -1.0, 1.0)
    vals = [s * _bf16(int(a), int(e)) for a, e, s in zip(fields, exps, signs.tolist(), strict=True)]
    extra = [0.0, -0.0, 1e-40, float("inf"), float("nan"),
             1 + 2**-8 + 2**-9,  # RNE to 1 + 2^-7: field 1
             1 + 2**-8,          # tie, to even: 1.0, field 0
             1 + 3 * 2**-8]      # tie, to even: 1 + 2^-6, field 2
    t = torch.tensor(vals + extra, dtype=torch.float32)
    h = table7.mantissa_histogram([t[:2000], t[2000:].double()])
    ref = [0] * 128
    for a in fields.tolist() + [1, 0, 2]:
        ref[a] += 1
    assert h["counts"] == ref
    assert (h["normal"], h["zero"], h["subnormal"], h["nonfinite"]) == (5003, 2, 1, 2)


def test_weight_distributions_groups_and_tied():
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.Module()
    model.embed_tokens, model.lin, model.norm = emb, torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = emb.weight  # tied: counted once
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        model.norm.bias.zero_()
    d = table7.weight_distributions(model)
    assert d["embedding"]["normal"] + d["embedding"]["zero"] == 40
    assert d["1-D (norms, biases)"]["counts"][0] == 4 and d["1-D (norms, biases)"]["zero"] == 4
    assert d["all parameters"]["normal"] + d["all parameters"]["zero"] == 40 + 16 + 8


def test_eq45_bad_input():
    with pytest.raises(ValueError, match="probability"):
        table7.eq45_expectations(torch.ones(128), 3)
    with pytest.raises(ValueError, match="2\\^n"):
        table7.eq45_expectations(torch.ones(100) / 100, 3)
    with pytest.raises(ValueError, match="floating-point"):
        table7.mantissa_histogram([torch.ones(3, dtype=torch.int32)])


def test_paper_table7_markdown_has_both():
    md = table7.paper_table7_markdown({"even": table7.even_distribution()})
    assert "| **paper** real, abs[f1+f2] | 0.16 | 0.18 | 0.18 | 0.12 | 0.15 | 0.14 |" in md
    assert "| ours, even: abs[f1+f2], c = 2^-4 | 0.676 | 0.426 | 0.301 | 0.238 | 0.207 | 0.191 |" in md


@pytest.mark.assets
def test_real_smollm2_weights():
    from lmul.eval import assets

    if not assets.is_fetched(assets.SMOLLM2):
        pytest.skip("SmolLM2 GGUF not fetched (lmul fetch)")
    res = table7.real_table7(["smollm2"], progress=lambda *_: None)
    h = res["models"]["smollm2"]["groups"]["all parameters"]
    assert h["normal"] + h["zero"] + h["subnormal"] + h["nonfinite"] == 134_515_008
    assert h["nonfinite"] == 0
    assert [r["k"] for r in res["models"]["smollm2"]["groups"]["all parameters"]["rows"]] == list(range(1, 7))
