"""The paper's published accuracies (Luo & Sun, arXiv:2410.00907 v2), as transcribed in the project's
``shared/PAPER.md`` (Tables 2, 3, 5, 6); ``tests/test_eval_paper.py`` parses that file and checks every
number here against it. The paper's models (Mistral-7B, Llama-3.1-8B, Gemma2-2B) are not ours, so
reports compare *differences*: each arm against the paper's own BFloat16 row, beside ours against
``exact`` (:func:`paper_delta`).

Keys are ``(table, model, arm, task)``, values accuracies in %; arms are named as ours
(``bf16`` = the paper's BFloat16 row, the reference of its differences).
"""

from __future__ import annotations

from typing import Optional

__all__ = ["PAPER", "MODELS", "paper_delta", "REFERENCE"]

MODELS = {"mistral": "Mistral-7b-Instruct-v0.3", "llama": "Llama-3.1-8B-Instruct", "gemma2": "Gemma2-2b-It"}
_T2_TASKS = ("bbh", "mmlu", "arc_challenge", "commonsense_qa", "openbookqa", "piqa", "social_iqa", "avg")
_T2 = {
    ("mistral", "bf16"): (55.85, 62.20, 75.94, 71.42, 76.20, 80.74, 44.83, 69.83),
    ("mistral", "e4m3"): (55.16, 62.18, 75.39, 71.25, 76.00, 80.47, 44.63, 69.55),
    ("mistral", "e5m2"): (53.20, 61.75, 74.91, 71.25, 74.40, 79.76, 44.52, 68.97),
    ("mistral", "lmul"): (55.87, 62.19, 76.11, 71.09, 76.60, 80.52, 45.34, 69.93),
    ("llama", "bf16"): (70.79, 68.86, 82.51, 74.53, 84.20, 84.00, 45.96, 74.24),
    ("llama", "e4m3"): (69.91, 68.16, 81.66, 74.28, 82.20, 83.51, 45.34, 73.40),
    ("llama", "e5m2"): (62.94, 66.61, 80.12, 73.30, 79.40, 81.07, 45.39, 71.86),
    ("llama", "lmul"): (70.78, 68.54, 82.17, 74.28, 84.20, 83.30, 46.06, 74.00),
}
_T3 = {  # GSM8k few-shot CoT, attention only: BF16, e4m3, e5m2, L-Mul
    "mistral": (52.54, 52.39, 50.19, 52.92), "llama": (76.12, 75.44, 71.80, 75.63),
    "gemma2": (45.87, 45.94, 44.43, 47.01),
}
_T5 = {  # MMLU, k-bit L-Mul in attention: e4m3, e5m2, k=4, k=3, k=2
    "mistral": (62.18, 61.75, 62.16, 62.06, 61.08), "llama": (68.16, 66.61, 68.43, 68.12, 66.67),
}
_T6 = {"gemma2": (36.09, 7.96, 37.91)}  # every multiply, fine-tuned, GSM8k zero-shot: e4m3, e5m2, L-Mul

PAPER: dict[tuple[str, str, str, str], float] = {}
for (model, arm), row in _T2.items():
    PAPER.update({("table2", model, arm, task): v for task, v in zip(_T2_TASKS, row, strict=True)})
for model, row in _T3.items():
    PAPER.update({("table3", model, arm, "gsm8k"): v for arm, v in zip(("bf16", "e4m3", "e5m2", "lmul"), row,
                                                                           strict=True)})
for model, row in _T5.items():
    PAPER.update({("table5", model, arm, "mmlu"): v for arm, v in zip(("e4m3", "e5m2", "lmul-k4", "lmul-k3",
                                                                          "lmul-k2"), row, strict=True)})
    PAPER[("table5", model, "bf16", "mmlu")] = _T2[(model, "bf16")][1]  # Table 5 prints no bf16: Table 2's MMLU
for model, row in _T6.items():
    PAPER.update({("table6", model, arm, "gsm8k"): v for arm, v in zip(("e4m3", "e5m2", "lmul-all"), row,
                                                                           strict=True)})

# the reference row of each table's differences (Table 6 prints no bf16 row: its e4m3 row)
REFERENCE = {"table2": "bf16", "table3": "bf16", "table5": "bf16", "table6": "e4m3"}


def paper_delta(table: str, model: str, arm: str, task: str) -> Optional[float]:
    """The paper's ``arm`` minus its reference row (:data:`REFERENCE`) on ``task``, in points, or None."""
    ref = REFERENCE[table]
    a, r = PAPER.get((table, model, arm, task)), PAPER.get((table, model, ref, task))
    return None if a is None or r is None or arm == ref else round(a - r, 2)
