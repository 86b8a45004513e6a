"""The synthetic ``shapes`` data: determinism, held-out pairings, captions, config, files on disk."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_lightning.synth.shapes import (
    ALL_PAIRS,
    COLOURS,
    HELDOUT_PAIRS,
    INVERSE_RELATION,
    SHAPES,
    SIZE_AREAS,
    caption,
    heldout_pairs,
    position_word,
    relation_word,
    render,
    sample_scene,
)
from dalle_lightning.synth.shapes_dataset import (
    ShapesConfig,
    make_example,
    objects_from_json,
    write_shapes_dataset,
)
from data_schemas.shapes import SCHEMA

SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": ("center", "centre", "middle"),
}
RELATION_WORDS = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("left of",),
    "right of": ("right of",),
}


def _scenes(count: int, split: str = "train", seed: int = 0, p_two_objects: float = 0.5):
    return [
        sample_scene(np.random.default_rng([seed, i]), split, p_two_objects=p_two_objects)
        for i in range(count)
    ]


def test_same_seed_gives_same_scene_caption_and_pixels():
    a, b = (np.random.default_rng(7) for _ in range(2))
    scene_a, scene_b = sample_scene(a, "heldout"), sample_scene(b, "heldout")
    assert scene_a == scene_b
    assert caption(scene_a, a) == caption(scene_b, b)
    assert np.array_equal(np.asarray(render(scene_a, 64)), np.asarray(render(scene_b, 64)))


def test_images_of_one_description_vary():
    scenes = [s for s in _scenes(400, p_two_objects=0.0) if s.objects[0].position == "center"]
    by_object: dict = {}
    for scene in scenes:
        by_object.setdefault(scene.objects[0], []).append(scene)
    repeated = [group for group in by_object.values() if len(group) > 1]
    assert repeated, "expected some object description to repeat in 400 scenes"
    for group in repeated:
        assert len({(s.placements, s.background) for s in group}) == len(group)


def test_default_heldout_pairs_are_a_fifth_and_leave_every_colour_and_shape_in_train():
    assert 0.15 <= len(HELDOUT_PAIRS) / len(ALL_PAIRS) <= 0.20
    train_pairs = set(ALL_PAIRS) - HELDOUT_PAIRS
    assert {colour for colour, _ in train_pairs} == set(COLOURS)
    assert {shape for _, shape in train_pairs} == set(SHAPES)
    assert heldout_pairs(0.2) == HELDOUT_PAIRS
    assert heldout_pairs(0.0) == frozenset()
    assert heldout_pairs(0.1) < heldout_pairs(0.3)  # more held out keeps the first ones


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    train_pairs = {(o.colour, o.shape) for s in _scenes(600, "train") for o in s.objects}
    assert not train_pairs & HELDOUT_PAIRS
    assert train_pairs == set(ALL_PAIRS) - HELDOUT_PAIRS
    heldout = _scenes(300, "heldout", seed=1)
    for scene in heldout:
        assert {(o.colour, o.shape) for o in scene.objects} & HELDOUT_PAIRS
    assert {(o.colour, o.shape) for s in heldout for o in s.objects} >= HELDOUT_PAIRS


def test_positions_sizes_and_relations_match_the_geometry():
    for scene in _scenes(400, seed=2):
        for obj, place in zip(scene.objects, scene.placements, strict=True):
            low, high = SIZE_AREAS[obj.size]
            assert low <= place.area <= high
        if scene.relation is None:
            (place,) = scene.placements
            assert scene.objects[0].position == position_word(place.x - 0.5, place.y - 0.5)
        else:
            first, second = scene.placements
            assert scene.relation == scene.objects[0].position
            assert scene.relation == relation_word(first.x - second.x, first.y - second.y)
            assert scene.objects[1].position == INVERSE_RELATION[scene.relation]


def test_shapes_do_not_overlap_and_stay_inside():
    for scene in _scenes(200, seed=3, p_two_objects=1.0):
        image = np.asarray(render(scene, 64)).astype(int)
        background = np.asarray(scene.background)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])  # (4 * 64, 3)
        assert np.abs(border - background).max() <= 1
        first, second = (render(_alone(scene, i), 64) for i in range(2))
        touched = [np.abs(np.asarray(im).astype(int) - background).max(-1) > 1 for im in (first, second)]
        assert not (touched[0] & touched[1]).any()


def _alone(scene, index):
    """``scene`` with only object ``index`` drawn."""
    return replace(
        scene, objects=(scene.objects[index],), placements=(scene.placements[index],), relation=None
    )


def test_captions_name_every_attribute_in_varied_wording():
    rng = np.random.default_rng(4)
    wordings = set()
    for scene in _scenes(300, seed=4):
        text = caption(scene, rng)
        for obj in scene.objects:
            assert obj.colour in text and obj.shape in text, text
            assert any(word in text.split() for word in SIZE_WORDS[obj.size]), text
        if scene.relation is None:
            words = POSITION_WORDS[scene.objects[0].position]
            assert any(w in text for w in ((words,) if isinstance(words, str) else words)), text
        else:
            options = RELATION_WORDS[scene.relation] + RELATION_WORDS[INVERSE_RELATION[scene.relation]]
            assert any(w in text for w in options), text
        wordings.add(" ".join(w for w in text.split() if w not in {o.colour for o in scene.objects}))
    assert len(wordings) > 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 2.5),
        ("size", 8),
        ("seed", -1),
        ("heldout_fraction", 0.9),
        ("heldout_images", 1.5),
        ("p_two_objects", -0.1),
        ("p_two_objects", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ShapesConfig(**{field: value})


def test_config_needs_a_heldout_pairing_for_heldout_images():
    with pytest.raises(ValueError, match="heldout_fraction"):
        ShapesConfig(heldout_fraction=0.0, heldout_images=0.1)
    ShapesConfig(heldout_fraction=0.0, heldout_images=0.0)


def test_sample_scene_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "validation")


def test_write_shapes_dataset_writes_images_and_table(tmp_path):
    config = ShapesConfig(n=40, size=32, seed=5, heldout_images=0.3)
    table = write_shapes_dataset(str(tmp_path), config)
    assert table.schema.equals(SCHEMA, check_metadata=True)
    assert table.num_rows == 40
    assert pq.read_table(tmp_path / "shapes.parquet").equals(table)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    rows = table.to_pylist()
    assert {row["split"] for row in rows} == {"train", "heldout"}
    for index, row in enumerate(rows):
        assert row["file"] == f"images/{row['id']}.png"
        with Image.open(tmp_path / row["file"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        scene, text, split = make_example(config, index)
        assert (row["caption"], row["split"], row["relation"]) == (text, split, scene.relation)
        assert objects_from_json(row["objects"]) == list(scene.objects)
        assert {"x", "y", "area", "angle", "rgb"} <= set(json.loads(row["objects"])[0])
    again = write_shapes_dataset(str(tmp_path / "again"), config)
    assert again.equals(table)
