"""Search over hand-made embeddings, where the right answer is known, and the grid of the hits' images."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import data_schemas.embeddings as embeddings_schema
import data_schemas.filtered as filtered_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.search.index import Hit, ImageIndex, ImageSearch, grid_png, read_images
from dalle_lightning.stages.embed import write_embeddings

pytest.importorskip("faiss", reason="faiss-cpu is not installed (the `search` extra)")

pytestmark = pytest.mark.timeout(60)

CLIP = "c0ffee"
# name: (solid colour of the image, its embedding before normalisation), in two shards
ITEMS = {
    "aa": {
        "red": ((220, 20, 20), (1.0, 0.0, 0.0)),
        "dark red": ((120, 10, 10), (0.9, 0.1, 0.02)),
        "orange": ((240, 140, 20), (0.6, 0.4, 0.0)),
    },
    "bb": {
        "green": ((20, 200, 20), (0.05, 1.0, 0.0)),
        "blue": ((20, 20, 220), (0.0, 0.02, 1.0)),
        "cyan": ((20, 200, 200), (0.0, 0.5, 0.6)),
    },
}
QUERIES = {"red": (1.0, 0.0, 0.0), "blue-ish": (0.0, 0.3, 1.0)}


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, np.float32)
    return v / np.linalg.norm(v)


def fake_text_encoder(captions) -> np.ndarray:
    return np.stack([unit(QUERIES[c]) for c in captions])


def png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 20), rgb).save(buffer, format="PNG")  # not square: the grid takes the centre
    return buffer.getvalue()


def vectors(values: list[np.ndarray]) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(values), pa.float32()), 3)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """``filter/d`` and ``embeddings/<CLIP>/d`` with the items above; a third filter shard is unreadable."""
    layout = DatasetLayout(str(tmp_path_factory.mktemp("root")))
    for shard_id, items in ITEMS.items():
        keys = [f"{shard_id}-{name}" for name in items]
        filtered = [
            {
                "key": key,
                "url": f"http://127.0.0.1/{key}",
                "caption": f"a {name} picture",
                "image": png(rgb),
                "width": 24,
                "height": 20,
                "original_width": 24,
                "original_height": 20,
                "sha256": "0" * 64,
                "phash": 0,
                "caption_len": 10,
            }
            for key, (name, (rgb, _)) in zip(keys, items.items(), strict=True)
        ]
        table = pa.Table.from_pylist(filtered, schema=filtered_schema.SCHEMA)
        write_parquet_atomic(table, layout.shard("filter", "d", shard_id), filtered_schema)
        embedded = {
            "key": keys,
            "caption": [row["caption"] for row in filtered],
            "url": [row["url"] for row in filtered],
            "image_embedding": vectors([unit(v) for _, v in items.values()]),
            "text_embedding": vectors([unit(v) for _, v in items.values()]),
        }
        table = pa.table(embedded, schema=embeddings_schema.embeddings_schema(3, CLIP))
        write_embeddings(table, layout.join("embeddings", CLIP, "d", f"part-{shard_id}.parquet"))
    with open(layout.shard("filter", "d", "cc"), "wb") as f:
        f.write(b"not parquet: a shard no hit comes from is never opened")
    return layout.root


@pytest.fixture(scope="module")
def searcher(root) -> ImageSearch:
    return ImageSearch(ImageIndex.load(root, "d", CLIP), fake_text_encoder)


def test_top_k_in_order_of_cosine_similarity(searcher):
    hits = searcher.search("red", k=3)
    assert [h.key for h in hits] == ["aa-red", "aa-dark red", "aa-orange"]
    assert hits[0] == Hit("aa-red", "a red picture", "http://127.0.0.1/aa-red", pytest.approx(1.0, abs=1e-6))
    expected = [float(unit(QUERIES["red"]) @ unit(ITEMS["aa"][n][1])) for n in ("red", "dark red", "orange")]
    assert [h.score for h in hits] == pytest.approx(expected, abs=1e-6)

    ranked = searcher.search("blue-ish", k=6)
    assert [h.key.split("-")[1] for h in ranked] == ["blue", "cyan", "green", "orange", "dark red", "red"]
    assert all(a.score >= b.score for a, b in itertools.pairwise(ranked))


def test_k_beyond_the_index_returns_everything_once(searcher):
    hits = searcher.search("red", k=50)
    assert len(hits) == len(searcher.index) == 6
    assert len({h.key for h in hits}) == 6
    key, caption, url, score = hits[0]  # a hit unpacks as (key, caption, url, score)
    assert (key, caption, url) == ("aa-red", "a red picture", "http://127.0.0.1/aa-red")
    assert score == pytest.approx(1.0, abs=1e-6)


def test_grid_shows_the_hits_images_in_rank_order(searcher, tmp_path):
    hits = searcher.search("blue-ish", k=3)  # blue, cyan from shard bb; green too
    out = searcher.grid_png(hits, tmp_path / "grid.png", columns=2, size=16)
    grid = np.asarray(Image.open(out).convert("RGB"))
    scale, pad, side = 4, 2, 16  # 64 // size; image_grid's padding
    assert grid.shape == (scale * (2 * (side + pad) + pad), scale * (2 * (side + pad) + pad), 3)
    expected = [ITEMS["bb"][h.key.split("-")[1]][0] for h in hits]
    for rank, rgb in enumerate(expected):
        r, c = divmod(rank, 2)
        y, x = (pad + r * (side + pad) + side // 2) * scale, (pad + c * (side + pad) + side // 2) * scale
        assert tuple(int(v) for v in grid[y, x]) == rgb
    assert tuple(grid[-3, -3]) == (255, 255, 255)  # the fourth cell is empty


def test_read_images_returns_only_the_wanted_rows(root):
    found = read_images(root, "d", {"bb": ["bb-cyan"], "aa": ["aa-orange", "aa-red"]})
    assert sorted(found) == ["aa-orange", "aa-red", "bb-cyan"]
    assert np.asarray(Image.open(io.BytesIO(found["bb-cyan"])))[0, 0].tolist() == [20, 200, 200]
    with pytest.raises(ValueError, match="no row with key"):
        read_images(root, "d", {"aa": ["aa-purple"]})


def test_missing_embeddings_and_bad_queries_are_explained(root, searcher):
    with pytest.raises(ValueError, match="run `dalle embed`"):
        ImageIndex.load(root, "d", "another-clip")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        searcher.search("red", k=0)
    with pytest.raises(ValueError, match=r"shape \(Q, 3\)"):
        searcher.index.search_vectors(np.ones((1, 4)), 2)
    with pytest.raises(TypeError, match="query must be a str"):
        searcher.search(["red"])
    with pytest.raises(ValueError, match="one entry per embedding"):
        ImageIndex(np.ones((2, 3)), ["a"], ["c", "d"], ["u", "v"])
    with pytest.raises(ValueError, match="at least one image"):
        grid_png([], "x.png")
