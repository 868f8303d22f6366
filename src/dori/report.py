"""``dori report``: one self-contained HTML page for one or several run folders.

Per run folder the page shows what the folder holds, and only that:

* ``summary.json``: a list of Table-1 rows (``name``, ``n``, ``sscd_mean``, ``sscd_std``, ``mr`` and
  optionally ``paper_mr`` and a ``utility`` dict) as a table, or one object as a key/value table;
* ``grid.json``: an image grid (``{"columns": [...], "rows": [{"prompt_id", "prompt", "seed",
  "cells": {column: {"image": "relative/path.png", "score": float | null}}}]}``);
* every ``*.png`` at the top level as a figure, linked to the sibling ``.pdf`` when there is one;
* ``table.parquet``: its first :data:`MAX_TABLE_ROWS` rows;
* sub-run folders (a demo's evaluate, localize and attack runs): name, command and status;
* the manifest (command, status, seeds, versions, config), collapsed.

Images are embedded as base64 data URIs, so the page is one file that can be mailed. Every string
read from a run folder (captions, prompts, config values, file names) is untrusted: the template
is rendered with autoescape on and never marks such text safe, and an image path is only read
when it lies inside its run folder.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import json
import logging
import math
import numbers
import os
import shlex
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .errors import DoriError
from .runs import MANIFEST, check_writable

logger = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
#: Rows of ``table.parquet`` shown on the page; the rest is counted in a note.
MAX_TABLE_ROWS = 200
#: Longest text shown in one table cell (lists and dicts are shown as JSON).
MAX_CELL_CHARS = 300
DASH = "\u2013"
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".webp": "image/webp"}
_STATUS_CLASS = {"done": "ok", "running": "running", "failed": "failed"}


# -- formatting -------------------------------------------------------------------------------
def format_value(value: object, spec: str = ".2f") -> str:
    """One table cell: numbers with ``spec``, None and NaN as an en dash, lists and dicts as JSON."""
    if value is None:
        return DASH
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return DASH if math.isnan(number) else format(number, spec)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict | list | tuple):
        value = json.dumps(value, default=str)
    text = str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "\u2026"


def flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _table(header: list[str], rows: list[list[str]], numeric: list[bool] | None = None) -> dict:
    return {"header": header, "rows": rows, "numeric": numeric or [False] + [True] * (len(header) - 1)}


# -- reading a run folder ---------------------------------------------------------------------
def _read_json(path: Path, expected: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DoriError(f"{path}: not readable JSON ({e}); expected {expected}") from e


class _Images:
    """Embeds images of one run folder as data URIs; a path outside the folder is never read."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self._cache: dict[Path, str] = {}

    def embed(self, relative: str) -> dict:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            return {"path": relative, "src": None, "problem": "outside the run folder"}
        mime = _MIME.get(path.suffix.lower())
        if mime is None:
            return {"path": relative, "src": None, "problem": "not an image"}
        if path not in self._cache:
            try:
                data = path.read_bytes()
            except OSError:
                logger.warning("image %s of %s is missing", relative, self.root)
                return {"path": relative, "src": None, "problem": "missing"}
            self._cache[path] = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        return {"path": relative, "src": self._cache[path], "problem": None}


def _manifest_section(manifest: dict) -> dict:
    shown = {"command", "argv", "status", "error", "created", "finished", "git_sha", "seeds", "config_hash",
             "versions", "config"}
    fields = [("command", format_value(manifest.get("command"))),
              ("status", format_value(manifest.get("status"))),
              ("created", format_value(manifest.get("created")))]
    if manifest.get("error"):
        fields.append(("error", format_value(manifest["error"])))
    if "finished" in manifest:
        fields.append(("finished", format_value(manifest["finished"])))
    fields += [("git sha", format_value(manifest.get("git_sha"))), ("seeds", format_value(manifest.get("seeds")))]
    if "config_hash" in manifest:
        fields.append(("config hash", format_value(manifest["config_hash"])))
    argv = manifest.get("argv")
    if isinstance(argv, list):
        fields.append(("argv", shlex.join(str(a) for a in argv)))
    fields += [(str(k), format_value(v, ".3g")) for k, v in manifest.items() if k not in shown]
    versions = manifest.get("versions")
    versions = [(str(k), str(v)) for k, v in versions.items()] if isinstance(versions, dict) else []
    return {"fields": fields, "versions": versions,
            "config": json.dumps(manifest.get("config", {}), indent=2, default=str)}


def _table1(rows: list[dict]) -> dict:
    utility: dict[str, None] = {}
    for row in rows:
        if isinstance(row.get("utility"), dict):
            utility.update(dict.fromkeys(str(k) for k in row["utility"]))
    kinds = sorted({str(k) for row in rows if isinstance(row.get("mr_by_kind"), dict) for k in row["mr_by_kind"]})
    body = []
    for row in rows:
        by_kind, any_by_kind = (row[f] if isinstance(row.get(f), dict) else {} for f in ("mr_by_kind", "mr_gallery_by_kind"))
        mean, std = format_value(row.get("sscd_mean")), format_value(row.get("sscd_std"))
        similarity = mean if DASH in (mean, std) else f"{mean} \u00b1 {std}"
        values = row.get("utility") if isinstance(row.get("utility"), dict) else {}
        body.append([format_value(row.get("name")), format_value(row.get("n")), similarity,
                     format_value(row.get("mr")), *(format_value(by_kind[k]) if k in by_kind else "" for k in kinds),
                     format_value(row["mr_gallery"]) if "mr_gallery" in row else "",
                     *(format_value(any_by_kind[k]) if k in any_by_kind else "" for k in kinds),
                     format_value(row["paper_mr"]) if "paper_mr" in row else "",
                     *(format_value(values[k]) if k in values else "" for k in utility)])
    return _table(["setting", "n", "similarity mean \u00b1 std", "MR", *(f"MR {k}" for k in kinds), "MR, any memorized photo",
                   *(f"any {k}" for k in kinds), "paper MR", *utility], body)


def _summary_section(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    expected = "a list of Table-1 rows (name, n, sscd_mean, sscd_std, mr, ...) or one object"
    data = _read_json(path, expected)
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return {"kind": "table1", "table": _table1(data)}
    if isinstance(data, dict):
        items = [[key, format_value(value, ".3g")] for key, value in flatten(data).items()]
        return {"kind": "dict", "table": _table(["key", "value"], items, [False, False])}
    raise DoriError(f"{path}: summary.json must be {expected}")


def _grid_section(run_dir: Path, images: _Images) -> dict | None:
    path = run_dir / "grid.json"
    if not path.is_file():
        return None
    expected = ('{"columns": [...], "rows": [{"prompt_id", "prompt", "seed", '
                '"cells": {column: {"image", "score"}}}]}')
    grid = _read_json(path, expected)
    if not (isinstance(grid, dict) and isinstance(grid.get("columns"), list) and isinstance(grid.get("rows"), list)):
        raise DoriError(f"{path}: grid.json must be {expected}")
    columns = [str(c) for c in grid["columns"]]
    rows = []
    for i, row in enumerate(grid["rows"]):
        cells = row.get("cells", {}) if isinstance(row, dict) else None
        if not isinstance(cells, dict) or not all(isinstance(c, dict) for c in cells.values()):
            raise DoriError(f"{path}: rows[{i}] must be an object with a 'cells' object of "
                            '{"image": path, "score": number} per column')
        out_cells = []
        for column in columns:
            cell = cells.get(column)
            if cell is None:
                out_cells.append(None)
                continue
            image = images.embed(str(cell["image"])) if cell.get("image") else None
            out_cells.append({"image": image, "score": format_value(cell["score"]) if "score" in cell else ""})
        seed = row.get("seed")
        rows.append({"prompt_id": format_value(row.get("prompt_id", "")), "prompt": str(row.get("prompt", "")),
                     "seed": None if seed is None else format_value(seed), "cells": out_cells})
    return {"columns": columns, "rows": rows}


def _href(target: Path, base: Path) -> str:
    """A link from a page in ``base`` to ``target``: relative when possible, else a file:// URI."""
    try:
        return quote(Path(os.path.relpath(target.resolve(), base.resolve())).as_posix())
    except ValueError:  # another drive on Windows
        return target.resolve().as_uri()


def _figures(run_dir: Path, images: _Images, base: Path) -> list[dict]:
    figures = []
    for png in sorted(p for p in run_dir.glob("*.png") if p.is_file()):
        pdf = png.with_suffix(".pdf")
        figures.append({"image": images.embed(png.name), "file": png.name,
                        "caption": png.stem.replace("_", " ").replace("-", " "),
                        "pdf": {"href": _href(pdf, base), "file": pdf.name} if pdf.is_file() else None})
    return figures


def _parquet_section(run_dir: Path) -> dict | None:
    path = run_dir / "table.parquet"
    if not path.is_file():
        return None
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise DoriError(f"{path}: not a readable Parquet table ({e})") from e

    def cell(value: object) -> str:
        if not isinstance(value, list | tuple | dict | np.ndarray) and pd.isna(value):
            return DASH
        return format_value(value, ".3g")

    numeric = [pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
               for dtype in frame.dtypes]
    rows = [[cell(v) for v in row] for row in frame.head(MAX_TABLE_ROWS).itertuples(index=False, name=None)]
    return {"table": _table([str(c) for c in frame.columns], rows, numeric), "total": len(frame),
            "shown": len(rows)}


LEADERBOARD_HEADERS = {"method": "method", "kind": "kind", "mr": "MR", "mr_dori": "MR + Dori",
                       "mr_dori_adaptive": "MR + Dori, adaptive", "trigger_auc": "noise-norm AUC on its triggers",
                       "shape_accuracy": "shape colours", "fid": "FID", "fit_seconds": "fit s",
                       "fit_unet_evaluations": "fit UNet evaluations", "generate_seconds_per_image": "s / image",
                       "unet_evaluations_per_image": "UNet evaluations / image"}


def _leaderboard_section(run_dir: Path) -> dict | None:
    """``leaderboard.json`` (:mod:`dori.robustness`) and ``detection.json`` as tables."""
    path = run_dir / "leaderboard.json"
    if not path.is_file():
        return None
    data = _read_json(path, "a leaderboard (format, meta, rows)")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DoriError(f"{path}: must be an object with a list of rows")
    keys = list(LEADERBOARD_HEADERS)
    body = [[format_value(row.get(k), ".0f" if k in ("fit_seconds", "fit_unet_evaluations", "fid",
                                                   "unet_evaluations_per_image") else ".2f") for k in keys]
            for row in rows if isinstance(row, dict)]
    out = {"table": _table([LEADERBOARD_HEADERS[k] for k in keys], body, [False, False] + [True] * (len(keys) - 2))}
    detection = run_dir / "detection.json"
    if detection.is_file():
        det = _read_json(detection, "detection results (separations, scores, mr)")
        seps = det.get("separations", []) if isinstance(det, dict) else []
        mr = det.get("mr", {}) if isinstance(det, dict) else {}
        out["detection"] = _table(
            ["detector", "positives", "negatives", "AUC", "TPR at 1% FPR", "median (pos / neg)", "MR of the positives"],
            [[format_value(r.get("detector")), f"{r.get('positives')} ({r.get('n_positive')})",
              f"{r.get('negatives')} ({r.get('n_negative')})", format_value(r.get("auc")),
              format_value(r.get("tpr_at_1pct_fpr")),
              f"{format_value(r.get('positive_median'), '.3g')} / {format_value(r.get('negative_median'), '.3g')}",
              format_value(mr.get(r.get("positives"))) if r.get("positives") in mr else ""]
             for r in seps if isinstance(r, dict)], [False, False, False, True, True, True, True])
    return out


def _subruns(run_dir: Path) -> list[dict]:
    subruns = []
    for child in sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file()):
        try:
            manifest = _read_json(child / MANIFEST, "a run manifest")
        except DoriError as e:
            logger.warning("%s", e)
            manifest = {"status": "unreadable manifest.json"}
        if not isinstance(manifest, dict):
            manifest = {"status": "unreadable manifest.json"}
        subruns.append({"name": child.name, "command": format_value(manifest.get("command")),
                        "status": format_value(manifest.get("status"))})
    return subruns


def _run_section(run_dir: Path, index: int, base: Path) -> dict:
    if not run_dir.is_dir():
        raise DoriError(f"runs: {run_dir} is not a folder; give run folders (each with {MANIFEST})")
    if not (run_dir / MANIFEST).is_file():
        raise DoriError(f"runs: {run_dir} is not a run folder (no {MANIFEST}); give folders written by dori")
    manifest = _read_json(run_dir / MANIFEST, "a run manifest (an object)")
    if not isinstance(manifest, dict):
        raise DoriError(f"{run_dir / MANIFEST}: must be a JSON object (command, config, versions, ...)")
    images = _Images(run_dir)
    status = str(manifest.get("status", ""))
    return {"id": f"run-{index}", "name": run_dir.name, "path": str(run_dir),
            "command": format_value(manifest.get("command")), "status": format_value(manifest.get("status")),
            "status_class": _STATUS_CLASS.get(status, "other"), "manifest": _manifest_section(manifest),
            "summary": _summary_section(run_dir), "grid": _grid_section(run_dir, images),
            "figures": _figures(run_dir, images, base), "table": _parquet_section(run_dir),
            "leaderboard": _leaderboard_section(run_dir),
            "subruns": _subruns(run_dir)}


# -- rendering --------------------------------------------------------------------------------
@functools.cache
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape=True, not select_autoescape: the template's name ends in .j2, not .html.
    return Environment(loader=PackageLoader("dori", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def render_report(runs: list[str | Path], *, title: str | None = None, base: str | Path | None = None) -> str:
    """The report page for ``runs`` as an HTML string; links to PDFs are relative to folder ``base``
    (where the page will be saved; default the first run folder)."""
    from . import __version__

    if isinstance(runs, str | Path):
        runs = [runs]
    folders = [Path(r) for r in runs]
    if not folders:
        raise DoriError(f"runs: give at least one run folder (a folder with {MANIFEST})")
    base = Path(base) if base is not None else folders[0]
    sections = [_run_section(folder, i, base) for i, folder in enumerate(folders, start=1)]
    if title is None:
        title = f"dori report: {folders[0].name}" if len(folders) == 1 else f"dori report: {len(folders)} runs"
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _environment().get_template(TEMPLATE).render(title=title, runs=sections, generated=generated,
                                                        version=__version__, max_rows=MAX_TABLE_ROWS)


def write_report(runs: list[str | Path], out: str | Path | None = None, *, title: str | None = None) -> Path:
    """Write one self-contained HTML page for ``runs`` (run folders, in order) and return its path.

    ``out`` is the file to write (an existing folder gets ``report.html`` inside it; default
    ``<first run>/report.html``). A page already there is replaced.
    """
    if isinstance(runs, str | Path):
        runs = [runs]
    if not runs:
        raise DoriError(f"runs: give at least one run folder (a folder with {MANIFEST})")
    out_path = Path(out) if out is not None else Path(runs[0]) / "report.html"
    if out_path.is_dir():
        out_path = out_path / "report.html"
    check_writable(out_path, file=True)
    html = render_report(runs, title=title, base=out_path.parent)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out_path)
    logger.info("report on %d run(s) written to %s (%.0f kB)", len(runs), out_path, len(html) / 1024)
    return out_path
