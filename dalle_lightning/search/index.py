"""Text → image search over one dataset's ``embeddings`` (made by the ``embed`` stage with one CLIP).

- :class:`ImageIndex` loads the ``key``, ``caption``, ``url`` and
  ``image_embedding`` columns of every shard of
  ``<root>/embeddings/<clip version>/<dataset>/`` (never the text embeddings)
  into a faiss flat inner-product index. The vectors are unit length, so the
  inner product is the cosine similarity and the search is exact.
- :class:`ImageSearch` pairs the index with a text encoder (the CLIP's, or
  any callable from captions to unit-length vectors): ``search(query, k)``
  returns the ``k`` best :class:`Hit` s, best first.
- :func:`read_images` fetches the images of some hits from the ``filter``
  dataset they came from, reading only the ``key`` and ``image`` columns of
  the shards that hold a hit and keeping only the wanted rows (a Parquet
  filter on ``key``); :func:`grid_png` lays them out in a PNG grid.

faiss is an optional dependency (the ``search`` extra): it is imported when an
index is built, with a message saying how to install it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import data_schemas.embeddings as embeddings_schema
from dalle_lightning.data.transforms import center_crop_resize, decode_image
from dalle_lightning.datasets.layout import DatasetLayout, shard_id_of
from dalle_lightning.datasets.parquet_io import list_parts
from dalle_lightning.image_grid import image_grid

TextEncoder = Callable[[Sequence[str]], np.ndarray]
"""Captions → unit-length float32 embeddings (N, D) in the space of the image embeddings."""
_INDEX_COLUMNS = ["key", "caption", "url", "image_embedding"]


class Hit(NamedTuple):
    """One search result: the image's key, caption and url, and its cosine similarity to the query."""

    key: str
    caption: str | None
    url: str | None
    score: float


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "search needs faiss: install it with `pip install 'dalle-lightning[search]'` (faiss-cpu)"
        ) from err
    return faiss


def embeddings_folder(root: str, dataset: str, clip_version: str) -> str:
    """``<root>/embeddings/<clip version>/<dataset>``: where the ``embed`` flow writes."""
    return DatasetLayout(root).join("embeddings", clip_version, dataset)


class ImageIndex:
    """An exact inner-product (cosine) index over unit-length image embeddings, with each row's identity.

    ``embeddings`` is float32 (N, D); ``keys``, ``captions``, ``urls`` and
    (optionally) ``shard_ids`` have one entry per row. ``root`` and ``dataset``
    name the data the rows came from, so that :meth:`image_bytes` can fetch
    their images.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        keys: Sequence[str],
        captions: Sequence[str | None],
        urls: Sequence[str | None],
        *,
        shard_ids: Sequence[str] | None = None,
        clip_version: str | None = None,
        root: str | None = None,
        dataset: str | None = None,
    ) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] < 1:
            raise ValueError(f"embeddings must be a (N, D) array, got shape {embeddings.shape}")
        n = len(embeddings)
        lengths = {"keys": len(keys), "captions": len(captions), "urls": len(urls)}
        if shard_ids is not None:
            lengths["shard_ids"] = len(shard_ids)
        if any(length != n for length in lengths.values()):
            raise ValueError(f"{n} embeddings but {lengths}: every list needs one entry per embedding")
        self.keys, self.captions, self.urls = list(keys), list(captions), list(urls)
        self.shard_ids = list(shard_ids) if shard_ids is not None else None
        self.clip_version, self.root, self.dataset = clip_version, root, dataset
        self.dim = int(embeddings.shape[1])
        self._index = _faiss().IndexFlatIP(self.dim)
        self._index.add(embeddings)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, root: str, dataset: str, clip_version: str) -> ImageIndex:
        """The index of every shard of ``embeddings/<clip_version>/<dataset>`` under ``root``.

        ``ValueError`` when there are none (naming the folder and the command
        that makes them) or a file was made by another CLIP.
        """
        folder = embeddings_folder(root, dataset, clip_version)
        parts = list_parts(folder)
        if not parts:
            raise ValueError(
                f"no embeddings of dataset {dataset!r} by CLIP {clip_version} under {folder}; "
                "run `dalle embed` with this CLIP first"
            )
        tables, shard_ids = [], []
        for path in parts:
            table = _read_index_columns(path, clip_version)
            tables.append(table)
            shard_ids += [shard_id_of(path)] * table.num_rows
        table = pa.concat_tables(tables)
        column = table.column("image_embedding").combine_chunks()
        embeddings = pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(len(column), -1)
        return cls(
            embeddings,
            table.column("key").to_pylist(),
            table.column("caption").to_pylist(),
            table.column("url").to_pylist(),
            shard_ids=shard_ids,
            clip_version=clip_version,
            root=root,
            dataset=dataset,
        )

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` (at most ``len(self)``) best hits of each query vector (Q, D), best first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {queries.shape}")
        scores, rows = self._index.search(queries, min(k, len(self)))  # (Q, k) each
        return [
            [self._hit(int(r), float(s)) for r, s in zip(row_ids, row_scores, strict=True) if r >= 0]
            for row_ids, row_scores in zip(rows, scores, strict=True)
        ]

    def _hit(self, row: int, score: float) -> Hit:
        return Hit(self.keys[row], self.captions[row], self.urls[row], score)

    def shard_of(self, keys: Iterable[str]) -> dict[str, list[str]]:
        """Shard id → the given keys it holds; ``ValueError`` for a key not in the index."""
        if self.shard_ids is None:
            raise ValueError("this index was built without shard ids; load it with ImageIndex.load")
        row_of = {key: row for row, key in enumerate(self.keys)}
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            if key not in row_of:
                raise ValueError(f"key {key!r} is not in the index")
            by_shard[self.shard_ids[row_of[key]]].append(key)
        return dict(by_shard)

    def image_bytes(self, hits: Sequence[Hit]) -> list[bytes]:
        """The encoded images of ``hits``, in their order, from the ``filter`` dataset the index was made of."""
        if self.root is None or self.dataset is None:
            raise ValueError("this index does not know its dataset; load it with ImageIndex.load")
        keys = [hit.key for hit in hits]
        found = read_images(self.root, self.dataset, self.shard_of(keys))
        return [found[key] for key in keys]


def _read_index_columns(path: str, clip_version: str) -> pa.Table:
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "rb") as f:
        parquet = pq.ParquetFile(f)
        recorded = embeddings_schema.embedding_metadata(parquet.schema_arrow)
        if recorded is None or recorded[1] != clip_version:
            got = None if recorded is None else recorded[1]
            raise ValueError(f"{path}: embeddings of CLIP {got}, expected CLIP {clip_version}")
        return parquet.read(columns=_INDEX_COLUMNS)


def read_images(root: str, dataset: str, keys_by_shard: dict[str, list[str]]) -> dict[str, bytes]:
    """Key → encoded image bytes for the given keys of each ``filter/<dataset>`` shard.

    Only the named shards are opened, only their ``key`` and ``image`` columns
    read, and only the rows whose key is wanted kept (row groups whose key
    statistics exclude them are skipped). ``ValueError`` for a key not found.
    """
    layout = DatasetLayout(root)
    found: dict[str, bytes] = {}
    for shard_id, keys in sorted(keys_by_shard.items()):
        path = layout.shard("filter", dataset, shard_id)
        fs, fs_path = fsspec.core.url_to_fs(path)
        table = pq.read_table(
            fs_path, filesystem=fs, columns=["key", "image"], filters=pc.field("key").isin(list(keys))
        )
        found.update(zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True))
        missing = sorted(set(keys) - found.keys())
        if missing:
            raise ValueError(f"{path}: no row with key(s) {missing[:5]} (has the filter dataset changed?)")
    return found


def grid_png(images: Sequence[bytes], out: str | Path, *, columns: int = 8, size: int = 64) -> Path:
    """Write the encoded ``images`` as a PNG grid, ``columns`` per row, each a centre square of ``size`` px."""
    if not images:
        raise ValueError("grid_png needs at least one image")
    if columns < 1 or size < 1:
        raise ValueError(f"columns and size must be >= 1, got columns={columns}, size={size}")
    pixels = np.stack([center_crop_resize(decode_image(data), size) for data in images])  # (N, S, S, 3)
    rows = [pixels[start : start + columns] for start in range(0, len(pixels), columns)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale=max(1, 64 // size)).save(out, format="PNG")
    return out


class ImageSearch:
    """An :class:`ImageIndex` and the text encoder of the same CLIP: ``search(query, k)`` → hits."""

    def __init__(self, index: ImageIndex, encode_text: TextEncoder) -> None:
        self.index = index
        self.encode_text = encode_text

    @classmethod
    def from_clip(cls, root: str, dataset: str, clip_path: str, *, device: str = "cpu") -> ImageSearch:
        """Search ``dataset``'s embeddings made by the CLIP file at ``clip_path`` (as ``save_clip`` wrote it)."""
        from dalle_lightning.models.clip import load_clip
        from dalle_lightning.stages.embed import encode_captions, model_clip_version
        from dalle_lightning.stages.tokenize import resolve_device

        model, tokenizer = load_clip(clip_path)
        model.to(resolve_device(device))
        index = ImageIndex.load(root, dataset, model_clip_version(model, tokenizer))
        if index.dim != model.config.embed_dim:
            raise ValueError(f"the index has {index.dim}-d embeddings, the CLIP {model.config.embed_dim}-d")
        return cls(index, lambda captions: encode_captions(model, tokenizer, captions))

    def search(self, query: str, k: int = 16) -> list[Hit]:
        """The ``k`` images most similar to the text ``query``, best first."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        vector = np.asarray(self.encode_text([query]), dtype=np.float32)  # (1, D)
        return self.index.search_vectors(vector, k)[0]

    def grid_png(self, hits: Sequence[Hit], out: str | Path, *, columns: int = 8, size: int = 64) -> Path:
        """The images of ``hits`` (read from the ``filter`` dataset) as a PNG grid at ``out``."""
        return grid_png(self.index.image_bytes(hits), out, columns=columns, size=size)
