"""Where a root's training runs live: under a local root, or in a local folder for an object-store root."""

from __future__ import annotations

import fsspec.config

from dalle_lightning.datasets.layout import MODELS_DIR_ENV, DatasetLayout


def test_model_dir_of_a_local_root_is_under_it(tmp_path):
    assert DatasetLayout(str(tmp_path)).model_dir("dvae", "abc") == f"{tmp_path}/models/dvae/abc"
    assert DatasetLayout(f"file://{tmp_path}/").model_dir("clip", "r") == f"{tmp_path}/models/clip/r"


def test_model_dir_of_an_object_store_root_is_local(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "cache"))
    layout = DatasetLayout("s3://bucket/team/data/")
    assert not layout.is_local
    assert layout.model_dir("dalle", "f00") == str(tmp_path / "cache/s3/bucket/team/data/dalle/f00")
    monkeypatch.delenv(MODELS_DIR_ENV)
    assert "://" not in layout.model_dir("dalle", "f00")


def test_object_stores_are_listed_without_a_cache():
    import dalle_lightning.datasets  # noqa: F401 - sets the default

    assert fsspec.config.conf["s3"]["use_listings_cache"] is False
