import numpy as np
import pytest
from PIL import Image

from dori.errors import DoriError
from dori.prompts import load_prompt_set, read_prompt_file


def test_csv_semicolon_with_index_and_type(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(";Caption;URL;type;Index\n0;a cat;u;VM;111\n1;a dog;u;TM;222\n")
    records = read_prompt_file(path)
    assert [(r.id, r.prompt, r.group) for r in records] == [("111", "a cat", "VM"), ("222", "a dog", "TM")]


def test_csv_comma_jsonl_and_txt(tmp_path):
    (tmp_path / "a.csv").write_text("id,prompt\nx,hello there\ny,\"a, quoted, caption\"\n")
    assert [r.prompt for r in read_prompt_file(tmp_path / "a.csv")] == ["hello there", "a, quoted, caption"]
    (tmp_path / "b.jsonl").write_text('{"caption": "one", "index": 5}\n\n{"caption": "two", "index": 6}\n')
    assert [(r.id, r.prompt) for r in read_prompt_file(tmp_path / "b.jsonl")] == [("5", "one"), ("6", "two")]
    (tmp_path / "c.txt").write_text("first\n\n  second  \n")
    assert [(r.id, r.prompt) for r in read_prompt_file(tmp_path / "c.txt")] == [("0", "first"), ("1", "second")]


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, "does not exist"),
    ("empty.csv", "", "empty"),
    ("empty.txt", "\n\n", "no prompts"),
    ("cols.csv", "id,url\n1,http://x\n", "no prompt column"),
    ("bad.jsonl", '{"caption": "ok"}\nnot json\n', "line 2 is not JSON"),
    ("dup.csv", "id,prompt\n1,a\n1,b\n", "id '1' twice"),
])
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DoriError, match=message):
        read_prompt_file(path)


def test_bundled_sets():
    webster = load_prompt_set("webster-sd1")
    assert len(webster) == 500
    assert webster.records[0].prompt == "The No Limits Business Woman Podcast"
    assert len(load_prompt_set("webster-sd1-vm")) == 112
    assert len(load_prompt_set("webster-sd1-tm")) == 388
    assert len(load_prompt_set("sd2-219")) == 219
    assert {r.group for r in load_prompt_set("webster-sd2").records} == {"MV", "TV"}
    assert len(load_prompt_set("laion-nonmem")) == 500
    assert len(load_prompt_set("coco-10k")) == 10000
    with pytest.raises(DoriError, match="neither a file nor a bundled set"):
        load_prompt_set("no-such-set")


def test_memorization_kinds_from_labels_and_the_testbed_manifest(tmp_path):
    from dori.memorization import summary_row

    assert {r.kind for r in load_prompt_set("webster-sd1-vm").records} == {"VM"}
    assert {r.kind for r in load_prompt_set("webster-sd1").records} == {"VM", "TM"}
    assert {r.kind for r in load_prompt_set("webster-sd2").records} == {"MV", "TV"}
    assert {r.kind for r in load_prompt_set("laion-nonmem").records} == {None}
    (tmp_path / "p.csv").write_text("id,prompt,group\na,one,VM\nb,two,TM\nc,three,other\n")
    assert [r.kind for r in read_prompt_file(tmp_path / "p.csv")] == ["VM", "TM", None]
    vm, tm = load_prompt_set("testbed:memorized-vm"), load_prompt_set("testbed:memorized-tm")
    memorized = load_prompt_set("testbed:memorized")
    assert {r.kind for r in vm.records} == {"VM"} and {r.kind for r in tm.records} <= {"TM"}
    assert len(vm) + len(tm) == len(memorized) and set(vm.references) <= set(memorized.references)
    # a row's MR per kind: every generation of the prompts of that kind
    # ... and against any memorized photo (gallery_max): a's second generation copies another photo
    records = [{"prompt_id": "a", "sscd_orig": 0.9, "gallery_max": 0.9}, {"prompt_id": "a", "sscd_orig": 0.1, "gallery_max": 0.8},
               {"prompt_id": "b", "sscd_orig": 0.8, "gallery_max": 0.8}, {"prompt_id": "x", "sscd_orig": 0.8, "gallery_max": 0.2}]
    row = summary_row("m", records, 0.5, kinds={"a": "VM", "b": "TM"})
    assert row["mr"] == 0.75 and row["mr_by_kind"] == {"TM": 1.0, "VM": 0.5}
    assert row["mr_gallery"] == 0.75 and row["mr_gallery_by_kind"] == {"TM": 1.0, "VM": 1.0}
    assert "mr_by_kind" not in summary_row("m", records, 0.5)


def test_reference_folder(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\na,one\nb,two\n")
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(refs / "a.png")
    with pytest.raises(DoriError, match="no image for prompt id 'b'"):
        load_prompt_set(str(tmp_path / "p.csv"), references=refs)
    (refs / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DoriError, match="not a readable image"):
        load_prompt_set(str(tmp_path / "p.csv"), references=refs)
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(refs / "b.jpg")
    prompt_set = load_prompt_set(str(tmp_path / "p.csv"), references=refs)
    assert prompt_set.references["b"].shape == (8, 8, 3) and prompt_set.references["b"].min() > 200


def test_prompt_sets_joined_by_plus(tmp_path, clip_tokenizer):
    memorized, shapes = load_prompt_set("testbed:memorized"), load_prompt_set("testbed:shape")
    joined = load_prompt_set("testbed:memorized+testbed:shape")
    assert [r.id for r in joined.records] == [r.id for r in memorized.records + shapes.records]
    assert set(joined.references) == set(memorized.references) | set(shapes.references)
    assert all(np.array_equal(joined.references[r.id], shapes.references[r.id]) for r in shapes.records[:5])
    assert set(joined.gallery) == set(memorized.gallery)
    # a file and a testbed set; the file's prompts carry no reference image
    (tmp_path / "p.csv").write_text("id,prompt\na,one\nb,two\n")
    mixed = load_prompt_set(f"{tmp_path / 'p.csv'}+testbed:memorized")
    assert [r.id for r in mixed.records][:2] == ["a", "b"] and len(mixed) == 2 + len(memorized)
    with pytest.raises(DoriError, match="id 'a' occurs twice"):
        load_prompt_set(f"{tmp_path / 'p.csv'}+{tmp_path / 'p.csv'}")
    with pytest.raises(DoriError, match="unknown testbed set 'testbed:nope'"):
        load_prompt_set("testbed:memorized+testbed:nope")
    # a file whose name holds '+' is that file
    (tmp_path / "a+b.txt").write_text("one\ntwo\n")
    assert [r.prompt for r in load_prompt_set(str(tmp_path / "a+b.txt")).records] == ["one", "two"]
    # on a model that is not the testbed, a joined spec that names a testbed set is refused, not read from the
    # shipped testbed
    from diffusers import StableDiffusionPipeline

    from dori.prompts import prompts_for
    from tests.conftest import tiny_components

    pipe = StableDiffusionPipeline(**tiny_components("sd1", clip_tokenizer))
    assert len(prompts_for(pipe, str(tmp_path / "p.csv"))) == 2
    with pytest.raises(DoriError, match="this model is not the testbed"):
        prompts_for(pipe, f"{tmp_path / 'p.csv'}+testbed:memorized")
