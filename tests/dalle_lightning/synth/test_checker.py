"""The exact checker: agreement with the ground truth on JPEG-compressed renders, edge cases, compare."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dalle_lightning.synth.checker import compare, read_shapes, summarise
from dalle_lightning.synth.shapes import ShapeObject, render, sample_scene


def _jpeg(image: Image.Image, quality: int = 95) -> Image.Image:
    """Re-encode like the downloader does (JPEG, quality 95, 4:2:0 chroma)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _agreement(size: int, count: int, seed: int) -> dict[str, float]:
    results = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng, "heldout" if index % 4 == 0 else "train")
        results.append(compare(read_shapes(_jpeg(render(scene, size))), list(scene.objects)))
    return summarise(results)


@pytest.mark.parametrize(("size", "minimum"), [(64, 0.99), (32, 0.99)])
def test_checker_agrees_with_ground_truth_after_jpeg(size, minimum, capsys):
    rates = _agreement(size, count=500, seed=size)
    with capsys.disabled():
        print(f"\nchecker agreement at {size} px after JPEG q95, 500 images: {rates}")
    assert rates["all"] >= minimum, rates


def test_blank_and_speckled_images_have_no_objects():
    blank = np.full((64, 64, 3), 230, dtype=np.uint8)
    assert read_shapes(blank) == []
    speckled = blank.copy()
    rng = np.random.default_rng(0)
    speckled[rng.integers(0, 64, 12), rng.integers(0, 64, 12)] = (200, 0, 0)  # isolated red pixels
    noisy = np.clip(speckled + rng.normal(0, 6, speckled.shape), 0, 255).astype(np.uint8)
    assert read_shapes(_jpeg(Image.fromarray(noisy))) == []


def test_accepts_pil_images_and_arrays_of_any_size_from_32():
    scene = sample_scene(np.random.default_rng(3), p_two_objects=1.0)
    image = render(scene, 48)
    assert read_shapes(image) == read_shapes(np.asarray(image))
    assert compare(read_shapes(image), list(scene.objects))["all"]
    assert compare(read_shapes(render(scene, 96).convert("RGBA")), list(scene.objects))["all"]


def test_rejects_tiny_images_and_other_inputs():
    with pytest.raises(ValueError, match="32"):
        read_shapes(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="list"):
        read_shapes([[0, 0, 0]])


RED_CIRCLE_ABOVE = ShapeObject("circle", "red", "large", "above")
BLUE_SQUARE_BELOW = ShapeObject("square", "blue", "small", "below")


def test_compare_matches_objects_in_any_order():
    truth = [RED_CIRCLE_ABOVE, BLUE_SQUARE_BELOW]
    result = compare([BLUE_SQUARE_BELOW, RED_CIRCLE_ABOVE], truth)
    assert result == {
        "count": True,
        "colour": True,
        "shape": True,
        "size": True,
        "position": True,
        "all": True,
    }


def test_compare_reports_each_attribute():
    truth = [RED_CIRCLE_ABOVE, BLUE_SQUARE_BELOW]
    wrong_shape = [ShapeObject("triangle", "red", "large", "above"), BLUE_SQUARE_BELOW]
    result = compare(wrong_shape, truth)
    assert result == {
        "count": True,
        "colour": True,
        "shape": False,
        "size": True,
        "position": True,
        "all": False,
    }
    swapped = [
        ShapeObject("circle", "red", "large", "below"),
        ShapeObject("square", "blue", "small", "above"),
    ]
    assert compare(swapped, truth) == {**result, "shape": True, "position": False}
    missing = compare([RED_CIRCLE_ABOVE], truth)
    assert not any(missing.values())
    assert compare([], [])["all"]


def test_summarise_gives_shares():
    results = [compare([RED_CIRCLE_ABOVE], [RED_CIRCLE_ABOVE]), compare([], [RED_CIRCLE_ABOVE])]
    assert summarise(results) == {
        "count": 0.5,
        "colour": 0.5,
        "shape": 0.5,
        "size": 0.5,
        "position": 0.5,
        "all": 0.5,
    }
    with pytest.raises(ValueError):
        summarise([])
