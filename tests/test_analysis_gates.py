"""Gate counts with the paper's unit costs (full adder 11, half adder 5, XOR 4)."""

import pytest

from lmul.analysis import gates
from lmul.formats import Format


def test_adder():
    assert gates.adder(1) == 5
    assert gates.adder(8) == 82  # the paper's 8-bit exponent-offset adder
    with pytest.raises(ValueError):
        gates.adder(0)


@pytest.mark.parametrize("fmt,expected", [("e4m3", 157), ("e5m2", 157), ("e5m6", 201), ("fp16", 245)])
def test_lmul_counts(fmt, expected):
    g = gates.lmul_gates(fmt)
    assert g.total == expected
    f = Format.parse(fmt)
    assert g.total == 4 + 5 + 11 * (f.exp_bits + f.man_bits - 1) + 82  # XOR + (i+j)-bit adder + 8-bit adder


def test_paper_fp16_lmul_misprint():
    assert gates.PAPER_COUNTS[("lmul", "fp16")] == 256 != gates.lmul_gates("fp16").total


def test_fp16_multiplier_printed_count_below_any_array_multiplier():
    # 11x11 partial products (121 bits) must shrink to 22 bits; a full adder removes one bit, a half adder none
    assert gates.mantissa_multiplier_lower_bound(10) == 121 + 11 * 99
    assert gates.mantissa_multiplier_lower_bound(10) > gates.PAPER_COUNTS[("multiplier", "fp16")]


def test_multiplier_model_and_table():
    rows = {r["unit"]: r for r in gates.gate_table()}
    for name in ("multiplier fp8 e4m3", "multiplier fp8 e5m2", "multiplier fp16"):
        r = rows[name]
        assert r["rules"] == sum(r["items"].values())
        assert r["lower_bound"] <= r["rules"]
        assert r["rules"] != r["paper"]  # the printed counts do not follow from the stated ingredients
    assert rows["L-Mul fp8 e4m3"]["rules"] == rows["L-Mul fp8 e4m3"]["paper"] == 157
    assert rows["L-Mul 12-bit e5m6"]["rules"] == rows["L-Mul 12-bit e5m6"]["paper"] == 201
    assert "| L-Mul fp16 | 256 | 245 |" in gates.gate_markdown(gates.gate_table())
