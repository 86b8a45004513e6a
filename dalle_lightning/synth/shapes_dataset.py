"""The ``shapes`` data set on disk: ``ShapesConfig``, ground truth as JSON, ``write_shapes_dataset``.

Scenes, rendering and captions are in :mod:`dalle_lightning.synth.shapes`;
the table's schema is :mod:`data_schemas.shapes`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dalle_lightning.synth.shapes import (
    DEFAULT_HELDOUT_FRACTION,
    Scene,
    ShapeObject,
    caption,
    heldout_pairs,
    render,
    sample_scene,
)
from data_schemas.shapes import NAME, SCHEMA


@dataclass(frozen=True)
class ShapesConfig:
    """How many ``shapes`` images to make, how large, and how they are split."""

    n: int = 2000
    """Number of images."""
    size: int = 64
    """Side of each square image in pixels."""
    seed: int = 0
    """Seed; image ``i`` depends only on (seed, i), so a larger ``n`` keeps the first images."""
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    """Share of the 21 colour–shape pairings kept out of ``train`` (0 to 0.5), see :func:`heldout_pairs`."""
    heldout_images: float = 0.1
    """Probability that an image belongs to the ``heldout`` split (shows a held-out pairing)."""
    p_two_objects: float = 0.5
    """Probability that an image shows two objects rather than one."""

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("size", self.size, 16)
        _check_int("seed", self.seed, 0)
        _check_fraction("heldout_fraction", self.heldout_fraction, 0.5)
        _check_fraction("heldout_images", self.heldout_images, 1.0)
        _check_fraction("p_two_objects", self.p_two_objects, 1.0)
        if self.heldout_images > 0 and not heldout_pairs(self.heldout_fraction):
            raise ValueError(
                f"heldout_fraction={self.heldout_fraction} holds out no pairing, "
                f"but heldout_images={self.heldout_images} asks for held-out images"
            )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object, maximum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= maximum:
        raise ValueError(f"{name} must be a number in [0, {maximum}], got {value!r}")


def objects_to_json(scene: Scene) -> str:
    """Ground truth as JSON: a list of objects, each with ``shape``, ``colour``, ``size``,
    ``position`` (caption words, see the module docstring), centroid ``x``, ``y`` (fractions of the
    side, y down), ``area`` (fraction of the image), ``angle`` (radians) and ``rgb``."""
    records = [
        {**vars(obj), **vars(p), "rgb": list(p.rgb)}
        for obj, p in zip(scene.objects, scene.placements, strict=True)
    ]
    return json.dumps(records)


def objects_from_json(text: str) -> list[ShapeObject]:
    """The :class:`ShapeObject` records of an ``objects`` column value."""
    return [ShapeObject(r["shape"], r["colour"], r["size"], r["position"]) for r in json.loads(text)]


def make_example(config: ShapesConfig, index: int) -> tuple[Scene, str, str]:
    """Scene, caption and split of image ``index``; depends only on (config, index)."""
    rng = np.random.default_rng([config.seed, index])
    split = "heldout" if rng.random() < config.heldout_images else "train"
    heldout = heldout_pairs(config.heldout_fraction)
    scene = sample_scene(rng, split, p_two_objects=config.p_two_objects, heldout=heldout)
    return scene, caption(scene, rng), split


def write_shapes_dataset(out_dir: str, config: ShapesConfig) -> pa.Table:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/shapes.parquet``; return the table.

    One row per image, written against :data:`SCHEMA`: ``id``, ``file``
    (``images/<id>.png``, relative to ``out_dir``), ``caption``, ``split``
    (``train`` / ``heldout``), ``objects`` (JSON, see :func:`objects_to_json`)
    and ``relation`` (null for one object). The Parquet file is written to a
    temporary name and renamed into place, so a reader never sees half of it;
    re-running with the same config writes the same images and rows.
    """
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = [_write_example(root, config, index) for index in range(config.n)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = root / f".{NAME}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, root / f"{NAME}.parquet")
    return table


def _write_example(root: Path, config: ShapesConfig, index: int) -> dict[str, str | None]:
    """Render image ``index`` to ``root/images/<id>.png`` (lossless) and return its row."""
    scene, text, split = make_example(config, index)
    key = f"{index:07d}"
    file = f"images/{key}.png"
    render(scene, config.size).save(root / file, format="PNG", compress_level=1)
    return {
        "id": key,
        "file": file,
        "caption": text,
        "split": split,
        "objects": objects_to_json(scene),
        "relation": scene.relation,
    }
