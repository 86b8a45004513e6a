"""Object captions for CLIP training: read from ``shapes`` captions, drawn from the given generator, no-op elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from dalle_lightning.training.clip_captions import ObjectCaptions, caption_objects, swapped_shape

pytestmark = pytest.mark.timeout(30)


def _examples(count: int = 300):
    config = ShapesConfig(n=count, size=32, seed=3, heldout_fraction=0.0, heldout_images=0.0)
    return [make_example(config, i) for i in range(count)]


def test_the_objects_of_every_generated_caption_are_read_back():
    size_class = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
    for scene, caption, _ in _examples():
        found = sorted((colour, shape, size_class[size]) for size, colour, shape in caption_objects(caption))
        assert found == sorted((o.colour, o.shape, o.size) for o in scene.objects), caption


def test_object_captions_name_one_object_of_the_scene_at_rate_p():
    examples = _examples()
    always, never, some = ObjectCaptions(1.0), ObjectCaptions(0.0), ObjectCaptions(0.3)
    rng = np.random.default_rng(0)
    short_forms = set()
    for scene, caption, _ in examples:
        assert never(caption, rng) == caption
        short = always(caption, rng)
        words = short.split()
        assert words[0] == "a" and len(words) in (3, 4), short
        assert (words[-2], words[-1]) in {(o.colour, o.shape) for o in scene.objects}, (caption, short)
        short_forms.add(len(words))
    assert short_forms == {3, 4}  # with and without the size word
    changed = sum(some(c, rng) != c for _, c, _ in examples)
    assert 0.2 * len(examples) < changed < 0.4 * len(examples)


def test_draws_come_from_the_generator_and_other_captions_are_kept():
    augment = ObjectCaptions(1.0)
    caption = "a picture with a large red circle over a small blue square"
    draws = [augment(caption, np.random.default_rng(seed)) for seed in range(20)]
    assert draws == [augment(caption, np.random.default_rng(seed)) for seed in range(20)]
    assert {"a red circle", "a blue square"} <= set(draws)
    for other in ("a photo of a dog on a beach", "", "a reddish circle"):
        assert augment(other, np.random.default_rng(0)) == other


def test_size_words_sets_how_often_the_short_caption_keeps_the_size_word():
    examples = _examples()
    rng = np.random.default_rng(1)
    lengths = {
        rate: [len(ObjectCaptions(1.0, size_words=rate)(c, rng).split()) for _, c, _ in examples]
        for rate in (0.0, 0.5, 1.0)
    }
    assert set(lengths[0.0]) == {3}  # "a red circle"
    assert set(lengths[1.0]) == {4}  # every shapes caption gives its objects a size word
    assert 0.35 < lengths[0.5].count(4) / len(examples) < 0.65


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.3"])
def test_bad_probability_is_a_value_error(p):
    with pytest.raises(ValueError, match="p must be"):
        ObjectCaptions(p)
    with pytest.raises(ValueError, match="size_words must be"):
        ObjectCaptions(0.5, size_words=p)


def test_swapped_shape_changes_one_shape_word_and_nothing_else():
    from dalle_lightning.synth.shapes import SHAPES

    for seed, (_, caption, _) in enumerate(_examples(100)):
        negative = swapped_shape(caption, np.random.default_rng(seed))
        assert negative == swapped_shape(caption, np.random.default_rng(seed))
        before, after = caption.split(), negative.split()
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1 and changed[0][0] in SHAPES and changed[0][1] in SHAPES, (caption, negative)
    assert swapped_shape("a photo of a dog", np.random.default_rng(0)) is None


def test_hard_negatives_enter_the_image_to_text_side_of_the_loss():
    import torch
    import torch.nn.functional as F

    from dalle_lightning.models.clip import contrastive_loss
    from dalle_lightning.training.clip_module import contrastive_loss_with_negatives

    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    none = torch.full((5, 5), float("-inf"))
    assert torch.allclose(contrastive_loss_with_negatives(logits, none), contrastive_loss(logits))
    negatives = torch.randn(5, 5, generator=torch.Generator().manual_seed(1)) * 3
    negatives[:, 2] = float("-inf")  # row 2 has no negative
    labels = torch.arange(5)
    expected = 0.5 * (
        F.cross_entropy(torch.cat([logits, negatives], 1), labels) + F.cross_entropy(logits.T, labels)
    )
    assert torch.allclose(contrastive_loss_with_negatives(logits, negatives), expected)
    assert contrastive_loss_with_negatives(logits, negatives) > contrastive_loss(logits)
