"""The ``tokenize`` stage: one ``filtered`` shard in, one ``tokens`` shard out, by a trained dVAE.

:func:`tokenize_shard` reads the shard's key, caption and image columns,
decodes the images on a thread pool, takes the centre square resized to the
dVAE's ``image_size`` (paper appendix A.2), and encodes batches on the chosen
device under ``torch.inference_mode``: the codes are the argmax of the encoder
logits. Up to two batches are decoded ahead of the one being encoded, so
decoding overlaps encoding and memory stays bounded by a few batches whatever
the shard size. PIL releases the GIL inside its JPEG decoder and resampler,
but the Python around each image holds it, so threads help little: for 256 px
JPEGs, 4 to 16 threads decoded 1,800 to 2,600 images/s on an H100 host, and for
64 px images one thread was the fastest (``bench/tokenize.py``).

The output has one row per input row, in input order, written atomically
against :func:`data_schemas.tokens.tokens_schema` of this dVAE (grid shape,
codebook size and dVAE version in the file's metadata). Its fingerprint
(:func:`tokens_fingerprint`) includes the dVAE version, so a new dVAE
re-tokenizes every shard and an unchanged one skips them. Batch size, decode
threads and device are left out: they change the speed, not the codes (a
float kernel on another device may, rarely, flip a near-tie argmax; the codes
of one file always come from one device).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import data_schemas.filtered as filtered_schema
import data_schemas.tokens as tokens_schema
from dalle_lightning.data.transforms import center_crop_resize, decode_image
from dalle_lightning.datasets.fingerprint import fingerprint
from dalle_lightning.datasets.parquet_io import WrittenFile, write_parquet_atomic
from data_schemas.base import schema_identity

STAGE = "tokenize"
STAGE_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
_PREFETCH_BATCHES = 2  # batches decoded ahead of the one being encoded
_INPUT_COLUMNS = ["key", "caption", "image"]


@dataclass(frozen=True)
class TokenizeConfig:
    """Settings of the tokenize stage; only ``precision`` changes the codes, and so the fingerprint."""

    batch_size: int = 64
    """Images per encoder call."""
    decode_threads: int = 4
    """Threads decoding, cropping and resizing images while the encoder runs."""
    device: str = "auto"
    """Where the encoder runs: ``cuda``, ``cpu``, or ``auto`` (``cuda`` when available, else ``cpu``)."""
    precision: str = "fp32"
    """Arithmetic of the encoder. ``fp32``: IEEE float32 (cuDNN's TF32 turned off while encoding), so
    CUDA and CPU give the same codes but for rare near-ties. ``tf32``: cuDNN may use TF32 on CUDA, as
    PyTorch does by default. ``bf16``: autocast to bfloat16. A random paper-size dVAE on an H100 encoded
    91 / 442 / 691 images/s in fp32 / tf32 / bf16, and 97.6% / 64% of its tf32 / bf16 codes equalled the
    fp32 ones (a trained dVAE's sharper logits have fewer near-ties). On the CPU tf32 is fp32."""

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size)
        _check_int("decode_threads", self.decode_threads)
        if self.device not in DEVICES:
            raise ValueError(f"TokenizeConfig.device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TokenizeConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TokenizeConfig.{name} must be an integer >= 1, got {value!r}")


def tokens_fingerprint(input_fingerprint: str, dvae_version: str, config: TokenizeConfig) -> str:
    """Fingerprint of a tokens shard: hash(input shard fingerprint, dVAE version, precision, stage version)."""
    if not dvae_version:
        raise ValueError("dvae_version must be a non-empty string")
    return fingerprint(STAGE, STAGE_VERSION, input_fingerprint, dvae_version, {"precision": config.precision})


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; ``ValueError`` for ``cuda`` on a machine without it."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device='cuda' but this machine has no usable CUDA device (torch.cuda.is_available())"
        )
    return torch.device(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: Any) -> int:
    return int(model.config.vocab_size)


def _prepare(key: str, data: bytes | None, size: int) -> np.ndarray:
    """Encoded bytes → centre crop resized to ``size`` (uint8 HWC); ``ValueError`` naming the key."""
    if data is None:
        raise ValueError(f"row {key!r} has no image bytes (the filtered schema forbids a null image)")
    try:
        return center_crop_resize(decode_image(data), size)
    except ValueError as err:
        raise ValueError(f"row {key!r}: {err}") from err


def _preprocessed_batches(
    keys: list[str], images: list[bytes | None], size: int, config: TokenizeConfig, pool: ThreadPoolExecutor
) -> Iterator[np.ndarray]:
    """uint8 batches (B, size, size, 3) in input order, decoded on ``pool`` up to two batches ahead."""
    pending: deque[list[Future[np.ndarray]]] = deque()
    for start in range(0, len(images), config.batch_size):
        stop = min(start + config.batch_size, len(images))
        pending.append([pool.submit(_prepare, keys[i], images[i], size) for i in range(start, stop)])
        if len(pending) > _PREFETCH_BATCHES:
            yield np.stack([f.result() for f in pending.popleft()])
    while pending:
        yield np.stack([f.result() for f in pending.popleft()])


def pixels_to_device(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] on ``device``; the same values as ``to_tensor``.

    The uint8 pixels cross to the device and are converted there (a quarter of the bytes of floats).
    The result keeps the channels-last memory layout of the pixels, as ``to_tensor``'s does: cuDNN
    ran the paper-size encoder 20% faster on it than on a contiguous (B, 3, H, W) copy.
    """
    pixels = torch.from_numpy(batch).to(device)
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def _to_host(codes: torch.Tensor) -> np.ndarray:
    """Codes (B, h, w) → uint16 array (B, h·w) on the host, row-major."""
    return codes.reshape(len(codes), -1).to("cpu", torch.int32).numpy().astype(np.uint16)


def encode_batch(model: Any, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Codes (B, h, w) of a float batch ``x`` (B, 3, H, W) in the arithmetic ``precision`` names."""
    with _numerics(precision, x.device):
        return model.get_codebook_indices(x)


@contextmanager
def _numerics(precision: str, device: torch.device) -> Iterator[None]:
    """cuDNN's TF32 switch and bf16 autocast as ``precision`` asks.

    The switch is process-wide while a batch is encoded and restored afterwards.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type != "cuda":
        with autocast:
            yield
        return
    cudnn = torch.backends.cudnn
    flags = cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=cudnn.benchmark,
        deterministic=cudnn.deterministic,
        allow_tf32=precision == "tf32",
    )
    with flags, autocast:
        yield


def _grid_shape(model: Any, device: torch.device, precision: str) -> tuple[int, int]:
    """(h, w) of the code grid, from one blank image (for a shard with no rows to encode)."""
    size = model.config.image_size
    codes = encode_batch(model, torch.zeros(1, 3, size, size, device=device), precision)
    return int(codes.shape[1]), int(codes.shape[2])


def _read_filtered(path: str) -> pa.Table:
    """The key, caption and image columns of a ``filtered`` shard; ``ValueError`` for another dataset."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: not a readable Parquet file: {err}") from err
        name, version = schema_identity(parquet.schema_arrow)
        if (name, version) != (filtered_schema.NAME, filtered_schema.VERSION):
            raise ValueError(
                f"{path}: metadata names dataset {name!r} v{version}, "
                f"expected {filtered_schema.NAME!r} v{filtered_schema.VERSION}"
            )
        return parquet.read(columns=_INPUT_COLUMNS)


def tokenize_shard(
    filtered_path: str, out_path: str, model: Any, *, dvae_version: str, config: TokenizeConfig
) -> tuple[WrittenFile, dict[str, Any]]:
    """Encode the ``filtered`` shard at ``filtered_path`` into a ``tokens`` shard at ``out_path``.

    ``model`` is a dVAE (``config.image_size``, ``config.vocab_size``,
    ``get_codebook_indices``); it is moved to the configured device in place
    (as ``nn.Module.to`` does) and run in eval mode, its training flag
    restored afterwards. Both paths may be any fsspec URL. Returns the written
    file and stats ``{"rows", "seconds", "images_per_s"}``; a failing shard
    (an image that does not decode) raises ``ValueError`` naming the row and
    writes nothing.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    vocab_size = _vocab_size(model)
    if not 2 <= vocab_size <= tokens_schema.MAX_VOCAB:
        raise ValueError(f"the dVAE's vocab_size {vocab_size} does not fit uint16 codes (at most 65,536)")
    size = int(model.config.image_size)
    table = _read_filtered(filtered_path)
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    model.to(device)
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    grid: tuple[int, int] | None = None
    try:
        with (
            torch.inference_mode(),
            ThreadPoolExecutor(config.decode_threads, thread_name_prefix="tokenize-decode") as pool,
        ):
            previous = None  # codes (B, h, w) of the batch before, fetched once the next one is queued
            for batch in _preprocessed_batches(keys, images, size, config, pool):
                codes = encode_batch(model, pixels_to_device(batch, device), config.precision)  # (B, h, w)
                grid = (int(codes.shape[1]), int(codes.shape[2]))
                if previous is not None:  # on a GPU, waits for the batch before while this one runs
                    chunks.append(_to_host(previous))
                previous = codes
            if previous is not None:
                chunks.append(_to_host(previous))
            if grid is None:
                grid = _grid_shape(model, device, config.precision)
    finally:
        model.train(was_training)
    cells = grid[0] * grid[1]
    flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.uint16)
    out = pa.table(
        {
            "key": table.column("key"),
            "caption": table.column("caption"),
            "image_tokens": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint16()), cells),
        }
    )
    schema = tokens_schema.tokens_schema(grid[0], grid[1], vocab_size, dvae_version)
    written = write_parquet_atomic(out, out_path, tokens_schema, schema=schema)
    seconds = time.perf_counter() - start
    stats = {"rows": written.rows, "seconds": seconds, "images_per_s": written.rows / seconds}
    return written, stats


def token_grid(table_or_row: pa.Table | dict[str, Any]) -> np.ndarray:
    """Codes of a tokens table (or one row as a dict) as an int64 array (N, h, w).

    The grid shape comes from the table's metadata; a row dict carries none,
    so its grid is taken as square (``ValueError`` if the length is not a square).
    """
    if isinstance(table_or_row, pa.Table):
        recorded = tokens_schema.token_metadata(table_or_row.schema)
        column = table_or_row.column("image_tokens").combine_chunks()
        cells = column.type.list_size
        if recorded is not None:
            grid = recorded[:2]
        else:
            grid = _square(cells)
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.int64).reshape(len(column), *grid)
    codes = np.asarray(table_or_row["image_tokens"], dtype=np.int64)
    return codes.reshape(1, *_square(codes.size))


def _square(cells: int) -> tuple[int, int]:
    side = round(cells**0.5)
    if side * side != cells:
        raise ValueError(f"{cells} codes per image is not a square grid and no grid shape is recorded")
    return side, side


def decode_tokens(table_or_row: pa.Table | dict[str, Any], model: Any, batch_size: int = 64) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, decoded by ``model`` from stored codes (round-trip checks)."""
    codes = torch.from_numpy(token_grid(table_or_row))  # (N, h, w)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            images = [
                model.decode_indices(codes[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(codes), batch_size)
            ]
    finally:
        model.train(was_training)
    if not images:
        size = model.config.image_size
        return torch.zeros(0, 3, size, size)
    return torch.cat(images)
