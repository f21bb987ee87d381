"""PNG plots of a scaling fit: loss against tokens per model size, the iso-FLOP curves, and the residuals."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
import numpy as np  # noqa: E402

from labram_jax.scaling.fit import Cost, IsoFlop, Law, optimal  # noqa: E402


def _sizes(data: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """(label, N) per model size, smallest first."""
    return sorted({(str(label), float(n)) for label, n in zip(data["label"], data["n"])}, key=lambda x: x[1])


def _plain_loss_ticks(ax: plt.Axes) -> None:
    """Losses span a few percent: 10.2 reads better than matplotlib's 1.02 x 10^1 on a log axis."""
    for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        formatter(ScalarFormatter(useOffset=False))


def loss_vs_tokens(data: dict[str, np.ndarray], law: Law, n_column: str, best: list[dict]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    d = np.geomspace(data["tokens"].min() / 1.5, data["tokens"].max() * 1.5, 100)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(_sizes(data))))
    for color, (label, n) in zip(colors, _sizes(data)):
        mine = data["n"] == n
        ax.scatter(data["tokens"][mine], data["loss"][mine], color=color, label=f"{label} ({n:.3g} {n_column})")
        ax.plot(d, law(n, d), color=color, lw=1.2)
    for row in best:  # the fitted law's compute-optimal runs
        ax.scatter(row["tokens"], row["loss"], marker="*", s=90, color="k", zorder=3)
        ax.annotate(f"C={row['flops']:.0e}: N*={row['params']:.2g}", (row["tokens"], row["loss"]), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(law.E, color="gray", ls=":", lw=1, label=f"E = {law.E:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="tokens (channel-patches)", ylabel="held-out masked-code loss",
           title=f"L = E + A/N^{law.alpha:.2f} + B/D^{law.beta:.2f}")
    _plain_loss_ticks(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def isoflop_curves(iso: IsoFlop, law: Law, cost: Cost, at_budgets: list[dict], sizes: np.ndarray) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(iso.levels)))
    for color, level, curve, best in zip(colors, iso.levels, iso.curves, iso.optimal_n):
        n = np.array(curve["n"])
        left.scatter(n, curve["loss"], color=color, s=14)
        grid = np.geomspace(n.min(), n.max(), 50)
        left.plot(grid, np.exp(np.polyval(curve["parabola"], np.log(grid))), color=color, lw=1,
                  label=f"C = {level:.2g}")
        if best is not None:
            left.axvline(best, color=color, ls=":", lw=0.8)
    left.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="loss at C (interpolated)",
             title="iso-FLOP curves (C: " + ("the runs' FLOPs)" if cost.sizes else "6ND)"))
    _plain_loss_ticks(left)
    left.legend(fontsize=7)
    known = [(c, n) for c, n in zip(iso.levels, iso.optimal_n) if n is not None]
    c = np.geomspace(min(iso.levels), max(iso.levels), 50)
    if known:
        right.scatter([k for k, _ in known], [n for _, n in known], color="k", label="iso-FLOP minima")
    right.plot(c, [row["params"] for row in optimal(law, cost, c, sizes)], color="C0",
               label="parametric fit: argmin L(N, C / c(N))")
    right.scatter([row["flops"] for row in at_budgets], [row["params"] for row in at_budgets], marker="*", s=90,
                  color="C0", zorder=3, label="compute-optimal at the budgets")
    if iso.a is not None:
        ck = np.array([k for k, _ in known])
        scale = np.exp(np.mean(np.log([n for _, n in known]) - iso.a * np.log(ck)))
        right.plot(c, scale * c ** iso.a, color="k", ls="--", label=f"iso-FLOP: N* ~ C^{iso.a:.2f}")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal N*",
              title="compute-optimal model size")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def residuals(data: dict[str, np.ndarray], law: Law) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    r = np.log(data["loss"] / law(data["n"], data["tokens"]))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(_sizes(data))))
    for color, (label, n) in zip(colors, _sizes(data)):
        mine = data["n"] == n
        ax.scatter(data["tokens"][mine], r[mine], color=color, label=label)
    ax.axhline(0, color="gray", lw=1)
    ax.set(xscale="log", xlabel="tokens (channel-patches)", ylabel="log(observed / fitted loss)",
           title=f"residuals (RMS {np.sqrt(np.mean(r ** 2)):.2%})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_all(out: Path, data: dict[str, np.ndarray], law: Law, iso: IsoFlop | None, n_column: str, cost: Cost,
              best: list[dict]) -> list[Path]:
    figures = {"loss_vs_tokens.png": loss_vs_tokens(data, law, n_column, best), "residuals.png": residuals(data, law)}
    if iso is not None:
        figures["isoflop.png"] = isoflop_curves(iso, law, cost, best, data["n"])
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    return [out / name for name in figures]
