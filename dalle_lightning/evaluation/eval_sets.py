"""The fixed caption sets a model is evaluated on, each with one real image per caption.

- ``shapes``: scenes from the synthetic generator
  (:func:`~dalle_lightning.synth.shapes_dataset.make_example`) with their own
  seed, so the images are new to the model; a share ``heldout_images`` of them
  shows a colour–shape pairing held out of the training split. Each caption
  keeps its scene (``truths``) and pairing (``seen`` / ``heldout``), which
  :mod:`.shapes_accuracy` needs.
- ``filter``: a fixed sample of ``filter/<dataset>`` rows: those whose
  hash(seed, key) is smallest, which does not depend on the order of shards
  and keeps the same rows when data is added unless new keys hash lower.
  Images are centre-cropped and resized like the tokenize stage does.

A set's fingerprint is a digest of its content (captions, images, truths),
so runs evaluated on equal fingerprints are comparable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.evaluation.shapes_accuracy import pairing_of_split
from dalle_lightning.synth.shapes import DEFAULT_HELDOUT_FRACTION, ShapeObject

SOURCES = ("shapes", "filter")
VERSION = 1


@dataclass(frozen=True)
class EvalSetConfig:
    """Which captions to evaluate on."""

    source: str = "shapes"
    """``shapes``: scenes from the synthetic generator; ``filter``: a fixed sample of ``filter/<dataset>``."""
    count: int = 64
    """Captions in the set."""
    seed: int = 1_000_003
    """Seed of the scenes (``shapes``; unlike the ``synth shapes`` default of 0) or of the row sample (``filter``)."""
    dataset: str = "default"
    """``filter``: the dataset under the root to sample."""
    heldout_images: float = 0.5
    """``shapes``: share of captions showing a held-out colour–shape pairing."""
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    """``shapes``: share of pairings held out of training; must be the training data's."""
    p_two_objects: float = 0.5
    """``shapes``: probability of a two-object scene."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        for name, minimum in (("count", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name, maximum in (("heldout_images", 1.0), ("heldout_fraction", 0.5), ("p_two_objects", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= maximum:
                raise ValueError(f"{name} must be a number in [0, {maximum}], got {value!r}")
        if not self.dataset:
            raise ValueError("dataset must be a non-empty name")


@dataclass
class EvalSet:
    """Captions with one real image each, and for ``shapes`` their scenes and pairings."""

    source: str
    captions: list[str]
    images: np.ndarray
    """uint8 (C, S, S, 3): the real image of each caption."""
    truths: list[tuple[ShapeObject, ...]] | None
    """``shapes``: the objects of each caption's scene; else ``None``."""
    pairings: list[str] | None
    """``shapes``: ``seen`` or ``heldout`` per caption; else ``None``."""
    keys: list[str]
    """Where each caption comes from: ``shapes:<seed>:<index>`` or the ``filter`` row key."""

    @property
    def fingerprint(self) -> str:
        """A digest of the set's content: equal fingerprints, equal captions, images and truths."""
        truths = [[vars(o) for o in t] for t in self.truths] if self.truths is not None else None
        pixels = hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()
        return fingerprint(
            "eval_set", VERSION, self.source, self.captions, truths, self.pairings, pixels, self.images.shape
        )

    def summary(self) -> dict[str, int]:
        """Caption counts: ``captions`` and, for ``shapes``, ``seen`` and ``heldout``."""
        out = {"captions": len(self.captions)}
        if self.pairings is not None:
            out.update({p: self.pairings.count(p) for p in ("seen", "heldout")})
        return out


def build_eval_set(config: EvalSetConfig, image_size: int, root: str | None = None) -> EvalSet:
    """The set ``config`` describes, real images at ``image_size`` (``root``: the dataset root, for ``filter``)."""
    if config.source == "shapes":
        return shapes_eval_set(config, image_size)
    if root is None:
        raise ValueError("the filter caption set needs the dataset root (root=...)")
    return filtered_eval_set(root, config, image_size)


def shapes_eval_set(config: EvalSetConfig, image_size: int) -> EvalSet:
    """``config.count`` scenes of the shapes generator with ``config.seed``, rendered at ``image_size``."""
    from dalle_lightning.synth.shapes import render
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

    shapes = ShapesConfig(
        n=config.count,
        size=image_size,
        seed=config.seed,
        heldout_fraction=config.heldout_fraction,
        heldout_images=config.heldout_images,
        p_two_objects=config.p_two_objects,
    )
    captions, images, truths, pairings = [], [], [], []
    for index in range(config.count):
        scene, caption, split = make_example(shapes, index)
        captions.append(caption)
        images.append(np.asarray(render(scene, image_size), dtype=np.uint8))
        truths.append(tuple(scene.objects))
        pairings.append(pairing_of_split(split))
    keys = [f"shapes:{config.seed}:{i}" for i in range(config.count)]
    return EvalSet("shapes", captions, np.stack(images), truths, pairings, keys)


def filtered_eval_set(root: str, config: EvalSetConfig, image_size: int) -> EvalSet:
    """The ``config.count`` rows of ``<root>/filter/<config.dataset>`` with the smallest hash(seed, key)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dalle_lightning.data.transforms import center_crop_resize, decode_image
    from dalle_lightning.datasets.layout import DatasetLayout
    from dalle_lightning.datasets.parquet_io import list_parts, read_parquet

    parts = list_parts(DatasetLayout(root).dataset("filter", config.dataset))
    if not parts:
        raise ValueError(f"no filtered shards of {config.dataset!r} under {root}: run `dalle ingest` first")
    ranked = []
    for part in parts:
        for key in read_parquet(part, columns=["key"]).column("key").to_pylist():
            ranked.append((hashlib.sha256(f"{config.seed}:{key}".encode()).hexdigest(), key, part))
    chosen = sorted(ranked)[: config.count]
    if len(chosen) < config.count:
        raise ValueError(f"filter/{config.dataset} has {len(chosen)} rows, fewer than count={config.count}")
    rows: dict[str, tuple[str, bytes]] = {}
    for part in sorted({p for _, _, p in chosen}):
        wanted = [k for _, k, p in chosen if p == part]
        table = read_parquet(part, columns=["key", "caption", "image"])
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(wanted, pa.string())))
        for key, caption, image in zip(
            *(table.column(c).to_pylist() for c in ("key", "caption", "image")), strict=True
        ):
            rows[key] = (caption or "", image)
    keys = [k for _, k, _ in chosen]
    images = np.stack([center_crop_resize(decode_image(rows[k][1]), image_size) for k in keys])
    return EvalSet("filter", [rows[k][0] for k in keys], images, None, None, keys)
