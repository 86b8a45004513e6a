"""The synthetic ``shapes`` data set: one or two coloured shapes on a plain background.

Every image comes with exact ground truth (a :class:`Scene`) and a caption in
varied wording ("a large red circle above a small blue square"). Images of one
caption vary — position and size within their class, rotation, shade of the
colour and of the background — so a model has to generalise. A fixed set of
colour–shape pairings (:data:`HELDOUT_PAIRS`) never appears in the ``train``
split; every ``heldout`` image shows at least one of them, which measures
zero-shot composition (DESIGN.md, Evaluation).

Coordinates are fractions of the image side, x to the right and y down, so one
scene renders at any size. An object's ``position`` is a caption word:

* one object: where it sits in the image — ``left``, ``right``, ``top``,
  ``bottom`` or ``center`` (:func:`position_word`);
* two objects: where each sits relative to the other. The FIRST object's word
  is the scene's ``relation`` (``above``, ``below``, ``left of``,
  ``right of``: first relative to second) and the second object's word is the
  inverse (:func:`relation_word`), so the words do not depend on the order.

Sizes are areas: ``small`` covers 2.0–2.8 % of the image, ``large`` 6–8 %.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOUR_HUES = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 228.0,
    "purple": 280.0,
}  # HSV hue in degrees; neighbours are >= 28 degrees apart
COLOURS = tuple(COLOUR_HUES)
SIZE_AREAS = {"small": (0.020, 0.028), "large": (0.060, 0.080)}  # fraction of the image area
SIZES = tuple(SIZE_AREAS)
SIZE_THRESHOLD = math.sqrt(SIZE_AREAS["small"][1] * SIZE_AREAS["large"][0])  # between the classes
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("above", "below", "left of", "right of")
INVERSE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
CENTER_RADIUS = 0.11  # a lone object is "center" when both centroid offsets are below this
ALL_PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
SPLITS = ("train", "heldout")

_DIRECTIONS = {  # unit offset (dx, dy) of a word; y grows downwards
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}
_CENTER_JITTER = 0.05  # max centroid offset of a "center" object
_SIDE_OFFSET = (0.17, 0.30)  # centroid offset of a lone object along its side's axis
_PAIR_OFFSET = (0.28, 0.60)  # centroid offset between two objects along the relation's axis
_OFF_AXIS = 0.4  # max off-axis offset, as a share of the on-axis one
_MARGIN = 0.03  # shapes stay this far inside the image
_GAP = 0.1  # and this far apart from each other (3 px at 32 px)
_HUE_JITTER = 4.0
_SATURATION = (0.75, 1.0)
_VALUE = (0.75, 0.92)  # darker than any background, so every colour differs in luma too
_BACKGROUND_VALUE = (0.90, 1.0)
_BACKGROUND_SATURATION = (0.0, 0.05)
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class ShapeObject:
    """Ground truth of one object, in caption words; see the module docstring for ``position``."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Placement:
    """Where and how one object is drawn (fractions of the image side / area)."""

    x: float
    y: float
    area: float
    angle: float  # radians, counter-clockwise on screen
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """Objects (ground truth), the first object's relation to the second (None for one object), drawing."""

    objects: tuple[ShapeObject, ...]
    relation: str | None
    placements: tuple[Placement, ...]
    background: tuple[int, int, int]


def heldout_pairs(fraction: float) -> frozenset[tuple[str, str]]:
    """The ``round(fraction * 21)`` (colour, shape) pairings kept out of ``train``.

    Pairing ``k`` is (``COLOURS[2k mod 7]``, ``SHAPES[k mod 3]``): this walks all 21
    pairings once, spreads the held-out ones over colours and shapes, and up to
    a fraction of 0.5 leaves every colour and every shape in ``train``.
    """
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in [0, 0.5], got {fraction!r}")
    count = round(fraction * len(ALL_PAIRS))
    return frozenset((COLOURS[(2 * k) % len(COLOURS)], SHAPES[k % len(SHAPES)]) for k in range(count))


DEFAULT_HELDOUT_FRACTION = 0.2
# red circle, yellow square, cyan triangle, purple circle: 4 of 21 pairings (19 %)
HELDOUT_PAIRS = heldout_pairs(DEFAULT_HELDOUT_FRACTION)


def position_word(dx: float, dy: float) -> str:
    """The position of a lone object whose centroid is ``(dx, dy)`` from the image centre."""
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def relation_word(dx: float, dy: float) -> str:
    """The relation of an object to another whose centroid is ``(dx, dy)`` away from it (dominant axis)."""
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# --- sampling -------------------------------------------------------------------------------------


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    *,
    p_two_objects: float = 0.5,
    heldout: frozenset[tuple[str, str]] = HELDOUT_PAIRS,
) -> Scene:
    """Draw a random scene: two objects with probability ``p_two_objects``, else one.

    In the ``train`` split no object has a (colour, shape) pairing in
    ``heldout``; in the ``heldout`` split at least one object has. Two objects
    never share shape, colour and size all at once.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "heldout" and not heldout:
        raise ValueError("split 'heldout' needs at least one held-out pairing; the set is empty")
    count = 2 if rng.random() < p_two_objects else 1
    kinds = _sample_kinds(rng, count, split, heldout)
    if count == 1:
        relation = None
        words = [POSITIONS[rng.integers(len(POSITIONS))]]
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        words = [relation, INVERSE_RELATION[relation]]
    objects = tuple(
        ShapeObject(shape, colour, size, word)
        for (shape, colour, size), word in zip(kinds, words, strict=True)
    )
    colours = [_shade(rng, obj.colour) for obj in objects]
    return Scene(objects, relation, _place(rng, objects, colours), _background(rng))


def _sample_kinds(
    rng: np.random.Generator, count: int, split: str, heldout: frozenset[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """(shape, colour, size) of each object, all different; a ``heldout`` scene has one held-out pairing."""
    allowed = ALL_PAIRS if split == "heldout" else tuple(p for p in ALL_PAIRS if p not in heldout)
    kinds: list[tuple[str, str, str]] = []
    while len(kinds) < count:
        pool = sorted(heldout) if split == "heldout" and not kinds else allowed
        colour, shape = pool[rng.integers(len(pool))]
        kind = (shape, colour, SIZES[rng.integers(len(SIZES))])
        if kind not in kinds:
            kinds.append(kind)
    order = rng.permutation(count)
    return [kinds[i] for i in order]


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A jittered RGB shade of a palette colour."""
    hue = (COLOUR_HUES[colour] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360.0
    rgb = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(*_SATURATION), rng.uniform(*_VALUE))
    return tuple(round(255 * c) for c in rgb)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, nearly grey background shade."""
    rgb = colorsys.hsv_to_rgb(
        rng.random(), rng.uniform(*_BACKGROUND_SATURATION), rng.uniform(*_BACKGROUND_VALUE)
    )
    return tuple(round(255 * c) for c in rgb)


def _place(
    rng: np.random.Generator, objects: tuple[ShapeObject, ...], colours: list[tuple[int, int, int]]
) -> tuple[Placement, ...]:
    """Reject-sample areas, rotations and centres until the shapes fit, apart, where the words say."""
    for _ in range(_MAX_TRIES):
        centres = _centres(rng, objects[0].position, len(objects))
        placements = tuple(
            Placement(float(x), float(y), rng.uniform(*SIZE_AREAS[obj.size]), _angle(rng, obj.shape), rgb)
            for obj, (x, y), rgb in zip(objects, centres, colours, strict=True)
        )
        outlines = [_outline(obj.shape, p) for obj, p in zip(objects, placements, strict=True)]
        inside = all(o.min() >= _MARGIN and o.max() <= 1.0 - _MARGIN for o in outlines)
        if inside and (len(outlines) == 1 or _separated(outlines[0], outlines[1], _GAP)):
            return placements
    raise RuntimeError(f"could not place {objects} in {_MAX_TRIES} tries")


def _angle(rng: np.random.Generator, shape: str) -> float:
    """A rotation covering the shape's distinct orientations."""
    symmetry = {"circle": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3}[shape]
    return rng.uniform(0.0, symmetry) if symmetry else 0.0


def _centres(rng: np.random.Generator, word: str, count: int) -> list[tuple[float, float]]:
    """Object centroids matching ``word``: a lone object's position, or the first object's relation."""
    if word == "center":
        dx, dy = rng.uniform(-_CENTER_JITTER, _CENTER_JITTER, 2)
        return [(0.5 + dx, 0.5 + dy)]
    along = rng.uniform(*(_SIDE_OFFSET if count == 1 else _PAIR_OFFSET))
    across = rng.uniform(-_OFF_AXIS, _OFF_AXIS) * along
    ux, uy = _DIRECTIONS[word]
    dx, dy = ux * along + uy * across, uy * along + ux * across
    if count == 1:
        return [(0.5 + dx, 0.5 + dy)]
    mx, my = rng.uniform(0.3, 0.7, 2)
    return [(mx + dx / 2, my + dy / 2), (mx - dx / 2, my - dy / 2)]


# --- geometry and rendering -----------------------------------------------------------------------


_TURNS = {k: 2 * math.pi * np.arange(k) / k for k in (3, 4, 24)}  # vertex angles of a regular k-gon
_NEXT = {k: (np.arange(k) + 1) % k for k in (3, 4, 24)}  # index of the following vertex


def _outline(shape: str, p: Placement) -> np.ndarray:
    """Convex polygon (K, 2) containing the shape: exact for square and triangle, the circumscribed
    24-gon for a circle."""
    if shape == "circle":
        sides = 24
        radius = math.sqrt(p.area / math.pi) / math.cos(math.pi / sides)
        start = 0.0
    elif shape == "square":
        sides = 4
        radius = math.sqrt(p.area / 2)  # half diagonal
        start = math.pi / 4
    else:
        sides = 3
        radius = math.sqrt(4 * p.area / math.sqrt(3)) / math.sqrt(3)  # circumradius of the equilateral
        start = math.pi / 2  # pointing up at angle 0
    theta = start + p.angle + _TURNS[sides]
    outline = np.empty((sides, 2))  # (K, 2)
    outline[:, 0] = p.x + radius * np.cos(theta)
    outline[:, 1] = p.y - radius * np.sin(theta)
    return outline


def _separated(a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    """True if convex polygons ``a`` and ``b`` are at least ``gap`` apart along some edge normal."""
    for poly in (a, b):
        edges = poly[_NEXT[len(poly)]] - poly  # (K, 2)
        normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1)
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        proj_a, proj_b = a @ normals.T, b @ normals.T  # (Ka, K), (Kb, K) projections
        if np.any((proj_b.min(0) - proj_a.max(0) >= gap) | (proj_a.min(0) - proj_b.max(0) >= gap)):
            return True
    return False


def _inside(shape: str, p: Placement, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the points ``(xs, ys)`` that lie inside the shape."""
    if shape == "circle":
        return (xs - p.x) ** 2 + (ys - p.y) ** 2 <= p.area / math.pi
    poly = _outline(shape, p)
    edges = poly[_NEXT[len(poly)]] - poly  # (K, 2)
    cross = edges[:, 0, None, None] * (ys - poly[:, 1, None, None]) - edges[:, 1, None, None] * (
        xs - poly[:, 0, None, None]
    )  # (K, H, W)
    return np.all(cross >= 0, axis=0) | np.all(cross <= 0, axis=0)


def _coverage(shape: str, p: Placement, size: int, supersample: int) -> tuple[int, int, np.ndarray]:
    """Top row, left column and the (h, w) share of each pixel the shape covers, anti-aliased."""
    poly = _outline(shape, p) * size
    x0, y0 = (max(0, math.floor(v)) for v in poly.min(0))
    x1, y1 = (min(size, math.ceil(v)) for v in poly.max(0))
    sub = (np.arange(supersample) + 0.5) / supersample
    xs = ((np.arange(x0, x1)[:, None] + sub).ravel()) / size  # (w * s,)
    ys = ((np.arange(y0, y1)[:, None] + sub).ravel()) / size  # (h * s,)
    inside = _inside(shape, p, xs[None, :], ys[:, None])  # (h * s, w * s)
    alpha = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))  # (h, w)
    return y0, x0, alpha


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image."""
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    canvas = np.empty((size, size, 3), dtype=np.float32)  # (H, W, 3)
    canvas[:] = scene.background
    for obj, p in zip(scene.objects, scene.placements, strict=True):
        y0, x0, alpha = _coverage(obj.shape, p, size, supersample)
        patch = canvas[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
        patch += alpha[..., None] * (np.asarray(p.rgb, dtype=np.float32) - patch)
    return Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")


# --- captions -------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "center": ("in the center", "in the middle", "in the centre"),
}
_RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
_SINGLE_TEMPLATES = (
    "a {obj} {where}",
    "there is a {obj} {where}",
    "{where}, a {obj}",
    "an image of a {obj} {where}",
    "a {obj} placed {where}",
)
_PAIR_TEMPLATES = (
    "a {obj1} {rel} a {obj2}",
    "there is a {obj1} {rel} a {obj2}",
    "a {obj1} sits {rel} a {obj2}",
    "a picture with a {obj1} {rel} a {obj2}",
)


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _noun_phrase(rng: np.random.Generator, obj: ShapeObject) -> str:
    return f"{_choice(rng, _SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming every object's size, colour, shape and position, in varied wording."""
    if scene.relation is None:
        (obj,) = scene.objects
        where = _choice(rng, _POSITION_PHRASES[obj.position])
        return _choice(rng, _SINGLE_TEMPLATES).format(obj=_noun_phrase(rng, obj), where=where)
    first, second = scene.objects
    if rng.random() < 0.5:  # "a blue square below a red circle" says the same as the reverse
        first, second = second, first
    template = _choice(rng, _PAIR_TEMPLATES)
    rel = _choice(rng, _RELATION_PHRASES[first.position])
    return template.format(obj1=_noun_phrase(rng, first), rel=rel, obj2=_noun_phrase(rng, second))
