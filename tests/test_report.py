"""The HTML report on synthetic run folders (PIL images and JSON files, no models)."""

import base64
import json
import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from dori.errors import DoriError
from dori.report import MAX_TABLE_ROWS, flatten, format_value, write_report
from tests.report_runs import GRID_COLUMNS, TABLE1, XSS, make_demo_run, write_manifest, write_png


class Page(HTMLParser):
    """Start tags with their attributes, and the text of every table's cells by the table's class."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def find(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


@pytest.fixture
def demo(tmp_path):
    folder = tmp_path / "demo-testbed-20250101T000000Z"
    return folder, make_demo_run(folder)


def test_format_value():
    assert format_value(0.12345) == "0.12" and format_value(np.float32(0.5)) == "0.50"
    assert format_value(None) == format_value(math.nan) == format_value(np.float64("nan")) == "\u2013"
    assert format_value(7) == "7" and format_value(np.int64(7)) == "7" and format_value(True) == "True"
    assert format_value(0.000123456, ".3g") == "0.000123" and format_value([1, "a"]) == '[1, "a"]'
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_demo_folder_renders_table_grid_figures_and_subruns(demo):
    folder, built = demo
    out = write_report([folder])
    assert out == folder / "report.html"
    html = out.read_text()
    page = Page(html)

    summary = page.tables["summary table1"]
    assert summary[0] == ["setting", "n", "similarity mean \u00b1 std", "MR", "MR TM", "MR VM", "MR, any memorized photo",
                          "any TM", "any VM", "paper MR", "shape_accuracy", "sscd_gen_mean"]
    assert summary[1] == ["memorized", "40", "0.91 \u00b1 0.05", "0.97", "", "", "0.97", "", "", "0.98", "0.88", ""]
    # per kind (VM / TM) where the row has them: own photo, then any memorized photo
    assert summary[2] == ["nemo", "40", "0.31 \u00b1 0.10", "0.20", "0.30", "0.10", "0.85", "0.95", "0.75", "0.20", "0.85",
                          "0.96"]
    assert summary[3] == ["nemo+dori", "40", "0.89", "0.95", "", "", "", "", "", "0.99", "", ""]  # NaN std: the mean alone
    assert [row[0] for row in summary[1:]] == [row["name"] for row in TABLE1]
    assert "mr_by_step" not in html

    images = page.find("img")
    assert len(images) == built["n_cells"] + built["n_figures"]
    assert all(img["src"].startswith("data:image/png;base64,") for img in images)
    by_path = {img["alt"]: base64.b64decode(img["src"].split(",", 1)[1]) for img in images}
    assert by_path == {**built["grid_pngs"], "mr_vs_steps.png": built["figure"]}

    grid = page.tables["grid"]
    assert grid[0] == ["caption", *GRID_COLUMNS]
    assert grid[2][0] == "a red circle on a blue background m-1 \u00b7 seed 1"
    assert grid[2][1:] == ["\u2013", "0.60", "0.70"]  # score under each image; the reference has none
    assert {"href": "mr_vs_steps.pdf"} in page.find("a")
    assert "mr vs steps" in html

    subruns = page.tables[""]
    assert subruns == [["name", "command", "status"], ["attack-nemo", "attack", "running"],
                       ["memorized", "evaluate", "done"]]
    assert not page.find("nav")  # one run: no table of contents
    manifest = page.find("details")
    assert [d.get("class") for d in manifest] == ["subruns", "manifest"] and not any("open" in d for d in manifest)
    assert page.tables["versions"] == [["package", "version"], ["python", "3.11.9"], ["dori", "0.1.0"]]
    assert "f688eab" in html and "dori demo --quick" in html
    assert "&#34;steps&#34;: 50" in html  # the config as pretty JSON
    assert "by dori 0.1.0" in html


def test_untrusted_text_is_escaped(demo):
    folder, _ = demo
    write_png(folder / "<img src=x onerror=alert(2)>.png", (0, 0, 0))
    grid = json.loads((folder / "grid.json").read_text())
    grid["rows"][1]["prompt_id"] = "<i>id</i>"
    (folder / "grid.json").write_text(json.dumps(grid))
    html = write_report([folder], title="<u>title</u>").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>" not in html
    assert "&lt;i&gt;id&lt;/i&gt;" in html and "<i>" not in html
    assert "&lt;u&gt;title&lt;/u&gt;" in html and "<u>" not in html
    page = Page(html)
    assert page.tables["grid"][1][0] == f"{XSS} m-0 \u00b7 seed 0"  # the caption's text is the literal string
    assert not any("onerror" in attrs for _, attrs in page.tags) and not page.find("script")
    assert "&lt;img src=x onerror=alert(2)&gt;.png" in html


def test_missing_or_outside_image_gives_placeholder(demo, tmp_path):
    folder, built = demo
    (folder / "images" / "m-1-nemo.png").unlink()
    secret = write_png(tmp_path / "secret.png", (1, 2, 3))
    grid = json.loads((folder / "grid.json").read_text())
    grid["rows"][0]["cells"]["nemo"]["image"] = "../secret.png"
    del grid["rows"][1]["cells"]["unmitigated"]  # a column missing from a row: an empty cell
    (folder / "grid.json").write_text(json.dumps(grid))
    html = write_report([folder]).read_text()
    page = Page(html)
    assert "missing: images/m-1-nemo.png" in html
    assert "outside the run folder: ../secret.png" in html
    assert base64.b64encode(secret).decode() not in html
    assert len(page.find("img")) == built["n_cells"] + built["n_figures"] - 3
    assert page.tables["grid"][2][1:] == ["\u2013", "", "missing: images/m-1-nemo.png 0.70"]


def test_bad_run_folders_raise(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DoriError, match=r"runs: .*plain is not a run folder \(no manifest.json\)"):
        write_report([tmp_path / "plain"])
    with pytest.raises(DoriError, match="nowhere is not a folder"):
        write_report([tmp_path / "nowhere"])
    with pytest.raises(DoriError, match="at least one run folder"):
        write_report([])
    write_manifest(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text("[1, 2]")
    with pytest.raises(DoriError, match="summary.json must be a list of Table-1 rows"):
        write_report([tmp_path / "run"])
    (tmp_path / "run" / "summary.json").write_text("{")
    with pytest.raises(DoriError, match="summary.json: not readable JSON"):
        write_report([tmp_path / "run"])
    assert not list(tmp_path.rglob("*.html"))


def test_several_folders_dict_summary_and_parquet(demo, tmp_path):
    folder, _ = demo
    evaluate = tmp_path / "evaluate-testbed"
    write_manifest(evaluate, command="evaluate")
    (evaluate / "summary.json").write_text(json.dumps({"threshold": 0.5, "mr": {"memorized": 0.975, "held-out": None},
                                                       "prompts": "testbed:memorized"}))
    analysis = tmp_path / "analysis-testbed"
    write_manifest(analysis, command="analyze")
    n = MAX_TABLE_ROWS + 50
    pd.DataFrame({"prompt": [f"<i>p{i}</i>" for i in range(n)], "score": np.linspace(0, 1, n) / 7,
                  "hit": [i % 2 == 0 for i in range(n)], "count": np.arange(n)}).to_parquet(analysis / "table.parquet")

    out = write_report([folder, evaluate, analysis], tmp_path / "out" / "all.html")
    html = out.read_text()
    page = Page(html)
    toc = [a["href"] for a in page.find("a") if a["href"].startswith("#")]
    assert toc == ["#run-1", "#run-2", "#run-3"]
    sections = [s["id"] for s in page.find("section")]
    assert sections == ["run-1", "run-2", "run-3"]
    assert html.index(folder.name) < html.index("evaluate-testbed") < html.index("analysis-testbed")
    assert "dori report: 3 runs" in html

    assert page.tables["summary dict"] == [["key", "value"], ["threshold", "0.5"], ["mr.memorized", "0.975"],
                                           ["mr.held-out", "\u2013"], ["prompts", "testbed:memorized"]]
    table = page.tables["parquet"]
    assert table[0] == ["prompt", "score", "hit", "count"]
    assert len(table) == 1 + MAX_TABLE_ROWS
    assert table[2] == ["<i>p1</i>", f"{1 / (n - 1) / 7:.3g}", "False", "1"]  # text as text, not markup
    assert f"first {MAX_TABLE_ROWS} of {n} rows" in html and "<i>" not in html
    assert {"href": "../demo-testbed-20250101T000000Z/mr_vs_steps.pdf"} in page.find("a")  # relative to the page


def test_out_folder_and_replacing_a_report(demo, tmp_path):
    folder, _ = demo
    (tmp_path / "reports").mkdir()
    first = write_report([folder], tmp_path / "reports")
    assert first == tmp_path / "reports" / "report.html"
    second = write_report(folder, first, title="again")  # one path is taken as a list of one
    assert second == first and "<title>again</title>" in first.read_text()
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["report.html"]


def test_cli_rows_table_has_per_kind_columns():
    from rich.console import Console

    from dori.cli.tables import rows_table

    console = Console(width=400, record=True)
    console.print(rows_table(TABLE1, "Table 1", threshold=0.5))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "MR VM" in line)
    assert header.index("MR TM") < header.index("MR VM") < header.index("any memorized") < header.index("any TM") \
        < header.index("any VM") < header.index("paper MR")
    nemo = next(line for line in lines if line.lstrip("│ ").startswith("nemo "))
    assert [cell.strip() for cell in nemo.split("│")[4:9]] == ["0.20", "0.30", "0.10", "0.85", "0.95"]
    assert "replication: similarity > 0.500" in "\n".join(lines)
