"""``lmul analyze``: every error and cost figure in one seeded run, written to a directory.

Outputs (``--out DIR``): ``analysis.json`` (all numbers, config, versions), ``analysis.md`` (the
tables), ``exhaustive.png``, ``offset_sweep.png``, ``fig3_offsets.png``, ``fig4_bits.png``,
``hist_*.png``. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from lmul.analysis import errors, gates, plots, table7
from lmul.analysis.energy import claim_80, claim_95, paper_comparison, paper_comparison_markdown
from lmul.files import atomic_write, save_torch
from lmul.spec import offset_exponent

__all__ = ["AnalyzeConfig", "exhaustive_section", "offsets_section", "real_section", "gaussian_operands",
           "load_operands", "run_analysis"]


MAX_OFFSET_SEARCH_BITS = 8  # the bit-mode search tries all 2^k offsets on 4^k pairs


@dataclass(frozen=True)
class AnalyzeConfig:
    """What ``lmul analyze`` computes. ``operands``: a ``.pt`` file of captured pairs
    (:mod:`lmul.analysis.capture`); ``model`` + ``prompts``: capture them first."""

    out: str
    seed: int = 0
    max_bits: int = 7
    n_pairs: int = 200_000
    operands: Optional[str] = None
    model: Optional[str] = None
    prompts: Optional[str] = None
    max_prompts: int = 16
    max_tokens: int = 256
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_bits <= errors.MAX_EXHAUSTIVE_BITS:
            raise ValueError(f"max_bits must be in 1..{errors.MAX_EXHAUSTIVE_BITS}, got {self.max_bits}")
        if self.n_pairs < 100:
            raise ValueError(f"n_pairs must be >= 100, got {self.n_pairs}")
        if (self.model is None) != (self.prompts is None):
            raise ValueError("--model and --prompts go together (capture operands from a model on prompts)")
        if self.model is not None and self.operands is not None:
            raise ValueError("give either --operands FILE or --model/--prompts, not both")


def exhaustive_section(ks: range) -> dict:
    """``{arm: {k: stats}}`` over all mantissa pairs."""
    return {arm: {str(k): errors.exhaustive_stats(k, arm).as_dict() for k in ks} for arm in errors.EXHAUSTIVE_ARMS}


def offsets_section(ks: range) -> dict:
    out: dict = {"bit": {}, "formula": {}, "sweeps": {}}
    for k in ks:
        out["bit"][str(k)] = errors.best_offsets(k, "bit")
        out["formula"][str(k)] = errors.best_offsets(k, "formula")
        paper_c = 2.0 ** -offset_exponent(k)
        out["sweeps"][str(k)] = [{"offset": c, **s.as_dict(), "paper": c == paper_c}
                                 for c, s in errors.offset_sweep(k, "bit")]
    return out


def real_section(a: torch.Tensor, b: torch.Tensor, ks: range) -> dict:
    """Errors of L-Mul (bit mode, e8m{k}) for every valid offset exponent ``l <= k``, of the
    fp8 multiplies and of the MX-scaled formats (:data:`~lmul.analysis.errors.SCALED_ARMS`) on the
    operand pairs ``(a, b)``."""
    res: dict = {"n": int(a.numel()), "by_l": {}, "default": {}, "baselines": {}}
    for k in ks:
        res["by_l"][str(k)] = {
            str(le): errors.stats(errors.real_relative_errors(a, b, errors.real_arm(k, le))).as_dict()
            for le in range(1, k + 1)
        }
        res["default"][str(k)] = errors.stats(errors.real_relative_errors(a, b, errors.real_arm(k))).as_dict()
    for arm in errors.REAL_BASELINES:
        rel = errors.real_relative_errors(a, b, arm)
        flushed = float((rel == -1).double().mean())
        res["baselines"][arm.label] = {**errors.stats(rel).as_dict(), "flushed_to_zero": flushed}
    res["scaled"] = {}
    for arm in errors.SCALED_ARMS:  # MXFP8 / MXFP4: exact products of the elements beside L-Mul on them
        rel = errors.real_relative_errors(a, b, arm)
        flushed = float((rel == -1).double().mean())
        res["scaled"][arm.label] = {**errors.stats(rel).as_dict(), "flushed_to_zero": flushed}
    return res


def gaussian_operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.randn(n, generator=gen)


def load_operands(path: str) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--operands {path}: no such file") from None
    bad = [k for k, v in data.items() if k != "meta" and not (isinstance(v, (tuple, list)) and len(v) == 2)]
    if bad or not any(k != "meta" for k in data):
        raise ValueError(f"--operands {path}: expected {{kind: (a, b)}} pairs as written by lmul analyze --model")
    return data


def _capture(cfg: AnalyzeConfig, out: Path) -> dict:
    from lmul.analysis.capture import capture_operands, load_model, read_prompts

    model, tok = load_model(cfg.model)
    prompts = read_prompts(cfg.prompts, cfg.max_prompts)
    ids = [tok(p, return_tensors="pt").input_ids[:, : cfg.max_tokens] for p in prompts]
    n_layers = len(model.model.layers)
    layers = cfg.layers if cfg.layers is not None else sorted({0, n_layers // 2, n_layers - 1})
    per = max(1, cfg.n_pairs // (len(ids) * len(layers)))
    data = capture_operands(model, ids, per, cfg.seed, layers)
    data["meta"].update(model=str(cfg.model), prompts_file=str(cfg.prompts))
    save_torch(data, out / "operands.pt")
    return data


def _fmt_stats_table(section: dict, ks: range) -> str:
    lines = ["| arm | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for arm, by_k in section.items():
        cells = [f"{by_k[str(k)]['mean_abs']:.4f} / {by_k[str(k)]['max_abs']:.4f} / {by_k[str(k)]['rms']:.4f} / "
                 f"{by_k[str(k)]['bias']:+.4f}" for k in ks]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(res: dict, ks: range) -> str:
    md = [f"# L-Mul error and cost analysis (seed {res['config']['seed']})", "",
          "## Exhaustive relative error, all 4^k mantissa pairs (even distribution)", "",
          "Each cell: mean |r| / max |r| / RMS / bias, r = P/(xy) - 1 against the exact product of the "
          "k-bit operands. Arms: " + "; ".join(f"`{a}`: {d}" for a, d in errors.EXHAUSTIVE_ARMS.items()) + ".", "",
          _fmt_stats_table(res["exhaustive"], ks), "",
          "## Table 7 as the paper prints it: Eq. 4-5, bf16 operands (n = 7) truncated to k bits", "",
          "f1 = E[(1+xk)(1+yk) - (1+xm)(1+ym)], f2 = E[c - xk yk], x and y independent, mantissa "
          "fields from the named distribution; |·| of the signed expectations. The paper's 'real' rows "
          "are from five LLMs' parameters; `lmul table7 --weights smollm2,gemma3-270m` computes ours "
          "from model weights.", "",
          table7.paper_table7_markdown({"even": table7.even_distribution(),
                                        "log-uniform (Benford)": table7.log_distribution()}), "",
          "## Closed-form significand-error expectations, k-bit operands (even distribution)", "",
          "Signed E[approximation - exact] in units of 2^(xe+ye); |·| columns are the magnitudes.", "",
          table7.table7_markdown(res["table7"]), "",
          "The same as mean signed *relative* error E[P/(xy) - 1], exhaustive:", "",
          table7.relative_markdown(res["table7_relative"]), "",
          "## Best offsets (exhaustive)", "",
          "| k | mode | paper c = 2^-l(k): mean \\|r\\|, bias | c = 0 (bit: Mitchell) | argmin mean \\|r\\| | "
          "argmin RMS | argmin \\|bias\\| |",
          "|---|---|---|---|---|---|---|"]
    for mode in ("bit", "formula"):
        for k in sorted(int(x) for x in res["offsets"][mode]):
            b = res["offsets"][mode][str(k)]

            def cell(key, b=b):
                return f"c={b[key]['offset']:.6g}: {b[key]['mean_abs']:.4f}, {b[key]['bias']:+.4f}"

            md.append(f"| {k} | {mode} | {cell('paper')} | {cell('zero')} | {cell('min_mean_abs')} | "
                      f"{cell('min_mse')} | {cell('min_bias')} |")
    md += ["", "## Real operands (Figure 3 / Figure 4 analogs)", ""]
    for name, r in res["real"].items():
        md += [f"### {name} ({r['n']} pairs)", "",
               "Mean relative error against the float64 product of the unrounded operands (operand "
               "quantization included).", "",
               "| k | " + " | ".join(f"l={le}" for le in range(1, max(ks) + 1)) + " | paper l(k) |",
               "|---|" + "---|" * (max(ks) + 1)]
        for k in sorted(int(x) for x in r["by_l"]):
            cells = [f"{r['by_l'][str(k)][str(le)]['mean_abs']:.4f}" if str(le) in r["by_l"][str(k)] else ""
                     for le in range(1, max(ks) + 1)]
            md.append(f"| {k} | " + " | ".join(cells) + f" | {r['default'][str(k)]['mean_abs']:.4f} |")
        md += [""] + [f"- {label}: mean {s['mean_abs']:.4f}, RMS {s['rms']:.4f}, bias {s['bias']:+.4f}, "
                      f"flushed to zero {s['flushed_to_zero']:.2%}" for label, s in r["baselines"].items()] + [""]
        if r.get("scaled"):
            md += ["Scaled formats as run (OCP MX: every 32 consecutive values of each operand set share a "
                   "power-of-two E8M0 scale; elements in the format, saturating):", "",
                   "| arm | mean | RMS | max | bias | flushed to zero |", "|---|---|---|---|---|---|"]
            md += [f"| {label} | {s['mean_abs']:.4f} | {s['rms']:.4f} | {s['max_abs']:.4f} | {s['bias']:+.4f} | "
                   f"{s['flushed_to_zero']:.2%} |" for label, s in r["scaled"].items()] + [""]
    md += ["## Gate counts (NAND gates; full adder 11, half adder 5, XOR 4)", "", gates.gate_markdown(res["gates"]), "",
           "## The paper's gate counts and energy figures beside ours", "",
           paper_comparison_markdown(res["paper_comparison"]), "",
           "## Energy claims (Horowitz 2014, 45 nm)", "",
           f"- 95% (element-wise): {res['claims']['95']['steps']}",
           f"- 80% (dot product, fp32 accumulation): {res['claims']['80']['steps']}", ""]
    return "\n".join(md)


def run_analysis(cfg: AnalyzeConfig, progress=print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ks = range(1, cfg.max_bits + 1)
    real_ks = range(2, min(cfg.max_bits, 7) + 1)
    versions = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    res: dict = {"config": asdict(cfg), "versions": versions}
    progress("exhaustive statistics ...")
    res["exhaustive"] = exhaustive_section(ks)
    progress("Table 7 closed forms ...")
    res["table7"] = table7.table7_rows(range(1, min(cfg.max_bits, 7) + 1))
    res["table7_relative"] = table7.relative_rows(range(1, min(cfg.max_bits, 7) + 1))
    progress("offset search ...")
    res["offsets"] = offsets_section(range(1, min(cfg.max_bits, MAX_OFFSET_SEARCH_BITS) + 1))
    sets = {"N(0,1) x N(0,1) (synthetic)": gaussian_operands(cfg.n_pairs, cfg.seed)}
    data = None
    if cfg.model is not None:
        import transformers

        versions["transformers"] = transformers.__version__
        progress(f"capturing operands from {cfg.model} ...")
        data = _capture(cfg, out)
    elif cfg.operands is not None:
        data = load_operands(cfg.operands)
    if data is not None:
        names = {"qk": "Q x K^T", "pv": "P x V", "linear": "linear (activation x weight)"}
        gen = torch.Generator().manual_seed(cfg.seed)
        for kind, pair in data.items():
            if kind == "meta":
                continue
            a, b = pair
            if a.numel() > cfg.n_pairs:
                sel = torch.randperm(a.numel(), generator=gen)[: cfg.n_pairs]
                a, b = a[sel], b[sel]
            sets[names.get(kind, kind)] = (a, b)
        res["operands_meta"] = data.get("meta", {})
    progress("real-operand errors ...")
    res["real"] = {name: real_section(a, b, real_ks) for name, (a, b) in sets.items()}
    res["gates"] = gates.gate_table()
    res["claims"] = {"95": claim_95(), "80": claim_80()}
    res["paper_comparison"] = paper_comparison()
    res["table7_eq45"] = {"paper": {k: list(v) for k, v in table7.PAPER_TABLE7.items()},
                          "even": table7.eq45_rows(table7.even_distribution()),
                          "log-uniform": table7.eq45_rows(table7.log_distribution())}
    progress("plots ...")
    plots.plot_exhaustive(res["exhaustive"], out / "exhaustive.png")
    plots.plot_offset_sweep(res["offsets"]["sweeps"], out / "offset_sweep.png")
    plots.plot_offsets(res["real"], out / "fig3_offsets.png")
    plots.plot_bits(res["real"], res["exhaustive"], out / "fig4_bits.png")
    x, y = errors.grid_pairs(min(4, cfg.max_bits))
    kh = min(4, cfg.max_bits)
    plots.plot_histograms(
        {f"L-Mul bit k={kh}": errors.relative_errors(errors.arm_products(x, y, kh, "lmul-bit"), x, y),
         f"Mitchell k={kh}": errors.relative_errors(errors.arm_products(x, y, kh, "mitchell"), x, y),
         f"fp RNE k={kh}": errors.relative_errors(errors.arm_products(x, y, kh, "fp-rne"), x, y)},
        f"exhaustive, all {4**kh} pairs of {kh}-bit mantissas", out / "hist_exhaustive.png")
    for i, (name, (a, b)) in enumerate(sets.items()):
        arms = [errors.real_arm(3), errors.real_arm(4), *errors.REAL_BASELINES[:2]]
        plots.plot_histograms({arm.label: errors.real_relative_errors(a, b, arm) for arm in arms}, name,
                              out / f"hist_real_{i}.png")
    res["seconds"] = round(time.time() - t0, 2)
    atomic_write(out / "analysis.json", json.dumps(res, indent=1, default=str))
    atomic_write(out / "analysis.md", _markdown(res, ks))
    progress(f"wrote {out}/analysis.md, analysis.json and figures in {res['seconds']} s")
    return res
