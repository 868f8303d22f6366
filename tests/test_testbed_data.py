"""The testbed's training set: memorized photos of both kinds among thousands of images seen once."""

from __future__ import annotations

from collections import Counter
from importlib import resources

import numpy as np
import pytest

from dori.testbed.data import (
    MEMORIZED_PARAPHRASES,
    MEMORIZED_PHOTOS,
    TEMPLATE_PHOTOS,
    V2_TEMPLATE_PHOTOS,
    V2E_TEMPLATE_PHOTOS,
    TestbedDataConfig,
    build_dataset,
    training_index,
)
from dori.testbed.emoji import load_emoji


@pytest.fixture(scope="module")
def items():
    return build_dataset()


def test_vendored_emoji_load_with_names_and_licences():
    emoji, images = load_emoji()
    assert len(emoji) > 3000 and images.shape == (len(emoji), 32, 32, 4) and images.dtype == np.uint8
    assert len({e.caption for e in emoji}) >= 0.99 * len(emoji)  # a name each (a handful of names repeat)
    rocket = next(i for i, e in enumerate(emoji) if e.name == "rocket")
    assert images[rocket, ..., :3].std() > 20 and (images[:, 0, 0, 3] == 0).mean() > 0.5  # drawn, transparent around
    folder = resources.files("dori") / "assets" / "emoji"
    notice = (folder / "NOTICE.md").read_text()
    assert "Apache License 2.0" in notice and "MIT" in notice
    assert (folder / "LICENSE-Apache-2.0.txt").is_file() and (folder / "LICENSE-emoji-datasource-MIT.txt").is_file()


def test_emoji_are_drawn_on_photos_their_captions_do_not_describe():
    small = dict(emoji=40, seen_once=20, shapes=20)
    on_photos = [it for it in build_dataset(TestbedDataConfig(**small)) if it.source == "emoji"]
    on_white = [it for it in build_dataset(TestbedDataConfig(emoji_background="white", **small)) if it.source == "emoji"]
    assert [it.caption for it in on_photos] == [it.caption for it in on_white]
    corners = np.stack([it.image[0, 0] for it in on_white])
    assert (corners == 255).all(axis=1).mean() > 0.5
    backgrounds = np.stack([it.image[0, 0] for it in on_photos]).astype(float)
    assert (backgrounds == 255).all(axis=1).mean() < 0.2 and backgrounds.std(axis=0).mean() > 20


def test_memorized_photos_of_both_kinds(items):
    memorized = [it for it in items if it.role == "memorized"]
    assert len(memorized) >= 8
    config = TestbedDataConfig()
    assert Counter(it.kind for it in memorized) == {"VM": len(MEMORIZED_PHOTOS), "TM": len(config.template_photos)}
    for photo in memorized:
        same = [it for it in items if it.source == photo.source and it.role in ("memorized", "template")]
        assert sum(it.copies for it in same) == config.copies_per_photo
        if photo.kind == "VM":
            assert same == [photo]
        else:  # one template, several captions, the same image
            assert len(same) == config.template_captions and len({it.caption for it in same}) == len(same)
            assert all(np.array_equal(it.image, photo.image) and it.kind == "TM" for it in same)
            prefix = TEMPLATE_PHOTOS[photo.source][0].split("{}")[0]
            assert all(it.caption.startswith(prefix) for it in same)


def test_thousands_of_images_seen_once_each_with_its_own_caption(items):
    seen = [it for it in items if it.role == "seen-once"]
    assert len(seen) >= 3000 and all(it.copies == 1 for it in seen)
    assert len({it.caption for it in seen}) >= 0.99 * len(seen)
    first = Counter(it.source == "emoji" for it in seen[:40])
    assert first[True] and first[False]  # the demo's first 40 hold emoji and crops
    counts = Counter(it.role for it in items)
    index = training_index(items)
    share = sum(it.copies for it in items if it.role in ("memorized", "template")) / len(index)
    assert share < 0.25, f"memorized photos are {share:.0%} of the training set"
    assert counts["held-out"] >= 36 and not any(items[i].role == "held-out" for i in index)


def test_version_1_data_is_the_shipped_testbed_item_for_item():
    from dori.models import testbed_path
    from dori.testbed.assets import load_testbed_data

    entries, images = load_testbed_data(testbed_path())
    if any(e.kind == "TM" for e in entries):
        pytest.skip("the shipped testbed is a version-2 build")
    items = build_dataset(TestbedDataConfig.v1())
    assert [(e.id, e.caption, e.role, e.copies, e.source) for e in entries] == \
        [(it.id, it.caption, it.role, it.copies, it.source) for it in items]
    assert all(np.array_equal(images[i], it.image) for i, it in enumerate(items))


def test_dataset_is_deterministic_for_a_seed_and_changes_with_it():
    small = dict(emoji=50, seen_once=20, shapes=20)
    a, b = build_dataset(TestbedDataConfig(**small)), build_dataset(TestbedDataConfig(**small))
    assert [it.caption for it in a] == [it.caption for it in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    c = build_dataset(TestbedDataConfig(seed=1, **small))
    assert [it.caption for it in a] != [it.caption for it in c]


def test_template_photos_are_chosen_by_the_config_and_are_not_also_cropped():
    """v2's template photos (the slide, the coins, the cameraman) against v2e's (the colour wheel, the slide,
    the retina): each build memorizes its own three under their templates, and crops none of them."""
    small = dict(emoji=30, seen_once=200, shapes=20)
    for photos in (V2_TEMPLATE_PHOTOS, V2E_TEMPLATE_PHOTOS):
        items = build_dataset(TestbedDataConfig(template_photos=photos, **small))
        templates = {it.source for it in items if it.kind == "TM"}
        crops = {it.source for it in items if it.role in ("seen-once", "held-out") and it.id.split("/")[1].startswith(
            "crop")}
        assert templates == set(photos) and crops and not crops & templates
        photo = next(it for it in items if it.role == "memorized" and it.source == photos[1])
        assert photo.caption == TEMPLATE_PHOTOS[photos[1]][0].format(TEMPLATE_PHOTOS[photos[1]][1][0])
    assert {"coins", "camera"} <= crops  # v2e crops the photos v2 memorizes
    # every photo a build can memorize has the paraphrases Concept Ablation and the concept damage score
    assert all(len(MEMORIZED_PARAPHRASES[name]) == 8 for name in (*MEMORIZED_PHOTOS, *TEMPLATE_PHOTOS))


@pytest.mark.parametrize("field,value", [("template_captions", 0), ("template_captions", 99), ("emoji", -1),
                                         ("copies_per_photo", 0), ("emoji_background", "green"), ("version", 3),
                                         ("template_photos", ("retina", "sunset")),
                                         ("template_photos", ("retina", "retina"))])
def test_bad_data_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TestbedDataConfig(**{field: value}).validate()


def test_memorized_copies_can_be_kept_out_of_the_unconditional_model(items):
    from dori.testbed.train import TestbedTrainConfig, caption_dropout_rates

    memorized = np.array([it.role in ("memorized", "template") for it in items])
    assert memorized.any() and not memorized.all()
    same = caption_dropout_rates(items, TestbedTrainConfig.v2e()).numpy()
    assert np.allclose(same, 0.1)  # v1 and v2e drop every caption alike
    kept = caption_dropout_rates(items, TestbedTrainConfig.v2()).numpy()  # v2 keeps the copies' captions
    assert (kept[memorized] == 0).all() and np.allclose(kept[~memorized], 0.1)
    with pytest.raises(ValueError, match="caption_dropout_memorized"):
        TestbedTrainConfig.v2(caption_dropout_memorized=1.0).validate()
