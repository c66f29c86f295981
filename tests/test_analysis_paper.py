"""Every paper number lmul.analysis uses equals the transcription in ../shared/PAPER.md.

The markdown is parsed here, so a transcription slip in the code fails. Skipped where the shared
folder is absent (a user's clone); set LMUL_SHARED_DIR to point at it.
"""

import os
import re
from pathlib import Path

import pytest

from lmul.analysis import energy, gates, table7

PAPER = Path(os.environ.get("LMUL_SHARED_DIR", Path(__file__).parents[2] / "shared")) / "PAPER.md"
pytestmark = pytest.mark.skipif(not PAPER.is_file(), reason=f"{PAPER} absent (set LMUL_SHARED_DIR)")


def _section(title: str) -> str:
    text = PAPER.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start: end if end > 0 else None]


def _table(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set("-: ") for c in r)]


def test_table7():
    rows = _table(_section("Table 7"))
    assert rows[0] == ["K", "1", "2", "3", "4", "5", "6"]
    parsed = {r[0]: tuple(float(v) for v in r[1:]) for r in rows[1:]}
    assert parsed == table7.PAPER_TABLE7


def test_table1():
    rows = _table(_section("Table 1"))
    cols = rows[0][1:]
    parsed = {}
    for r in rows[1:]:
        op = {"addition": "add", "multiplication": "mul"}[r[0]]
        for col, cell in zip(cols, r[1:], strict=True):
            parsed[(op, col)] = float(cell.removesuffix(" pJ"))
    assert parsed == energy.TABLE1


def test_gate_counts_and_energy_claims():
    sec = _section("Gate counts")

    def num(pattern: str) -> float:
        m = re.search(pattern, sec)
        assert m, pattern
        return float(m.group(1))

    paper = {
        ("multiplier", "fp16"): num(r"Multipliers: fp16 ≈ (\d+)"), ("multiplier", "e4m3"): num(r"e4m3 ≈ (\d+)"),
        ("multiplier", "e5m2"): num(r"e5m2 ≈ (\d+)"), ("lmul", "fp16"): num(r"L-Mul: fp16 ≈ (\d+)"),
        ("lmul", "e4m3"): num(r"fp8 ≈ (\d+);"), ("lmul", "e5m6"): num(r"12-bit ≈ (\d+)"),
    }
    assert paper == gates.PAPER_COUNTS
    assert (num(r"full adder = (\d+)"), num(r"half adder = (\d+)"), num(r"XOR = (\d+) NAND")) == (
        gates.FULL_ADDER, gates.HALF_ADDER, gates.XOR)
    c = energy.PAPER_CLAIMS
    assert num(r'"(\d+)%" \(element-wise\)') / 100 == c["element_wise_saving"]
    assert num(r'"(\d+)%" \(dot product\)') / 100 == c["dot_product_saving"]
    assert num(r"fp32 multiply = (\d+)×\s+an\s+int32\s+add") == c["fp32_mul_over_int32_add"]
    assert (num(r"approximately\s+([\d.]+)\s+pJ\s+to"), num(r"pJ\s+to\s+([\d.]+)\s+pJ")) == c["fp8_mul_pj"]
    assert num(r"16-bit L-Mul uses\s+around ([\d.]+) pJ") == c["lmul16_pj"]
    m = re.search(r"1 − \(([\d.]+) \+ ([\d.]+)\)/\(([\d.]+) \+ ([\d.]+)\) = (\d+)%", sec)
    assert m
    lm, add, mul, add2, pct = (float(g) for g in m.groups())
    assert (lm, pct / 100) == (c["fp16_lmul_pj"], c["fp16_saving"])
    assert (add, mul, add2) == (energy.TABLE1[("add", "fp16")], energy.TABLE1[("mul", "fp16")],
                                energy.TABLE1[("add", "fp16")])
