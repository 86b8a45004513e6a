"""Caption augmentation for CLIP training: short captions naming one object of a ``shapes`` scene.

A CLIP trained only on whole captions ("a large red circle above a small blue
square") learns what a *whole* caption looks like: a short query such as
"a red circle" falls outside what its text encoder has seen, and nothing in
training says that a picture showing a red circle next to something else
matches "a red circle" at all. Natural-language search asks exactly that.
:class:`ObjectCaptions` replaces a share of the training captions by a short
caption naming one of the objects the caption names — its colour and shape,
with its size word half of the time ("a red circle", "a large red circle") —
so the model also learns to match one object of an image, in the short form
users type. Contrastive training with such captions has some false negatives
(other images of the batch showing the same object), which it tolerates.

Objects are read from the caption text with the vocabulary of the synthetic
generator (:mod:`dalle_lightning.synth.shapes`): an optional word before a
colour–shape pair is taken as its size word unless it is an article. A
caption that names no such pair is kept as it is, so the augmentation is a
no-op on other data.

:func:`swapped_shape` makes the hard negative of a caption (NegCLIP,
Yuksekgonul et al. 2023, "When and why vision-language models behave like
bags-of-words"): the same caption with one object's shape word changed. With
a batch of 64 random scenes an image's caption is told from the others by
colour, size and position alone, and a CLIP trained that way never learns
shape (its shape accuracy on lone objects stays at chance); scoring each image
against its own caption with the shape swapped leaves shape as the only cue.
"""

from __future__ import annotations

import re

import numpy as np

from dalle_lightning.synth.shapes import COLOURS, SHAPES

_ARTICLES = frozenset({"a", "an", "the", "with", "is", "of"})
_OBJECT = re.compile(
    r"(?:\b([a-z]+) )?\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b", re.IGNORECASE
)


def caption_objects(caption: str) -> list[tuple[str | None, str, str]]:
    """(size word or None, colour, shape) of every colour–shape pair the caption names, in order."""
    found = []
    for size, colour, shape in _OBJECT.findall(caption):
        size = size.lower() or None
        found.append((None if size in _ARTICLES else size, colour.lower(), shape.lower()))
    return found


class ObjectCaptions:
    """``(caption, rng) → caption``: with probability ``p``, a short caption naming one of the caption's objects.

    The short caption keeps the object's size word ("a large red circle") with
    probability ``size_words``, else it is "a red circle". Every word that is
    not shape makes shape less needed to tell a batch's captions apart: with
    size words half of the time a tiny CLIP learns shape later and less
    surely (docs/benchmarks.md, "Search on shapes").

    Picklable (a data-loader worker gets a copy); all randomness comes from
    ``rng``, so a seeded stream stays reproducible and resumable.
    """

    def __init__(self, p: float, size_words: float = 0.5) -> None:
        for name, value in (("p", p), ("size_words", size_words)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        self.p = float(p)
        self.size_words = float(size_words)

    def __call__(self, caption: str, rng: np.random.Generator) -> str:
        if self.p == 0.0 or rng.random() >= self.p:
            return caption
        objects = caption_objects(caption)
        if not objects:
            return caption
        size, colour, shape = objects[rng.integers(len(objects))]
        if size is not None and rng.random() < self.size_words:
            return f"a {size} {colour} {shape}"
        return f"a {colour} {shape}"

    def __repr__(self) -> str:
        return f"ObjectCaptions(p={self.p}, size_words={self.size_words})"


def swapped_shape(caption: str, rng: np.random.Generator) -> str | None:
    """``caption`` with the shape word of one of its colour–shape pairs changed to another shape, or
    ``None`` when it names none."""
    matches = list(_OBJECT.finditer(caption))
    if not matches:
        return None
    match = matches[rng.integers(len(matches))]
    others = [s for s in SHAPES if s != match.group(3).lower()]
    start, end = match.span(3)
    return caption[:start] + others[rng.integers(len(others))] + caption[end:]
