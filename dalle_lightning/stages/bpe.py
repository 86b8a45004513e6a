"""The ``bpe`` stage: a byte-level BPE vocabulary trained on the captions, and captions as fixed-length ids.

The paper lower-cases each caption and BPE-encodes it with a 16,384-token
vocabulary, up to 256 text tokens, with BPE dropout of 10% while training
the transformer (Ramesh et al. 2021, Sec. 2.2 and Appendix B). Here:

- :func:`train_bpe` trains a byte-level BPE (GPT-2's byte alphabet, so every
  caption encodes and nothing is unknown) with Hugging Face ``tokenizers``;
  the result depends only on the captions and the config (the same vocabulary
  from run to run and process to process).
- Captions come from the ``filter`` dataset, read column-wise
  (:func:`read_captions` reads only ``caption``): the vocabulary then does not
  depend on the dVAE, so a new dVAE re-tokenizes images but keeps the BPE, and
  the BPE can be trained while the dVAE trains. The ``tokens`` dataset copies
  those captions row for row, so it fits the tokens of every dVAE.
- :class:`CaptionEncoder` turns captions into ``text_len`` int64 ids and a
  length. **Padding convention**: positions ``>= length`` hold :data:`PAD_ID`
  (0, the special token ``<pad>``), which encoding never produces from text (a
  caption containing the characters ``<pad>`` is encoded as ordinary text), so
  ``ids != PAD_ID`` is the caption's mask and its sum the length. The
  transformer gives each padded position its own learned pad embedding (the
  paper's "padding token per position"), e.g. by mapping ``PAD_ID`` at
  position ``i`` to ``vocab_size + i``.
- BPE dropout (Provilkov et al. 2020) lives in a training encoder
  (``dropout > 0``), separate from the deterministic one. ``tokenizers``
  draws its dropout from an unseeded generator, so the training encoder
  applies the merges itself with a ``numpy`` generator the caller seeds
  (per epoch and item in :mod:`~dalle_lightning.data.token_stream`), which
  makes a resumed run see the same segmentations. With ``dropout = 0`` it
  gives exactly the ``tokenizers`` encoding.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import fsspec
import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_lightning.datasets.parquet_io import read_parquet

STAGE = "bpe"
STAGE_VERSION = 1
PAD_TOKEN = "<pad>"
PAD_ID = 0
"""Id of :data:`PAD_TOKEN`: the first entry of every vocabulary trained here."""
BYTE_ALPHABET = 256
"""Byte-level symbols every vocabulary holds besides the merges."""


@dataclass(frozen=True)
class BPEConfig:
    """Settings of the caption BPE. Only the first three shape the vocabulary (:meth:`vocabulary_settings`)."""

    vocab_size: int = 16384
    """Tokens in the vocabulary, ``<pad>`` and the 256 byte symbols included (paper: 16,384). A small
    caption set can stop short of it when no pair is left to merge: the tokenizer's own vocabulary size
    is the one a model should use."""
    min_frequency: int = 2
    """Occurrences a pair of symbols needs in the captions to become a merge."""
    lowercase: bool = True
    """Lower-case captions before encoding (paper, Sec. 2.2)."""
    dropout: float = 0.1
    """Probability of skipping each merge while encoding for training (BPE dropout; paper: 10%). The
    vocabulary is the same whatever its value; evaluation and sampling encode without it."""
    text_len: int = 256
    """Text tokens per caption: longer encodings are cut, shorter ones padded with ``<pad>`` (paper: 256)."""

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, BYTE_ALPHABET + 1)
        _check_int("min_frequency", self.min_frequency, 1)
        _check_int("text_len", self.text_len, 1)
        if not isinstance(self.lowercase, bool):
            raise ValueError(f"BPEConfig.lowercase must be true or false, got {self.lowercase!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ValueError(f"BPEConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BPEConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def vocabulary_settings(self) -> dict[str, Any]:
        """The fields that change the trained vocabulary (and so its identity); the others change encoding."""
        return {
            "vocab_size": self.vocab_size,
            "min_frequency": self.min_frequency,
            "lowercase": self.lowercase,
        }


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"BPEConfig.{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------- training, saving, identity


def train_bpe(captions: Iterable[str], config: BPEConfig) -> Tokenizer:
    """A byte-level BPE trained on ``captions``: ``<pad>`` has id 0, the 256 byte symbols follow, then merges."""
    tokenizer = Tokenizer(models.BPE())
    if config.lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_strings(captions), trainer)
    assert tokenizer.token_to_id(PAD_TOKEN) == PAD_ID
    return tokenizer


def _strings(captions: Iterable[str]) -> Iterator[str]:
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is a {type(caption).__name__}, expected str")
        yield caption


def bpe_fingerprint(tokenizer: Tokenizer) -> str:
    """A digest of the tokenizer's JSON (vocabulary, merges, normalizer, …): equal means the same encoding."""
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_bpe(tokenizer: Tokenizer, path: str) -> str:
    """Write the tokenizer as ``tokenizers`` JSON to ``path`` (any fsspec URL), atomically; returns ``path``."""
    data = tokenizer.to_str(pretty=True).encode()
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{fs_path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, fs_path)
    return path


def load_bpe(path: str) -> Tokenizer:
    """A tokenizer saved by :func:`save_bpe`; ``ValueError`` if it is not a BPE with ``<pad>`` at id 0."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "r") as f:
        text = f.read()
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises its own Exception type for bad JSON
        raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from err
    _check_tokenizer(tokenizer, str(path))
    return tokenizer


def _check_tokenizer(tokenizer: Tokenizer, where: str) -> None:
    if not isinstance(tokenizer.model, models.BPE):
        raise ValueError(f"{where}: expected a BPE tokenizer, got {type(tokenizer.model).__name__}")
    if tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise ValueError(
            f"{where}: the tokenizer lacks {PAD_TOKEN!r} at id {PAD_ID} (train it with train_bpe)"
        )


# ---------------------------------------------------------------- captions from shards


def read_captions(paths: Sequence[str], column: str = "caption") -> Iterator[str]:
    """Every non-null ``column`` value of the Parquet shards ``paths``, in order (reads only that column)."""
    for path in paths:
        for caption in read_parquet(path, columns=[column]).column(column).to_pylist():
            if caption is not None:
                yield caption


def train_bpe_on_shards(
    paths: Sequence[str], config: BPEConfig, *, stats_sample: int = 10_000
) -> tuple[Tokenizer, dict[str, Any]]:
    """Train on the captions of ``paths`` (in the given order); stats on up to ``stats_sample`` of them.

    Stats: ``captions`` (all), ``vocab_size`` (as trained), and over the
    sample ``tokens_mean``, ``tokens_max`` and ``truncated_fraction`` (share of
    captions longer than ``text_len`` tokens, without dropout).
    """
    if not paths:
        raise ValueError("paths is empty: there are no shards to read captions from")
    count = 0
    sample: list[str] = []

    def counted() -> Iterator[str]:
        nonlocal count
        for caption in read_captions(paths):
            count += 1
            if len(sample) < stats_sample:
                sample.append(caption)
            yield caption

    tokenizer = train_bpe(counted(), config)
    if count == 0:
        raise ValueError(f"no captions in {len(paths)} shard(s): cannot train a BPE on nothing")
    lengths = np.array([len(e.ids) for e in _deterministic(tokenizer).encode_batch(sample)])
    stats = {
        "captions": count,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokens_mean": float(lengths.mean()),
        "tokens_max": int(lengths.max()),
        "truncated_fraction": float((lengths > config.text_len).mean()),
    }
    return tokenizer, stats


# ---------------------------------------------------------------- encoding


def _deterministic(tokenizer: Tokenizer) -> Tokenizer:
    """A private copy that encodes ``<pad>`` in text as ordinary characters and never drops merges.

    ``encode_special_tokens`` is not part of the JSON (nor of a pickle), so every copy sets it.
    """
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.model.dropout = None
    copy.encode_special_tokens = True
    return copy


class CaptionEncoder:
    """Captions → int64 ids of length ``text_len`` (padded with :data:`PAD_ID`) and their lengths.

    ``dropout = 0`` (evaluation, sampling) encodes with ``tokenizers``;
    ``dropout > 0`` (training) skips each merge with that probability, drawn
    from the ``rng`` every call must then pass, so a seeded generator gives
    the same segmentation again. Each encoder holds its own copy of the
    tokenizer; the one passed in is not changed. Picklable (data-loader workers).
    """

    def __init__(self, tokenizer: Tokenizer, text_len: int, *, dropout: float = 0.0) -> None:
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be an integer >= 1, got {text_len!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        _check_tokenizer(tokenizer, "CaptionEncoder")
        self.text_len = text_len
        self.dropout = float(dropout)
        self._json = tokenizer.to_str()
        self._setup()

    @classmethod
    def from_config(cls, tokenizer: Tokenizer, config: BPEConfig, *, training: bool) -> CaptionEncoder:
        """The training encoder (``config.dropout``) or the deterministic one, ``config.text_len`` long."""
        return cls(tokenizer, config.text_len, dropout=config.dropout if training else 0.0)

    def _setup(self) -> None:
        self._tokenizer = _deterministic(Tokenizer.from_str(self._json))
        self._ranks: dict[tuple[str, str], int] | None = None
        self._vocab: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"text_len": self.text_len, "dropout": self.dropout, "_json": self._json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def vocab_size(self) -> int:
        """Ids are in ``[0, vocab_size)``, :data:`PAD_ID` included."""
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def tokenize(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """All ids of ``caption``, neither cut nor padded; ``rng`` is required when ``dropout > 0``."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        if self.dropout == 0.0:
            return self._tokenizer.encode(caption).ids
        if rng is None:
            raise ValueError(
                f"this encoder drops merges (dropout={self.dropout}): pass a numpy Generator rng"
            )
        return self._tokenize_with_dropout(caption, rng)

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        """(ids int64 ``(text_len,)``, length): the first ``length`` ids are the caption's, the rest pad."""
        return self._pad(self.tokenize(caption, rng))

    def encode_batch(
        self, captions: Sequence[str], rngs: Sequence[np.random.Generator] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 ``(N, text_len)``, lengths int64 ``(N,)``); one generator per caption when ``dropout > 0``."""
        if self.dropout == 0.0:
            if isinstance(captions, str):
                raise TypeError("captions must be a sequence of str, got one str")
            encoded = [e.ids for e in self._tokenizer.encode_batch(list(captions))]
        else:
            if rngs is None or len(rngs) != len(captions):
                raise ValueError(
                    f"this encoder drops merges (dropout={self.dropout}): pass one rng per caption"
                )
            encoded = [self.tokenize(c, r) for c, r in zip(captions, rngs, strict=True)]
        ids = np.full((len(encoded), self.text_len), PAD_ID, dtype=np.int64)
        lengths = np.zeros(len(encoded), dtype=np.int64)
        for i, row in enumerate(encoded):
            ids[i], lengths[i] = self._pad(row)
        return ids, lengths

    def decode(self, ids: Sequence[int] | np.ndarray, length: int | None = None) -> str:
        """The text of ``ids`` (the first ``length`` of them; pads are skipped either way)."""
        ids = [int(i) for i in ids][:length]
        return self._tokenizer.decode([i for i in ids if i != PAD_ID], skip_special_tokens=False)

    def _pad(self, ids: list[int]) -> tuple[np.ndarray, int]:
        length = min(len(ids), self.text_len)
        out = np.full(self.text_len, PAD_ID, dtype=np.int64)
        out[:length] = ids[:length]
        return out, length

    # BPE dropout, done here because tokenizers' own draws cannot be seeded.

    def _tables(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        if self._ranks is None or self._vocab is None:
            model = json.loads(self._json)["model"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            self._ranks = {pair: rank for rank, pair in enumerate(merges)}
            self._vocab = model["vocab"]
        return self._ranks, self._vocab

    def _tokenize_with_dropout(self, caption: str, rng: np.random.Generator) -> list[int]:
        ranks, vocab = self._tables()
        tokenizer = self._tokenizer
        text = tokenizer.normalizer.normalize_str(caption) if tokenizer.normalizer is not None else caption
        ids: list[int] = []
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text):
            ids.extend(vocab[symbol] for symbol in _merge(list(word), ranks, self.dropout, rng))
        return ids


def _merge(
    symbols: list[str], ranks: dict[tuple[str, str], int], dropout: float, rng: np.random.Generator
) -> list[str]:
    """Apply merges to one pre-token: at each step the best-ranked pair that survives its dropout draw.

    As ``tokenizers`` does: candidates in (rank, position) order, each skipped
    with probability ``dropout``; the first kept one is merged; the word is
    done when every candidate was skipped or none is left.
    """
    while len(symbols) > 1:
        candidates = sorted((ranks[pair], i) for i, pair in enumerate(pairwise(symbols)) if pair in ranks)
        chosen = next((i for _, i in candidates if rng.random() >= dropout), None)
        if chosen is None:
            break
        symbols[chosen : chosen + 2] = [symbols[chosen] + symbols[chosen + 1]]
    return symbols
