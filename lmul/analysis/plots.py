"""PNG figures of the error and energy analysis (matplotlib, Agg backend, set on first use)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmul.files import save_figure

__all__ = ["plot_offsets", "plot_bits", "plot_exhaustive", "plot_offset_sweep", "plot_histograms", "plot_energy"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_offsets(real: dict, path: Path) -> Path:
    """Figure 3 analog: mean relative error of L-Mul per offset exponent l, one line per k, the
    fp8 multiplies as horizontal lines; one panel per operand set."""
    plt = _plt()
    sets = list(real)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        r = real[name]
        for k, row in sorted(r["by_l"].items(), key=lambda kv: int(kv[0])):
            ls = sorted((int(le), s["mean_abs"]) for le, s in row.items())
            ax.plot([a for a, _ in ls], [b for _, b in ls], marker="o", ms=3, label=f"L-Mul k={k}")
        for (label, s), (color, style) in zip(r["baselines"].items(), (("k", "--"), ("k", ":"), ("grey", "--"),
                                                                        ("grey", ":")), strict=False):
            ax.axhline(s["mean_abs"], color=color, ls=style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("offset exponent l (c = 2^-l)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("mean relative error")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Figure 3 analog: L-Mul error vs offset exponent and mantissa bits", fontsize=10)
    return _save(fig, path)


def plot_bits(real: dict, exhaustive: dict, path: Path) -> Path:
    """Figure 4 analog: mean relative error against mantissa bits k, L-Mul with the paper's l(k)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = sorted(int(k) for k in exhaustive["lmul-bit"])
    ax.plot(ks, [exhaustive["lmul-bit"][str(k)]["mean_abs"] for k in ks], "k-o", ms=3, label="even (exhaustive)")
    for name, r in real.items():
        kk = sorted(int(k) for k in r["default"])
        line = ax.plot(kk, [r["default"][str(k)]["mean_abs"] for k in kk], marker="o", ms=3, label=name)[0]
        for s, style in zip(list(r["baselines"].values())[:2], ("--", ":"), strict=True):
            ax.axhline(s["mean_abs"], color=line.get_color(), ls=style, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("L-Mul mantissa bits k (offset 2^-l(k))")
    ax.set_ylabel("mean relative error")
    ax.set_title("Figure 4 analog (dashed: fp8 e4m3 multiply, dotted: e5m2)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_exhaustive(exhaustive: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, by_k in exhaustive.items():
        ks = sorted(int(k) for k in by_k)
        axes[0].plot(ks, [by_k[str(k)]["mean_abs"] for k in ks], marker="o", ms=3, label=arm)
        axes[1].plot(ks, [by_k[str(k)]["bias"] for k in ks], marker="o", ms=3, label=arm)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean |relative error|")
    axes[1].set_ylabel("bias (mean signed relative error)")
    axes[1].axhline(0, color="k", lw=0.5)
    for ax in axes:
        ax.set_xlabel("mantissa bits k")
    axes[0].legend(fontsize=7)
    fig.suptitle("Exhaustive over all 4^k mantissa pairs (even distribution)", fontsize=10)
    return _save(fig, path)


def plot_offset_sweep(sweeps: dict, path: Path) -> Path:
    """Mean |relative error| of bit-mode L-Mul against the offset c, per k, paper's c marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, rows in sorted(sweeps.items(), key=lambda kv: int(kv[0])):
        line = ax.plot([r["offset"] for r in rows], [r["mean_abs"] for r in rows], marker=".", ms=3, label=f"k={k}")[0]
        paper = [r for r in rows if r.get("paper")]
        if paper:
            ax.plot([paper[0]["offset"]], [paper[0]["mean_abs"]], "o", mfc="none", ms=8, color=line.get_color())
    ax.set_xlabel("offset c (bit mode; circles: paper's 2^-l(k))")
    ax.set_ylabel("mean |relative error| (exhaustive)")
    ax.set_xlim(0, 0.3)
    ax.set_ylim(0, 0.12)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_histograms(samples: dict[str, torch.Tensor], title: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, rel in samples.items():
        ax.hist(rel.double().clamp(-0.3, 0.3).numpy(), bins=120, histtype="step", density=True, label=label)
    ax.set_xlabel("relative error P/(xy) - 1 (clipped to ±0.3)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_energy(rep: dict, path: Path) -> Path:
    """Stacked bars per arm: multiplies, adds, weight DRAM traffic, KV DRAM traffic (µJ)."""
    plt = _plt()
    arms = [r["arm"] for r in rep["arms"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(arms)
    for key, label in (("mul_uJ", "multiplies"), ("add_uJ", "adds"), ("weights_uJ", "weights (DRAM)"),
                       ("kv_uJ", "KV cache (DRAM)")):
        vals = [r[key] * 1e-3 for r in rep["arms"]]
        ax.bar(arms, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("energy per forward (mJ)")
    ax.set_title(f"{rep['model']['name']}, seq {rep['seq']}, past {rep['past']}, L-Mul scope {rep['scope']} "
                 "(45 nm, Horowitz 2014)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)
