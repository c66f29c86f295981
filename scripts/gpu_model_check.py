"""Patched-model check for the GPU backends (part of ``make gpu-check``):
``python scripts/gpu_model_check.py [--out DIR] [--dry-run]``.

A Llama with SmolLM2-135M's config (random weights, seed 0; ``--dry-run``: a 2-layer toy on the
CPU, Triton kernels in the interpreter) is patched with L-Mul attention three ways — ``triton-tc``
formula bf16, ``triton-tc`` bit e4m3, ``triton`` bit bf16 — and run on a few sequences. Every
L-Matmul call the backend receives is captured and checked against the ``reference`` backend on
the same operands: single products (K = 1 slices at three k) bit for bit, and the sums within
the contract's bound ``|C - C_ref| <= K 2^-24 sum|P| + ulp`` (docs/semantics.md section 4). The
logits of the backend-patched and the reference-patched model are compared too (reported:
summation order differs, so they are not bit-identical after 30 layers). Writes
``model_check.json``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

CHECKS = [  # (name, patch keyword options)
    ("triton-tc formula bf16", dict(fmt="bf16", mode="formula", backend="triton-tc")),
    ("triton-tc bit e4m3", dict(fmt="e4m3", mode="bit", backend="triton-tc")),
    ("triton bit bf16", dict(fmt="bf16", mode="bit", backend="triton")),
]


class Capture:
    """Within ``with``: the matmul backend ``name`` records each call's (a, b, spec) (at most
    ``limit``) — a swap of its entry in the backend table, restored on exit."""

    def __init__(self, name: str, limit: int):
        from lmul import kernels

        self.kernels, self.key, self.limit, self.calls = kernels, ("matmul", name), limit, []

    def __enter__(self):
        entry = self.old = self.kernels._BY_KEY[self.key]

        def spy(a, b, spec):
            if len(self.calls) < self.limit:
                self.calls.append((a.detach().clone(), b.detach().clone(), spec))
            return entry.fn(a, b, spec)
        self.kernels._BY_KEY[self.key] = dataclasses.replace(entry, fn=spy)
        return self

    def __exit__(self, *exc):
        self.kernels._BY_KEY[self.key] = self.old


def _product_mismatches(fn, a, b, spec) -> int:
    """K = 1 slices at three k: the backend's single products against lmul.mul, as int32 views."""
    from lmul import mul

    bad = 0
    for k in sorted({0, a.shape[-1] // 2, a.shape[-1] - 1}):
        out = fn(a[..., k:k + 1].contiguous(), b[..., k:k + 1, :].contiguous(), spec)
        want = mul(a[..., k:k + 1], b[..., k:k + 1, :], spec=spec.replace(backend="reference"))
        nan = torch.isnan(out) | torch.isnan(want)
        ob, wb = out.masked_fill(nan, 0).view(torch.int32), want.masked_fill(nan, 0).view(torch.int32)
        ob, wb = torch.where(ob == -(2**31), 0, ob), torch.where(wb == -(2**31), 0, wb)   # +0 == -0
        bad += int((ob != wb).sum()) + int((torch.isnan(out) != torch.isnan(want)).sum())
    return bad


def _sum_violations(out, a, b, spec) -> tuple[int, float]:
    """Sums beyond K 2^-24 sum|P| + ulp(C_ref) + K 2^-149 (the bound the tests use), and the worst
    |C - C_ref| / bound."""
    from lmul.formats import quantize
    from lmul.matmul import matmul
    from lmul.ops import products

    ref = matmul(a, b, spec=spec.replace(backend="reference"))
    aq, bq = quantize(a, spec.fmt, spec.rounding), quantize(b, spec.fmt, spec.rounding)
    sabs = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
    for k0 in range(0, a.shape[-1], 16):  # sum |P| in k chunks (memory)
        p = products(aq[..., :, k0:k0 + 16, None], bq[..., None, k0:k0 + 16, :], spec.fmt, spec.mode, spec.offset)
        sabs += p.double().abs().sum(-2)
    k = a.shape[-1]
    ulp = (torch.nextafter(ref.abs(), torch.tensor(float("inf"), device=ref.device)) - ref.abs()).double()
    tol = k * 2.0**-24 * sabs + ulp + k * 2.0**-149
    finite = torch.isfinite(ref)
    err = (out.double() - ref.double()).abs()
    bad = int((finite & (err > tol)).sum()) + int((torch.isnan(out) != torch.isnan(ref)).sum())
    worst = float((err[finite] / tol[finite]).max()) if bool(finite.any()) else 0.0
    return bad, worst


def _model(device, dry: bool):
    import transformers as T

    if dry:
        cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:  # SmolLM2-135M
        cfg = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu-check", help="folder for model_check.json")
    parser.add_argument("--dry-run", action="store_true", help="a toy model on the CPU (Triton interpreter)")
    parser.add_argument("--seqs", type=int, default=3, help="sequences (batch)")
    parser.add_argument("--len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--calls", type=int, default=12, help="captured L-Matmul calls checked per backend")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("scripts/gpu_model_check.py: no CUDA device; pass --dry-run for the CPU check", file=sys.stderr)
        return 2
    import lmul
    from lmul import kernels

    device = torch.device("cpu" if args.dry_run else "cuda")
    seqs, length = (2, 8) if args.dry_run else (args.seqs, args.len)
    model = _model(device, args.dry_run)
    ids = torch.randint(0, model.config.vocab_size, (seqs, length), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    report, ok = [], True
    with torch.no_grad():
        for name, options in CHECKS:
            t0 = time.time()
            backend = options["backend"]
            entry = kernels.get("matmul", backend)
            with Capture(backend, args.calls) as cap, lmul.patch(model, scope="attention", **options):
                logits = model(ids).logits
            ref_opts = dict(options, backend="reference")
            with lmul.patch(model, scope="attention", **ref_opts):
                ref_logits = model(ids).logits
            products_bad, sums_bad, worst = 0, 0, 0.0
            for a, b, spec in cap.calls:
                products_bad += _product_mismatches(entry.fn, a, b, spec)
                out = entry.fn(a, b, spec)
                bad, w = _sum_violations(out, a, b, spec)
                sums_bad, worst = sums_bad + bad, max(worst, w)
            diff = (logits - ref_logits).abs()
            row = dict(check=name, calls_checked=len(cap.calls), shapes=sorted({f"{tuple(a.shape)}x{tuple(b.shape)}"
                                                                                 for a, b, _ in cap.calls}),
                       product_mismatches=products_bad, sum_violations=sums_bad, worst_error_over_bound=worst,
                       logits_max_abs_diff=float(diff.max()), logits_max_abs=float(ref_logits.abs().max()),
                       logits_bit_identical=bool(torch.equal(logits, ref_logits)), seconds=time.time() - t0)
            passed = len(cap.calls) > 0 and products_bad == 0 and sums_bad == 0
            row["passed"] = passed
            ok &= passed
            report.append(row)
            print(json.dumps(row), flush=True)
    from lmul.files import atomic_write

    atomic_write(Path(args.out) / "model_check.json", json.dumps(dict(device=str(device), seqs=seqs, length=length,
                                                                      checks=report), indent=1) + "\n")
    print("model check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:] and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.exit(main())
