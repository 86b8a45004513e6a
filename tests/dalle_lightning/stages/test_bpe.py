"""The caption BPE: training, determinism, save/load, fixed-length encoding, seeded BPE dropout."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import data_schemas.filtered as filtered_schema
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.stages.bpe import (
    PAD_ID,
    PAD_TOKEN,
    BPEConfig,
    CaptionEncoder,
    bpe_fingerprint,
    load_bpe,
    read_captions,
    save_bpe,
    train_bpe,
    train_bpe_on_shards,
)
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

pytestmark = pytest.mark.timeout(60)

CONFIG = BPEConfig(vocab_size=400, text_len=24)


def shapes_captions(n: int = 300, seed: int = 0) -> list[str]:
    config = ShapesConfig(n=n, size=32, seed=seed)
    return [make_example(config, i)[1] for i in range(n)]


CAPTIONS = shapes_captions()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS, CONFIG)


def test_vocabulary_has_pad_first_bytes_and_merges_of_frequent_words(tokenizer):
    assert tokenizer.token_to_id(PAD_TOKEN) == PAD_ID == 0
    assert 257 < tokenizer.get_vocab_size() <= CONFIG.vocab_size
    encoder = CaptionEncoder(tokenizer, 24)
    # frequent caption words become single tokens
    assert len(encoder.tokenize("a tiny red triangle")) == 4
    # anything encodes (byte level) and decodes back, lower-cased
    for text in ("Ünïcode ✓ 日本", "a tiny red triangle", "tabs\tand  spaces"):
        assert encoder.decode(encoder.tokenize(text)) == text.lower()


def test_lowercase_is_a_setting(tokenizer):
    encoder = CaptionEncoder(tokenizer, 24)
    assert encoder.tokenize("A Tiny RED Triangle") == encoder.tokenize("a tiny red triangle")
    cased = CaptionEncoder(train_bpe(CAPTIONS, BPEConfig(vocab_size=400, lowercase=False)), 24)
    assert cased.decode(cased.tokenize("A Tiny RED")) == "A Tiny RED"
    assert cased.tokenize("A Tiny RED") != cased.tokenize("a tiny red")


def test_training_is_deterministic_across_processes(tokenizer):
    script = (
        "import json, sys;"
        "from dalle_lightning.stages.bpe import BPEConfig, train_bpe, bpe_fingerprint;"
        "print(bpe_fingerprint(train_bpe(json.load(sys.stdin), BPEConfig(vocab_size=400, text_len=24))))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(CAPTIONS), capture_output=True, text=True, timeout=50
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == bpe_fingerprint(tokenizer) == bpe_fingerprint(train_bpe(CAPTIONS, CONFIG))
    assert bpe_fingerprint(train_bpe(CAPTIONS, BPEConfig(vocab_size=300))) != bpe_fingerprint(tokenizer)


def test_save_load_round_trip(tokenizer, tmp_path):
    path = save_bpe(tokenizer, str(tmp_path / "bpe" / "tokenizer.json"))
    loaded = load_bpe(path)
    assert bpe_fingerprint(loaded) == bpe_fingerprint(tokenizer)
    a, b = CaptionEncoder(tokenizer, 24), CaptionEncoder(loaded, 24)
    ids_a, len_a = a.encode_batch(CAPTIONS[:20])
    ids_b, len_b = b.encode_batch(CAPTIONS[:20])
    assert np.array_equal(ids_a, ids_b) and np.array_equal(len_a, len_b)
    assert not list(tmp_path.joinpath("bpe").glob(".tmp-*"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        load_bpe(str(tmp_path / "bad.json"))


def test_padding_truncation_and_the_pad_convention(tokenizer):
    encoder = CaptionEncoder(tokenizer, 8)
    ids, length = encoder.encode("a tiny red triangle")
    assert ids.dtype == np.int64 and ids.shape == (8,) and length == 4
    assert (ids[length:] == PAD_ID).all() and (ids[:length] != PAD_ID).all()
    long_caption = " ".join(["a tiny red triangle left of a big blue circle"] * 3)
    full = encoder.tokenize(long_caption)
    ids, length = encoder.encode(long_caption)
    assert len(full) > 8 and length == 8 and ids.tolist() == full[:8]
    ids, length = encoder.encode("")
    assert length == 0 and (ids == PAD_ID).all()
    # the characters of the pad token in a caption are text, never the pad id
    ids, length = encoder.encode("<pad>")
    assert length > 0 and PAD_ID not in ids[:length].tolist()
    assert encoder.decode(ids) == "<pad>"
    batch, lengths = encoder.encode_batch(["a tiny red triangle", "", long_caption])
    assert batch.shape == (3, 8) and lengths.tolist() == [4, 0, 8]
    assert ((batch != PAD_ID).sum(1) == lengths).all()  # the mask is ids != PAD_ID


def test_dropout_changes_segmentations_but_not_the_text(tokenizer):
    train = CaptionEncoder.from_config(tokenizer, CONFIG, training=True)
    plain = CaptionEncoder.from_config(tokenizer, CONFIG, training=False)
    assert train.dropout == 0.1 and plain.dropout == 0.0
    caption = "a picture with a large cyan triangle over a small purple circle"
    reference = plain.tokenize(caption)
    segmentations = {tuple(train.tokenize(caption, np.random.default_rng(i))) for i in range(40)}
    assert len(segmentations) > 5 and tuple(reference) in segmentations
    for ids in segmentations:
        assert plain.decode(list(ids)) == caption and len(ids) >= len(reference)
    # seeded: the same generator seed gives the same segmentation
    again = [train.tokenize(caption, np.random.default_rng(7)) for _ in range(2)]
    assert again[0] == again[1]
    with pytest.raises(ValueError, match="pass a numpy Generator"):
        train.tokenize(caption)
    with pytest.raises(ValueError, match="one rng per caption"):
        train.encode_batch([caption, caption], [np.random.default_rng(0)])
    ids, lengths = train.encode_batch([caption] * 2, [np.random.default_rng(3)] * 2)
    assert lengths.min() >= len(reference) or lengths.min() == CONFIG.text_len


def test_dropout_path_without_drops_equals_tokenizers(tokenizer):
    """The training encoder applies merges itself; with (almost) no dropout it must match tokenizers."""
    never = CaptionEncoder(tokenizer, 64, dropout=1e-12)
    plain = CaptionEncoder(tokenizer, 64)
    rng = np.random.default_rng(0)
    odd = ["Ünïcode ✓ 日本", "  leading spaces", "a  b", "x" * 40, "it's 3 o'clock!"]
    for caption in CAPTIONS + shapes_captions(100, seed=9) + odd:
        assert never.tokenize(caption, rng) == plain.tokenize(caption), caption


def test_encoder_pickles_with_its_settings(tokenizer):
    train = CaptionEncoder(tokenizer, 16, dropout=0.3)
    copy = pickle.loads(pickle.dumps(train))
    assert (copy.text_len, copy.dropout, copy.vocab_size) == (16, 0.3, train.vocab_size)
    caption = "a tiny cyan circle to the right of a little blue square"
    assert copy.tokenize(caption, np.random.default_rng(5)) == train.tokenize(
        caption, np.random.default_rng(5)
    )
    plain = pickle.loads(pickle.dumps(CaptionEncoder(tokenizer, 16)))
    assert PAD_ID not in plain.tokenize("<pad>")  # the special-token setting survives pickling


def test_reads_captions_from_filtered_shards_and_trains(tmp_path):
    paths = []
    for s in range(2):
        captions = CAPTIONS[s * 50 : (s + 1) * 50]
        rows = [
            {
                "key": f"{s}-{i}",
                "url": f"http://127.0.0.1/{s}/{i}",
                "caption": caption,
                "image": b"x",
                "sha256": "0" * 64,
                "phash": i,
            }
            for i, caption in enumerate(captions)
        ]
        path = str(tmp_path / f"part-{s:012x}.parquet")
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA), path, filtered_schema)
        paths.append(path)
    assert list(read_captions(paths)) == CAPTIONS[:100]
    tokenizer, stats = train_bpe_on_shards(paths, BPEConfig(vocab_size=350, text_len=10))
    assert stats["captions"] == 100 and stats["vocab_size"] == tokenizer.get_vocab_size() <= 350
    assert stats["tokens_max"] > 10 and 0 < stats["truncated_fraction"] < 1
    assert bpe_fingerprint(tokenizer) == bpe_fingerprint(train_bpe(CAPTIONS[:100], BPEConfig(vocab_size=350)))
    with pytest.raises(ValueError, match="paths is empty"):
        train_bpe_on_shards([], CONFIG)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 256),
        ("vocab_size", 1.5),
        ("min_frequency", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("dropout", True),
        ("text_len", 0),
        ("lowercase", "yes"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"BPEConfig.{field}"):
        BPEConfig(**{field: value})


def test_encoder_and_training_errors(tokenizer):
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="text_len"):
        CaptionEncoder(tokenizer, 0)
    with pytest.raises(ValueError, match="dropout"):
        CaptionEncoder(tokenizer, 8, dropout=1.0)
    with pytest.raises(ValueError, match="lacks '<pad>'"):
        CaptionEncoder(Tokenizer(models.BPE()), 8)
    with pytest.raises(TypeError, match="caption 1 is a int"):
        train_bpe(["ok", 3], CONFIG)
    with pytest.raises(TypeError, match="caption must be a str"):
        CaptionEncoder(tokenizer, 8).encode(None)
