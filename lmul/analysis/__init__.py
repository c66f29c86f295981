"""Error and cost analysis of L-Mul (paper §2.3, Tables 1 and 7, Figures 3-4).

* :mod:`lmul.analysis.errors`: exact error statistics over every mantissa pair, offset search,
  errors on real operand pairs;
* :mod:`lmul.analysis.table7`: closed-form expectations for evenly distributed mantissas;
* :mod:`lmul.analysis.gates`: NAND-gate counts with the paper's unit costs;
* :mod:`lmul.analysis.energy`: Table 1 energies, the 95%/80% claims, operation counts of a
  transformer forward and its arithmetic vs DRAM energy;
* :mod:`lmul.analysis.capture`: operands of a Hugging Face Llama-style model via forward hooks;
* :mod:`lmul.analysis.plots`, :mod:`lmul.analysis.report`, :mod:`lmul.analysis.commands`: figures,
  the ``lmul analyze`` run, and the ``analyze``/``energy`` subcommands.

Importing this package imports nothing heavy; matplotlib and transformers load on first use.
See ``docs/analysis.md``.
"""
