"""Fine-tuning through L-Mul (paper Table 6): train a model with every multiplication under each
arm, evaluate it under the same arithmetic and under exact arithmetic, report beside the paper.

``lmul finetune`` (:mod:`lmul.finetune.cli`) runs :func:`run`; :func:`readings` measures what each
reading of "8-bit accumulation" does at inference; :func:`build` writes the report."""

from lmul.finetune.report import build, is_finetune_run
from lmul.finetune.run import DEFAULT_ARMS, QUICK, READ_BLOCKS, FinetuneConfig, readings, run

__all__ = ["DEFAULT_ARMS", "QUICK", "READ_BLOCKS", "FinetuneConfig", "build", "is_finetune_run", "readings", "run"]
