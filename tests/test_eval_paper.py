"""Every number of lmul.eval.paper.PAPER equals the transcription in ../shared/PAPER.md (parsed here,
so a transcription slip fails); skipped where shared/ is absent (a user's clone)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lmul.eval.paper import MODELS, PAPER, paper_delta

_SHARED = Path(os.environ.get("LMUL_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
PAPER_MD = _SHARED / "PAPER.md"
pytestmark = pytest.mark.skipif(not PAPER_MD.exists(), reason=f"{PAPER_MD} absent (the project's shared/ folder)")


def _tables() -> dict[str, list[list[str]]]:
    """Markdown tables of PAPER.md under each '## Table N' heading, as rows of cells."""
    out, current = {}, None
    for line in PAPER_MD.read_text().splitlines():
        m = re.match(r"## Table (\d)", line)
        if m:
            current = f"table{m[1]}"
            out[current] = []
        elif current and line.startswith("|") and not re.match(r"\|[-| ]+\|$", line):
            out[current].append([c.strip() for c in line.strip("|").split("|")])
    return out


_PREC = {"BFloat16": "bf16", "Float8 e4m3": "e4m3", "Float8 e5m2": "e5m2", "L-Mul": "lmul"}
_NAME = {"Mistral-7b-Instruct-v0.3": "mistral", "Llama-3.1-8B-Instruct": "llama", "Mistral": "mistral",
         "Llama": "llama", "Gemma2-2b-It": "gemma2", "Llama3.1-8b-Instruct (printed \"7b\")": "llama"}


def _expected() -> dict:
    t = _tables()
    want = {}
    head = t["table2"][0]
    cols = ["bbh", "mmlu", "arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa", "avg"]
    assert head[2:] == ["BBH", "MMLU", "ARC-C", "CSQA", "OBQA", "PIQA", "SIQA", "Avg."]
    model = None
    for row in t["table2"][1:]:
        model = _NAME[row[0]] if row[0] else model
        for c, v in zip(cols, row[2:], strict=True):
            want[("table2", model, _PREC[row[1]], c)] = float(v)
    assert t["table3"][0] == ["model", "BF16", "e4m3", "e5m2", "L-Mul"]
    for row in t["table3"][1:]:
        if row[0] == "Average":
            continue
        for arm, v in zip(("bf16", "e4m3", "e5m2", "lmul"), row[1:], strict=True):
            want[("table3", _NAME[row[0]], arm, "gsm8k")] = float(v)
    assert t["table5"][0] == ["model", "e4m3", "e5m2", "L-Mul k=4", "k=3", "k=2"]
    for row in t["table5"][1:]:
        for arm, v in zip(("e4m3", "e5m2", "lmul-k4", "lmul-k3", "lmul-k2"), row[1:], strict=True):
            want[("table5", _NAME[row[0]], arm, "mmlu")] = float(v)
        want[("table5", _NAME[row[0]], "bf16", "mmlu")] = want[("table2", _NAME[row[0]], "bf16", "mmlu")]
    assert t["table6"][0] == ["8-bit accumulation", "e4m3", "e5m2", "L-Mul"]
    for arm, v in zip(("e4m3", "e5m2", "lmul-all"), t["table6"][1][1:], strict=True):
        want[("table6", "gemma2", arm, "gsm8k")] = float(v)
    return want


def test_every_number_equals_paper_md():
    assert PAPER == _expected()


def test_models_and_deltas():
    assert set(MODELS) >= {m for _, m, _, _ in PAPER}
    assert paper_delta("table2", "llama", "e5m2", "avg") == -2.38
    assert paper_delta("table2", "mistral", "bf16", "piqa") is None
    assert paper_delta("table6", "gemma2", "lmul-all", "gsm8k") == 1.82
