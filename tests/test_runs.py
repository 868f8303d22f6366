import json

import pytest

from dori.errors import DoriError
from dori.runs import RunFolder


def test_manifest_and_records(tmp_path):
    run = RunFolder(tmp_path / "r", "evaluate", {"a": 1}, seeds=[0, 1])
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and manifest["seeds"] == [0, 1] and manifest["status"] == "running"
    assert {"torch", "diffusers", "python"} <= set(manifest["versions"])
    run.append([{"key": "a#0", "v": 1}, {"key": "a#1", "v": 2}])
    assert run.done_keys() == {"a#0", "a#1"}
    run.finalize({"rows": []})
    import pandas as pd

    table = pd.read_parquet(tmp_path / "r" / "records.parquet")
    assert list(table["key"]) == ["a#0", "a#1"]
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["status"] == "done"


def test_columns_of_empty_dicts_are_written(tmp_path):
    """NeMo's record of a prompt it does not flag has empty selections: Parquet must still take them."""
    import pandas as pd

    run = RunFolder(tmp_path / "r", "localize", {})
    run.append([{"key": "a", "initial": {}, "refined": {}, "n": 0}, {"key": "b", "initial": {}, "refined": {"x": [1]}, "n": 1}])
    run.finalize()
    table = pd.read_parquet(tmp_path / "r" / "records.parquet")
    assert list(table["initial"]) == ["{}", "{}"] and list(table["n"]) == [0, 1]
    assert list(table["refined"][1]["x"]) == [1]


def test_a_line_cut_by_a_kill_is_dropped_and_repaired(tmp_path):
    run = RunFolder(tmp_path / "r", "evaluate", {"a": 1})
    run.append([{"key": "k1"}])
    with open(run.records_file, "a") as f:
        f.write('{"key": "k2", "trunc')
    assert run.done_keys() == {"k1"}
    again = RunFolder(tmp_path / "r", "evaluate", {"a": 1})
    again.append([{"key": "k2"}])
    assert again.done_keys() == {"k1", "k2"}
    assert len(again.records_file.read_text().splitlines()) == 2


def test_other_config_refuses_unless_overwrite(tmp_path):
    RunFolder(tmp_path / "r", "evaluate", {"a": 1}).append([{"key": "x"}])
    with pytest.raises(DoriError, match="another config"):
        RunFolder(tmp_path / "r", "evaluate", {"a": 2})
    fresh = RunFolder(tmp_path / "r", "evaluate", {"a": 2}, overwrite=True)
    assert fresh.done_keys() == set()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(DoriError, match="not a dori run folder"):
        RunFolder(tmp_path / "other", "evaluate", {"a": 1})
