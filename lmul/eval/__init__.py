"""Offline evaluation of real LLMs under exact, fp8 and L-Mul arithmetic (paper §3.3, Tables 2-5).

``assets`` (PyPI wheels, sha256) -> ``tasks`` (lm-eval YAMLs + local data) -> ``harness``
(lm-eval glue) and ``divergence`` (KL / top-1 / bpb) -> ``run`` (resumable arms x tasks) ->
``stats`` / ``report``; ``cli`` adds ``lmul fetch | eval | report``. Importing this package is cheap:
torch, transformers and lm-eval are imported by the modules that need them.
"""
