"""Rich tables the commands print."""

from __future__ import annotations

import math


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def layer_table(title: str, column: str, values: dict[str, str]):
    """A two-column table: layer name and one right-aligned value per layer."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer")
    table.add_column(column, justify="right")
    for name, value in values.items():
        table.add_row(name, value)
    return table


def rows_table(rows: list[dict], title: str, threshold: float | None = None):
    """Table 1 / Table 2 rows: similarity, MR and MR against any memorized image (each also per memorization
    kind where labelled: the paper's Table 1 is over VM prompts), utility, the paper's MR."""
    from rich.table import Table

    table = Table(title=title, caption=f"replication: similarity > {threshold:.3f}" if threshold is not None else None)
    utility = any("utility" in row for row in rows)
    kinds = sorted({k for row in rows for k in row.get("mr_by_kind", {})})
    columns = ["row", "n", "similarity mean ± std", "MR", *(f"MR {k}" for k in kinds), "MR (any memorized photo)",
               *(f"any {k}" for k in kinds)]
    columns += ["shapes in right colours", "SSCD_gen other captions", "FID (VAE features)", "retain loss"] if utility else []
    paper = any("paper_mr" in row for row in rows)
    columns += ["paper MR (SD v1.4)"] if paper else []
    for col in columns:
        table.add_column(col, justify="right" if col != "row" else "left")
    for row in rows:
        cells = [row["name"], str(row["n"]), f"{fmt(row['sscd_mean'])} ± {fmt(row['sscd_std'])}",
                 fmt(row["mr"]), *(fmt(row.get("mr_by_kind", {}).get(k)) for k in kinds), fmt(row.get("mr_gallery")),
                 *(fmt(row.get("mr_gallery_by_kind", {}).get(k)) for k in kinds)]
        if utility:
            u = row.get("utility", {})
            cells += [fmt(u.get("shape_accuracy")), fmt(u.get("sscd_gen_mean")), fmt(u.get("fid_vae")),
                      fmt(u.get("retain_loss"), 4)]
        if paper:
            cells.append(fmt(row.get("paper_mr")))
        table.add_row(*cells)
    return table


def attack_table(title: str, records: list[dict]):
    """One row per trigger: status, MR after each recorded step, perturbation, UNet evaluations."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("trigger", "status", "MR by step", "relative perturbation", "UNet evaluations"):
        table.add_column(col)
    for r in records:
        curve = " ".join(f"{k}:{v:.2f}" for k, v in (r["mr_by_step"] or {}).items())
        table.add_row(r["key"], r["status"], curve, f"{r['relative_perturbation']:.2f}", str(r["unet_evaluations"]))
    return table


LEADERBOARD_COLUMNS = (("method", "method", None), ("kind", "kind", None), ("mr", "MR", 2), ("mr_dori", "+ Dori", 2),
                       ("mr_dori_adaptive", "+ Dori adaptive", 2), ("trigger_auc", "trigger AUC", 2),
                       ("shape_accuracy", "shape colours", 2), ("fid", "FID", 0), ("fit_seconds", "fit s", 0),
                       ("unet_evaluations_per_image", "UNet / image", 0))


def leaderboard_table(rows: list[dict], title: str):
    """Leaderboard rows (:mod:`dori.robustness`), with a model column when they come from several models."""
    from rich.table import Table

    columns = list(LEADERBOARD_COLUMNS)
    if len({str(r.get("model")) for r in rows}) > 1:
        columns.insert(0, ("model", "model", None))
    table = Table(title=title)
    for _, header, digits in columns:
        table.add_column(header, justify="left" if digits is None else "right")
    for row in rows:
        table.add_row(*[str(row.get(key)) if digits is None else fmt(row.get(key), digits) for key, _, digits in columns])
    return table
