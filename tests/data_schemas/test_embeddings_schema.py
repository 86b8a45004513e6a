"""The ``embeddings`` schema: per-CLIP fixed-size float32 vectors of unit length, dimension and version recorded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import data_schemas
from data_schemas import SchemaError, embeddings
from data_schemas.base import schema_identity

DIM = 4


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def column(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), values.shape[1])


def table(images: np.ndarray, texts: np.ndarray | None = None, schema: pa.Schema | None = None) -> pa.Table:
    n = len(images)
    texts = unit_vectors(n, images.shape[1], seed=1) if texts is None else texts
    data = {
        "key": [f"k{i}" for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
        "url": [f"http://127.0.0.1/{i}" for i in range(n)],
        "image_embedding": column(images),
        "text_embedding": column(texts),
    }
    return pa.table(data, schema=schema or embeddings.embeddings_schema(images.shape[1], "clip1"))


def test_schema_records_dimension_and_clip_version_and_is_registered():
    schema = embeddings.embeddings_schema(DIM, "clip1")
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), DIM)
    assert schema.field("text_embedding").type == pa.list_(pa.float32(), DIM)
    assert schema.names == ["key", "caption", "url", "image_embedding", "text_embedding"]
    assert embeddings.embedding_metadata(schema) == (DIM, "clip1")
    assert schema_identity(schema) == ("embeddings", embeddings.VERSION)
    assert data_schemas.module_for("embeddings") is embeddings
    assert embeddings.embedding_metadata(embeddings.SCHEMA) is None


def test_unit_vectors_validate_with_and_without_metadata():
    good = table(unit_vectors(5))
    embeddings.validate(good, check_metadata=True)
    embeddings.validate(good.replace_schema_metadata(None))  # any fixed size without metadata
    embeddings.validate(good.slice(2, 2))
    embeddings.validate(table(unit_vectors(0)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v * 2, "row 3 .* L2 norm 2"),
        (lambda v: np.where(np.arange(v.size).reshape(v.shape) == 13, np.nan, v), "row 3 .* L2 norm nan"),
        (lambda v: np.where(np.arange(v.size).reshape(v.shape) == 12, np.inf, v), "row 3 .* L2 norm inf"),
        (lambda v: v * 0, "row 3 .* L2 norm 0"),
    ],
)
def test_a_vector_not_finite_or_not_unit_length_is_named(change, message):
    images = unit_vectors(5)
    images[3] = change(images)[3]
    with pytest.raises(SchemaError, match=f"'image_embedding' {message}"):
        embeddings.validate(table(images))


def test_null_vector_and_key_are_errors():
    good = table(unit_vectors(3))
    nulls = pa.array([None, *good.column("text_embedding").to_pylist()[1:]], good.schema.field(4).type)
    with pytest.raises(SchemaError, match="'text_embedding' has 1 null"):
        embeddings.validate(good.set_column(4, good.schema.field(4), nulls))
    keys = pa.array([None, "a", "b"], pa.string())
    with pytest.raises(SchemaError, match="'key' has 1 null"):
        embeddings.validate(good.set_column(0, pa.field("key", pa.string()), keys))


def test_dimension_must_match_the_metadata_and_each_other():
    wrong = table(unit_vectors(2, dim=3), schema=None)  # a 3-d file that claims 3 ...
    relabelled = wrong.replace_schema_metadata(
        embeddings.embeddings_schema(DIM, "clip1").metadata
    )  # ... now 4
    with pytest.raises(SchemaError, match=r"'image_embedding' has type fixed_size_list<item: float>\[3\]"):
        embeddings.validate(relabelled)
    bare = pa.table(
        {
            "key": ["a"],
            "caption": ["c"],
            "url": ["u"],
            "image_embedding": column(unit_vectors(1, 4)),
            "text_embedding": column(unit_vectors(1, 3)),
        }
    )
    with pytest.raises(SchemaError, match="'text_embedding' has type"):
        embeddings.validate(bare)


def test_variable_lists_and_missing_metadata_are_refused():
    with pytest.raises(SchemaError, match="fixed-size list of float32"):
        embeddings.validate(pa.table({"key": ["a"], "image_embedding": [[1.0]]}))
    with pytest.raises(SchemaError, match="lacks the embedding dimension"):
        embeddings.validate(table(unit_vectors(1)).replace_schema_metadata(None), check_metadata=True)
    half = {b"dalle.embed_dim": b"4"}
    with pytest.raises(SchemaError, match="lacks"):
        embeddings.embedding_metadata(pa.schema([], metadata=half))


@pytest.mark.parametrize("dim, version", [(0, "v"), (True, "v"), (4, ""), (4, None)])
def test_schema_arguments_are_checked(dim, version):
    with pytest.raises(ValueError):
        embeddings.embeddings_schema(dim, version)
