"""The ``embed`` stage: one ``filtered`` shard in, one ``embeddings`` shard out, by a trained CLIP.

:func:`embed_shard` reads the shard's key, caption, url and image columns,
decodes the images on a thread pool (up to two batches ahead of the one being
encoded, as the tokenize stage does), takes the centre square resized to the
CLIP's ``image_size``, and encodes batches with ``ClipModel.encode_image``
under ``torch.inference_mode``; the captions go through the CLIP's own BPE
(:class:`~dalle_lightning.stages.bpe.CaptionEncoder`, no dropout, cut or padded
to ``text_len``) into ``ClipModel.encode_text``. Both vectors are unit length,
so an inner product is a cosine similarity (search, CLIP-score filters).

The table has one row per input row, in input order, against
:func:`data_schemas.embeddings.embeddings_schema` of this CLIP (dimension and
CLIP version in the metadata); :func:`write_embeddings` writes it atomically.
Its fingerprint (:func:`embeddings_fingerprint`) includes the CLIP version
(:func:`clip_version`: a digest of the config, the weights and the tokenizer),
so a new CLIP re-embeds every shard into its own folder and an unchanged one
skips them. Batch size, decode threads and device are left out: they change
the speed, not the vectors (beyond float rounding).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

import data_schemas.embeddings as embeddings_schema
import data_schemas.filtered as filtered_schema
from dalle_lightning.data.transforms import center_crop_resize, decode_image
from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.parquet_io import WrittenFile, write_parquet_atomic
from dalle_lightning.stages.bpe import CaptionEncoder, bpe_fingerprint
from dalle_lightning.stages.tokenize import DEVICES, pixels_to_device, resolve_device
from data_schemas.base import schema_identity

STAGE = "embed"
STAGE_VERSION = 1
_PREFETCH_BATCHES = 2  # batches decoded ahead of the one being encoded
_INPUT_COLUMNS = ["key", "caption", "url", "image"]


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of the embed stage; none of them changes the vectors, so none is in the fingerprint."""

    batch_size: int = 256
    """Images (and captions) per encoder call."""
    decode_threads: int = 4
    """Threads decoding, cropping and resizing images while the encoder runs."""
    device: str = "auto"
    """Where the CLIP runs: ``cuda``, ``cpu``, or ``auto`` (``cuda`` when available, else ``cpu``)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "decode_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EmbedConfig.{name} must be an integer >= 1, got {value!r}")
        if self.device not in DEVICES:
            raise ValueError(f"EmbedConfig.device must be one of {DEVICES}, got {self.device!r}")


# --- identity -------------------------------------------------------------------------------------


def _digest(config: dict[str, Any], state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(bpe_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:16]


def clip_version(path: str | Path) -> str:
    """16 hex characters naming a CLIP file written by ``save_clip``: a digest of config, weights and BPE.

    Computed from the content, not the file bytes (``torch.save`` embeds the
    file name), so the same model saved anywhere has the same version; equal to
    :func:`model_clip_version` of the loaded model and tokenizer.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or not {"config", "state_dict", "tokenizer"} <= saved.keys():
        raise ValueError(
            f"{path}: not a CLIP file (expected a dict with 'config', 'state_dict', 'tokenizer')"
        )
    return _digest(saved["config"], saved["state_dict"], Tokenizer.from_str(saved["tokenizer"]))


def model_clip_version(model: Any, tokenizer: Tokenizer) -> str:
    """:func:`clip_version` of an in-memory CLIP and its caption BPE."""
    return _digest(asdict(model.config), model.state_dict(), tokenizer)


def embeddings_fingerprint(input_fingerprint: str, clip_version: str, config: EmbedConfig) -> str:
    """Fingerprint of an embeddings shard: hash(input shard fingerprint, CLIP version, stage version).

    ``config`` is taken for symmetry with the other stages; none of its fields changes the vectors.
    """
    if not clip_version:
        raise ValueError("clip_version must be a non-empty string")
    if not isinstance(config, EmbedConfig):
        raise TypeError(f"config must be an EmbedConfig, got {type(config).__name__}")
    return fingerprint(STAGE, STAGE_VERSION, input_fingerprint, clip_version)


# --- encoding -------------------------------------------------------------------------------------


def _prepare(key: str, data: bytes | None, size: int) -> np.ndarray:
    """Encoded bytes → centre crop resized to ``size`` (uint8 HWC); ``ValueError`` naming the key."""
    if data is None:
        raise ValueError(f"row {key!r} has no image bytes (the filtered schema forbids a null image)")
    try:
        return center_crop_resize(decode_image(data), size)
    except ValueError as err:
        raise ValueError(f"row {key!r}: {err}") from err


def _decoded_batches(
    keys: list[str], images: list[bytes | None], size: int, batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[np.ndarray]:
    """uint8 batches (B, size, size, 3) in input order, decoded on ``pool`` up to two batches ahead."""
    pending: deque[list[Future[np.ndarray]]] = deque()
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        pending.append([pool.submit(_prepare, keys[i], images[i], size) for i in range(start, stop)])
        if len(pending) > _PREFETCH_BATCHES:
            yield np.stack([f.result() for f in pending.popleft()])
    while pending:
        yield np.stack([f.result() for f in pending.popleft()])


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_captions(
    model: Any, tokenizer: Tokenizer, captions: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Unit-length text embeddings float32 (N, D) of ``captions``, on the model's device, in eval mode.

    Captions are encoded with the CLIP's BPE without dropout, cut or padded to
    ``model.config.text_len``. Used for the ``text_embedding`` column and for
    search queries alike.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of str, got one str (wrap a single query in a list)")
    encoder = CaptionEncoder(tokenizer, int(model.config.text_len))
    device = _device_of(model)
    dim = int(model.config.embed_dim)
    chunks = []
    with _eval(model), torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            ids, _lengths = encoder.encode_batch(list(captions[start : start + batch_size]))
            chunks.append(model.encode_text(torch.from_numpy(ids).to(device)).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


@contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _read_filtered(path: str) -> pa.Table:
    """The key, caption, url and image columns of a ``filtered`` shard; ``ValueError`` for another dataset."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "rb") as f:
        parquet = pq.ParquetFile(f)
        name, version = schema_identity(parquet.schema_arrow)
        if (name, version) != (filtered_schema.NAME, filtered_schema.VERSION):
            raise ValueError(
                f"{path}: metadata names dataset {name!r} v{version}, "
                f"expected {filtered_schema.NAME!r} v{filtered_schema.VERSION}"
            )
        return parquet.read(columns=_INPUT_COLUMNS)


def _vectors(array: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(array.astype(np.float32).reshape(-1), pa.float32()), dim
    )


def embed_shard(
    filtered_path: str,
    model: Any,
    tokenizer: Tokenizer,
    config: EmbedConfig,
    *,
    clip_version: str | None = None,
) -> pa.Table:
    """The ``embeddings`` table of the ``filtered`` shard at ``filtered_path`` (any fsspec URL).

    ``model`` is a ``ClipModel`` and ``tokenizer`` its caption BPE (as
    ``load_clip`` returns them); the model is moved to the configured device
    in place (as ``nn.Module.to`` does) and run in eval mode, its training
    flag restored afterwards. ``clip_version`` goes into the table's metadata;
    when None it is computed from the model (:func:`model_clip_version`).
    An image that does not decode raises ``ValueError`` naming the row.
    """
    device = resolve_device(config.device)
    version = clip_version or model_clip_version(model, tokenizer)
    size, dim = int(model.config.image_size), int(model.config.embed_dim)
    table = _read_filtered(filtered_path)
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    model.to(device)
    chunks: list[np.ndarray] = []
    with (
        _eval(model),
        torch.inference_mode(),
        ThreadPoolExecutor(config.decode_threads, thread_name_prefix="embed-decode") as pool,
    ):
        for batch in _decoded_batches(keys, images, size, config.batch_size, pool):
            image_embedding = model.encode_image(pixels_to_device(batch, device))  # (B, D)
            chunks.append(image_embedding.float().cpu().numpy())
    image_vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    text_vectors = encode_captions(model, tokenizer, table.column("caption").to_pylist(), config.batch_size)
    out = pa.table(
        {
            "key": table.column("key"),
            "caption": table.column("caption"),
            "url": table.column("url"),
            "image_embedding": _vectors(image_vectors, dim),
            "text_embedding": _vectors(text_vectors, dim),
        }
    )
    schema = embeddings_schema.embeddings_schema(dim, version)
    out = pa.Table.from_arrays(out.columns, schema=schema)
    embeddings_schema.validate(out)
    return out


def write_embeddings(table: pa.Table, path: str) -> WrittenFile:
    """Write an :func:`embed_shard` table atomically to ``path`` (any fsspec URL), against its own schema."""
    if embeddings_schema.embedding_metadata(table.schema) is None:
        raise ValueError("the table records no embedding dimension / CLIP version; make it with embed_shard")
    return write_parquet_atomic(table, path, embeddings_schema, schema=table.schema)
