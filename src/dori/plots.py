"""Figures (matplotlib object API, Agg backend): ``plot_x(data, ax=None) -> Figure``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

#: The paper's MR-vs-steps curves (v3 blog figure, SD v1.4; PAPER.md section 4.3).
PAPER_MR_VS_STEPS = {
    "nemo+dori": {0: 0.20, 1: 0.73, 10: 0.79, 25: 0.94, 50: 0.99},
    "wanda+dori": {0: 0.00, 1: 0.02, 10: 0.18, 25: 0.49, 50: 0.73},
    "non-memorized+dori": {0: 0.00, 1: 0.00, 10: 0.00, 25: 0.00, 50: 0.02},
}


def plot_mr_vs_steps(curves: dict[str, dict[int, float]], paper: dict[str, dict[int, float]] | None = None,
                     ax=None, title: str = "Memorization rate vs Dori steps") -> Figure:
    """One line per setting (MR after each recorded step), the paper's curves dashed beside them."""
    if ax is None:
        fig = Figure(figsize=(6, 4), dpi=120)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    colors = {}
    for name, curve in curves.items():
        steps = sorted(int(s) for s in curve)
        (line,) = ax.plot(steps, [curve[s] for s in steps], marker="o", label=f"{name} (testbed)")
        colors[name] = line.get_color()
    for name, curve in (paper or {}).items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], linestyle="--", marker="x", alpha=0.6,
                color=colors.get(name), label=f"{name} (paper, SD v1.4)")
    ax.set_xlabel("Dori optimisation steps")
    ax.set_ylabel("memorization rate (MR)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
