"""Fixtures for the flow tests: small datasets written the way the stages write them."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

import data_schemas.filtered as filtered_schema
from dalle_lightning.datasets.layout import DatasetLayout
from dalle_lightning.datasets.manifest import run_once
from dalle_lightning.datasets.parquet_io import write_parquet_atomic
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example


@pytest.fixture
def write_filtered_dataset() -> Callable[..., None]:
    """``write(root, name, shards=2, per_shard=6)``: a ``filter/<name>`` dataset of 64 px shapes images."""
    return _filtered_dataset


def _filtered_dataset(root: Path, name: str, shards: int = 2, per_shard: int = 6) -> None:
    layout = DatasetLayout(str(root))
    config = ShapesConfig(n=shards * per_shard, size=64, seed=3)
    for s in range(shards):
        shard_id = f"{s:012x}"
        rows = []
        for r in range(per_shard):
            scene, caption, _ = make_example(config, s * per_shard + r)
            buffer = io.BytesIO()
            render(scene, 64).save(buffer, format="JPEG", quality=95)
            rows.append(
                {
                    "key": f"{shard_id}-{r:06d}",
                    "url": f"http://127.0.0.1/{s}/{r}",
                    "caption": caption,
                    "image": buffer.getvalue(),
                    "width": 64,
                    "height": 64,
                    "original_width": 64,
                    "original_height": 64,
                    "sha256": f"{s}{r}".ljust(64, "0"),
                    "phash": s * 100 + r,
                    "caption_len": len(caption),
                }
            )
        table = pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA)
        path = layout.shard("filter", name, shard_id)
        run_once(
            layout.manifest("filter", name, shard_id),
            f"fp-{s}",
            lambda t=table, p=path: ({"output": write_parquet_atomic(t, p, filtered_schema)}, {}),
            stage="filter",
            dataset=name,
            shard_id=shard_id,
            input_fingerprint="in",
        )


@pytest.fixture
def tiny_generation_models(tmp_path) -> dict[str, str]:
    """A BPE, a DALL-E (8×8 codes), a 32 px dVAE and a CLIP, untrained, saved the way training exports them."""
    clip_module = pytest.importorskip("dalle_lightning.models.clip")
    if not hasattr(clip_module, "save_clip"):
        pytest.skip("dalle_lightning.models.clip has no save_clip yet")
    import torch

    from dalle_lightning.evaluation.eval_sets import EvalSetConfig, shapes_eval_set
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, save_dvae
    from dalle_lightning.models.transformer import DalleConfig, DalleTransformer
    from dalle_lightning.stages.bpe import BPEConfig, save_bpe, train_bpe
    from dalle_lightning.training.dalle_train import save_dalle

    captions = shapes_eval_set(EvalSetConfig(count=40, seed=99), image_size=32).captions
    tokenizer = train_bpe(captions, BPEConfig(vocab_size=300, min_frequency=1))
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    dalle = DalleTransformer(
        DalleConfig(
            text_len=10,
            text_vocab=vocab,
            image_vocab=32,
            grid_size=8,
            n_layer=2,
            n_head=2,
            n_embd=16,
            conv_kernel=3,
        )
    )
    dvae = DiscreteVAE(DVAEConfig(image_size=32, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32))
    clip = clip_module.ClipModel(
        clip_module.ClipConfig(
            image_size=16,
            patch_size=8,
            vision_width=16,
            vision_layers=1,
            vision_heads=2,
            text_len=10,
            text_vocab=vocab,
            text_width=16,
            text_layers=1,
            text_heads=2,
            embed_dim=8,
        )
    )
    return {
        "bpe": save_bpe(tokenizer, str(tmp_path / "bpe" / "tokenizer.json")),
        "dalle": str(save_dalle(dalle, tmp_path / "dalle" / "dalle.pt")),
        "dvae": str(save_dvae(dvae, tmp_path / "dvae" / "dvae.pt")),
        "clip": str(clip_module.save_clip(clip, tmp_path / "clip" / "clip.pt", tokenizer)),
    }
