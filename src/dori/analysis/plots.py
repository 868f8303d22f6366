"""Every figure of dori (matplotlib's object API: ``plot_x(data, ...) -> Figure``, no pyplot and no global
backend, so a figure is saved with ``fig.savefig`` wherever the library runs): the locality analyses,
MR against Dori steps, the fine-tuning losses."""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch

_MPL = tuple(int(v) for v in matplotlib.__version__.split(".")[:2])
SET_COLORS = {"Y_mem": "#4C72B0", "Y_adv": "#DD8452", "Y_adv vs original": "#C44E52", "Y_0": "0.72"}
SET_LABELS = {"Y_mem": "memorized prompts", "Y_adv": "triggers of one image", "Y_0": "starts of those triggers (control)"}
METHOD_TITLES = {
    "nemo": "NeMo: cross-attention value layers (attn2.to_v)",
    "wanda": "Wanda: FFN output layers (ff.net.2)",
}


def _figure(ax, size):
    if ax is None:
        fig = Figure(figsize=size, dpi=130)
        return fig, fig.add_subplot()
    return ax.figure, ax


def plot_tsne(table, ax=None) -> Figure:
    """Starts (crosses) and triggers (dots: filled = replicates) in t-SNE space, a line from each start to
    its trigger, the memorized prompt's embedding as a star. ``table``: :func:`run_scatter`'s rows."""
    fig, ax = _figure(ax, (6, 5))
    starts = table[table.kind == "start"].sort_values("restart")
    triggers = table[table.kind == "trigger"].sort_values("restart")
    segments = np.stack([starts[["tsne_x", "tsne_y"]].to_numpy(), triggers[["tsne_x", "tsne_y"]].to_numpy()], axis=1)
    ax.add_collection(LineCollection(segments, colors="0.6", linewidths=0.8, zorder=1))
    ax.scatter(starts.tsne_x, starts.tsne_y, marker="x", s=28, color="0.35", linewidths=1.0, zorder=2,
               label=f"start $y^{{(0)}} \\sim \\mathcal{{N}}(0, I)$ (n={len(starts)})")
    ok = triggers.status == "succeeded"
    ax.scatter(triggers.tsne_x[ok], triggers.tsne_y[ok], s=30, color=SET_COLORS["Y_adv vs original"], zorder=3,
               edgecolors="white", linewidths=0.4, label=f"trigger, replicates (n={int(ok.sum())})")
    if (~ok).any():
        ax.scatter(triggers.tsne_x[~ok], triggers.tsne_y[~ok], s=30, facecolors="none", zorder=3,
                   edgecolors=SET_COLORS["Y_mem"], linewidths=1.0, label=f"trigger, no replica (n={int((~ok).sum())})")
    prompt = table[table.kind == "prompt"]
    ax.scatter(prompt.tsne_x, prompt.tsne_y, marker="*", s=180, color="gold", edgecolors="black", linewidths=0.7,
               zorder=4, label="the memorized prompt's embedding")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of starts and triggers (jointly)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    ax.autoscale_view()
    return fig


def plot_distance_distributions(distances: dict[str, np.ndarray], sizes: dict[str, int] | None = None,
                                ax=None) -> Figure:
    """Box plots of pairwise L2 distances per group (means as diamonds), members and pairs in the labels."""
    fig, ax = _figure(ax, (6, 4))
    names = [n for n, d in distances.items() if len(d)]
    data = [distances[n] for n in names]
    labels = [f"{n}\n(n={sizes[n] if sizes else '?'}, {len(distances[n])} pairs)" for n in names]
    colors = {"triggers": SET_COLORS["Y_adv"], "successful triggers": SET_COLORS["Y_adv vs original"],
              "starts": "0.6", "non-memorized prompts": SET_COLORS["Y_mem"]}
    horizontal = {"orientation": "horizontal"} if _MPL >= (3, 10) else {"vert": False}
    box = ax.boxplot(data, patch_artist=True, widths=0.6, showfliers=False, **horizontal)
    for patch, name in zip(box["boxes"], names, strict=True):
        patch.set_facecolor(colors.get(name, "0.8"))
        patch.set_alpha(0.75)
    for k, d in enumerate(data, start=1):
        ax.plot(np.mean(d), k, marker="D", color="black", markersize=5, zorder=3)
        ax.annotate(f"mean {np.mean(d):.1f}", (np.mean(d), k), xytext=(0, -22), textcoords="offset points",
                    ha="center", fontsize=7)
    ax.set_yticks(range(1, len(names) + 1), labels, fontsize=8)
    ax.set_xlabel("pairwise L2 distance of text embeddings (tokens x dim, flattened)")
    ax.set_xlim(left=0)
    ax.set_title("pairwise distances (box: quartiles, ◆: mean)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_scatter(table, distances: dict[str, np.ndarray], summary: dict) -> Figure:
    """Analysis A's figure: the t-SNE panel and the distance distributions, the counts in the title."""
    fig = Figure(figsize=(13, 5.2), dpi=130)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    plot_tsne(table, ax=left)
    sizes = {name: s["n_members"] for name, s in summary["distances"].items()}
    if summary["n_succeeded"] == summary["n_starts"]:  # the same set twice
        distances = {name: d for name, d in distances.items() if name != "successful triggers"}
    plot_distance_distributions(distances, sizes, ax=right)
    fig.suptitle(f"Dori triggers of one memorized image ({summary['prompt_id']}): {summary['n_starts']} random starts x "
                 f"{summary['steps']} steps, {summary['n_succeeded']}/{summary['n_starts']} replicate; "
                 f"trigger / non-memorized distance ratio {summary['ratio_mean']:.2f}", fontsize=10)
    fig.text(0.01, 0.01, textwrap.fill(summary["note"], 190), fontsize=6.5, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def _layer_labels(layers) -> list[str]:
    return [f"{row.layer_id}\n{row.short}" for row in layers.itertuples()]


def plot_discrepancy(table, summary: dict | None = None) -> Figure:
    """Analysis B's figure: per method a panel of per-layer bars, Y_mem beside Y_adv, error bars = std over pairs."""
    methods = [m for m in ("nemo", "wanda") if m in set(table.method)]
    fig = Figure(figsize=(5.5 * len(methods) + 1, 4.6), dpi=130)
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    for ax, method in zip(axes, methods, strict=True):
        part = table[table.method == method]
        layers = part.drop_duplicates("layer_id").sort_values("layer_id")
        x = np.arange(len(layers))
        sets = [s for s in ("Y_mem", "Y_adv", "Y_0") if s in set(part["set"])]
        width = 0.8 / len(sets)
        for k, name in enumerate(sets):
            rows = part[part["set"] == name].set_index("layer_id").loc[layers.layer_id]
            first = rows.iloc[0]
            what = SET_LABELS[name]
            ax.bar(x + (k - (len(sets) - 1) / 2) * width, rows["mean"], width, yerr=rows["std"], capsize=3,
                   color=SET_COLORS[name], error_kw={"elinewidth": 0.8, "ecolor": "0.2"},
                   label=f"{name}: {int(first.n)} {what} ({int(first.n_pairs)} pairs)")
        ax.set_xticks(x, _layer_labels(layers), fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("activation discrepancy (mean pairwise $\\ell_2$)")
        ax.set_title(METHOD_TITLES.get(method, method), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        top = float((part["mean"] + part["std"].fillna(0)).max())
        ax.set_ylim(0, 1.3 * top if top > 0 else 1)  # room for the legend above the bars
        ax.legend(fontsize=7.5, loc="upper left")
    title = "Activation discrepancy per layer: one image's triggers (Y_adv) vs different memorized prompts (Y_mem)"
    if "Y_0" in set(table["set"]):
        title += "; Y_0 = the triggers' starts"
    if summary and summary.get("statistic") == "raw":
        title += "\n(whole activation maps, not the methods' scored statistics)"
    fig.suptitle(title, fontsize=10.5)
    foot = "error bars: std of the pairwise distances (their spread; pairs share members, so not a standard error)"
    if summary and summary.get("note"):
        foot += ". " + summary["note"]
    fig.text(0.01, 0.01, textwrap.fill(foot, 200), fontsize=6.5, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def plot_weight_agreement(table, summary: dict | None = None) -> Figure:
    """Analysis C's figure: per method a panel of per-layer IoU bars (Y_mem, Y_adv, Y_adv vs the original
    prompt's set), error bars = std over pairs; hatched where the method selected nothing (IoU 1 by
    definition), ``k/n ∅`` where k of the n sets are empty."""
    methods = [m for m in ("nemo", "wanda") if m in set(table.method)]
    fig = Figure(figsize=(5.8 * len(methods) + 1, 4.8), dpi=130)
    axes = np.atleast_1d(fig.subplots(1, len(methods)))
    for ax, method in zip(axes, methods, strict=True):
        part = table[table.method == method]
        layers = part.drop_duplicates("layer_id").sort_values("layer_id")
        x = np.arange(len(layers))
        sets = [s for s in ("Y_mem", "Y_adv", "Y_adv vs original") if s in set(part.comparison)]
        width = 0.8 / len(sets)
        for k, name in enumerate(sets):
            rows = part[part.comparison == name].set_index("layer_id").loc[layers.layer_id]
            pos = x + (k - (len(sets) - 1) / 2) * width
            first = rows.iloc[0]
            bars = ax.bar(pos, rows["iou_mean"], width, yerr=rows["iou_std"], capsize=2.5, color=SET_COLORS[name],
                          error_kw={"elinewidth": 0.8, "ecolor": "0.2"},
                          label=f"{name} ({int(first.n_sets)} sets, {int(first.n_pairs)} pairs)")
            for bar, row in zip(bars, rows.itertuples(), strict=True):
                if row.empty_sets == row.n_sets:
                    bar.set_hatch("///")
                    bar.set_edgecolor("black")
                    ax.annotate("∅", (bar.get_x() + bar.get_width() / 2, 1.02), ha="center", fontsize=8)
                elif row.empty_sets:
                    ax.annotate(f"{int(row.empty_sets)}/{int(row.n_sets)}∅",
                                (bar.get_x() + bar.get_width() / 2, min(row.iou_mean + row.iou_std, 1.0) + 0.02),
                                ha="center", fontsize=5.5, rotation=90, va="bottom")
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///"))
        labels.append("nothing selected in any set: IoU = 1 by definition")
        ax.legend(handles, labels, fontsize=7, loc="upper center", ncol=2, framealpha=0.9)
        ax.set_xticks(x, _layer_labels(layers), fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("weight agreement (mean pairwise IoU)")
        ax.set_ylim(0, 1.42)  # room for the legend above IoU 1
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(METHOD_TITLES.get(method, method) + (" — neurons" if method == "nemo" else " — weights"),
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Weight agreement per layer: do the methods pick the same weights for one image's triggers?",
                 fontsize=10.5)
    foot = ("error bars: std of the pairwise IoUs; k/n∅: k of the n sets are empty (pairs of empty sets count as "
            "IoU 1)")
    if summary and summary.get("note"):
        foot += ". " + summary["note"]
    fig.text(0.01, 0.01, textwrap.fill(foot, 200), fontsize=6.5, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def plot_mr_vs_steps(curves: dict[str, dict[int, float]], paper: dict[str, dict[int, float]] | None = None,
                     ax=None, title: str = "Memorization rate vs Dori steps") -> Figure:
    """One line per setting (MR after each recorded step), the paper's curves dashed beside them."""
    fig, ax = _figure(ax, (6, 4))
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


def plot_training_loss(rows: list[dict], title: str, ax=None) -> Figure:
    """The loss per step of a fine-tuning run (``steps.jsonl`` rows with ``step`` and ``loss``)."""
    fig, ax = _figure(ax, (5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="loss", title=f"{title} ({len(rows)} steps)")
    fig.tight_layout()
    return fig


def plot_finetune_losses(rows: list[dict], ax=None) -> Figure:
    """The losses of adversarial fine-tuning per step (``steps.jsonl`` rows), log scale."""
    fig, ax = _figure(ax, (6, 3.5))
    steps = [r["step"] for r in rows]
    for key, label in (("l_adv", "L_Adv (surrogate under triggers)"), ("l_dm", "L_DM (retain)"),
                       ("inner_loss", "Dori loss (memorized image)")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"adversarial fine-tuning ({len(rows)} steps)")
    fig.tight_layout()
    return fig
