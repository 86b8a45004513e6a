"""Tokenize stage vs the bare dVAE encoder on the same images, timed in one run.

    .venv/bin/python bench/tokenize.py --n 1000 --shards 4 --image-size 64 --vocab 512 --device cpu
    .venv/bin/python bench/tokenize.py --image-size 256 --vocab 8192 --n-hid 256 --groups 4 --blocks 2 \
        --device cuda --batch-size 128 --decode-threads 8     # the paper's dVAE shape

Writes ``n`` ``shapes`` images as JPEGs (at ``--source-size`` px, default the
dVAE's size) into ``--shards`` ``filtered`` shards in a temporary folder,
builds a random-init dVAE (a named ``--preset``, else ``DiscreteVAE(DVAEConfig(...))``
from ``--image-size``, ``--vocab``, ``--n-hid``, ``--groups``, ``--blocks``: weights do not
change the speed), then
times, after one untimed warm-up shard,

  stage    ``tokenize_shard`` on every shard in turn: Parquet read, JPEG decode, centre crop and
           resize on the decode threads, transfer, encode, Parquet write;
  encoder  ``get_codebook_indices`` alone on the same images already preprocessed into float
           batches on the device (same batch size, device and precision; the codes are copied back
           to the host as the stage does);
  decode   the JPEG decode + centre crop + resize alone on the same thread pool (no model),

each ``--repeats`` times, alternating, keeping the best (the host may be
shared), and prints images/s of each and the ratio stage / encoder: how much of the
encoder's speed the whole stage keeps once image decoding and I/O are added.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script, this file would shadow the standard library's ``tokenize``

import hashlib
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer


def make_shards(folder: Path, n: int, shards: int, size: int) -> list[str]:
    """``n`` shapes images as JPEG rows of ``shards`` ``filtered`` shards in ``folder``; returns their paths."""
    import pyarrow as pa

    import data_schemas.filtered as filtered_schema
    from dalle_lightning.datasets.parquet_io import write_parquet_atomic
    from dalle_lightning.synth.shapes import render
    from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example

    config = ShapesConfig(n=n, size=size)
    rows = []
    for i in range(n):
        scene, text, _split = make_example(config, i)
        buffer = io.BytesIO()
        render(scene, size, supersample=1).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        rows.append(
            {
                "key": f"{i:07d}",
                "url": f"https://example.com/{i}.jpg",
                "caption": text,
                "image": data,
                "width": size,
                "height": size,
                "original_width": size,
                "original_height": size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "phash": i,  # not read by tokenize
                "caption_len": len(text),
            }
        )
    paths = []
    per_shard = -(-n // shards)
    for s in range(shards):
        part = rows[s * per_shard : (s + 1) * per_shard]
        path = str(folder / f"part-{s:05x}.parquet")
        write_parquet_atomic(pa.Table.from_pylist(part, schema=filtered_schema.SCHEMA), path, filtered_schema)
        paths.append(path)
    return paths


def build_dvae(preset: str | None, image_size: int, vocab: int, n_hid: int, groups: int, blocks: int) -> Any:
    """A random-init dVAE: the model config of preset ``preset``, else one from the sizes given."""
    from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig

    if preset is None:
        config = DVAEConfig(
            image_size=image_size, vocab_size=vocab, n_hid=n_hid, group_count=groups, n_blk_per_group=blocks
        )
        return DiscreteVAE(config)
    try:
        from dalle_lightning.training.dvae_train import load_preset
    except ImportError as err:
        raise typer.BadParameter(
            f"--preset needs dalle_lightning.training.dvae_train.load_preset: {err}"
        ) from err
    loaded = load_preset(preset)
    if isinstance(loaded, DVAEConfig):
        return DiscreteVAE(loaded)
    for name in ("model", "dvae"):
        if isinstance(getattr(loaded, name, None), DVAEConfig):
            return DiscreteVAE(getattr(loaded, name))
    raise typer.BadParameter(f"preset {preset!r} gave {type(loaded).__name__}, which holds no DVAEConfig")


def time_encoder(model: Any, batches: list, precision: str, device: Any) -> float:
    """Seconds for ``get_codebook_indices`` over ``batches`` already on ``device`` (codes copied back)."""
    import torch

    from dalle_lightning.stages.tokenize import encode_batch

    with torch.inference_mode():
        encode_batch(model, batches[0], precision).cpu()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in batches:
            encode_batch(model, x, precision).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def time_decode(shard_images: list[list[bytes]], size: int, threads: int) -> tuple[list, float]:
    """Centre crops (uint8 HWC) of every shard's images on a pool of ``threads``, and the seconds it took."""
    from dalle_lightning.data.transforms import center_crop_resize, decode_image

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        pixels = [
            list(pool.map(lambda data: center_crop_resize(decode_image(data), size), images))
            for images in shard_images
        ]
        return pixels, time.perf_counter() - start


def main(
    n: int = typer.Option(1000, help="number of images"),
    shards: int = typer.Option(4, help="filtered shards the images are split into"),
    preset: str = typer.Option(None, help="dVAE preset name (overrides --image-size/--vocab)"),
    image_size: int = typer.Option(64, help="dVAE input size in pixels, without --preset"),
    vocab: int = typer.Option(512, help="dVAE codebook size, without --preset"),
    n_hid: int = typer.Option(64, help="dVAE channels of the first group, without --preset (paper: 256)"),
    groups: int = typer.Option(3, help="dVAE groups = 1 + down-samplings, without --preset (paper: 4)"),
    blocks: int = typer.Option(1, help="dVAE residual blocks per group, without --preset (paper: 2)"),
    source_size: int = typer.Option(None, help="side of the stored JPEGs (default: the dVAE's image size)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    batch_size: int = typer.Option(64, help="images per encoder call"),
    decode_threads: int = typer.Option(4, help="decode threads of the stage"),
    precision: str = typer.Option("fp32", help="fp32 or bf16"),
    repeats: int = typer.Option(3, help="timed runs of stage and encoder, alternating; the best is kept"),
) -> None:
    """Time the tokenize stage and the bare encoder on the same images; print both and the ratio."""
    import numpy as np
    import torch

    from dalle_lightning.datasets.parquet_io import read_parquet
    from dalle_lightning.stages.tokenize import (
        TokenizeConfig,
        pixels_to_device,
        resolve_device,
        tokenize_shard,
    )

    config = TokenizeConfig(
        batch_size=batch_size, decode_threads=decode_threads, device=device, precision=precision
    )
    torch_device = resolve_device(config.device)
    torch.manual_seed(0)
    model = build_dvae(preset, image_size, vocab, n_hid, groups, blocks).to(torch_device).eval()
    size = int(model.config.image_size)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp_dir:
        tmp = Path(tmp_dir)
        start = time.perf_counter()
        paths = make_shards(tmp / "filter", n, shards, source_size or size)
        warm = make_shards(tmp / "warm", min(n, 2 * batch_size), 1, source_size or size)[0]
        make_s = time.perf_counter() - start
        tokenize_shard(warm, str(tmp / "warm-tokens.parquet"), model, dvae_version="bench", config=config)
        outs = [str(tmp / "tokens" / Path(path).name) for path in paths]
        cells = 0
        shard_images = [read_parquet(p, columns=["image"]).column("image").to_pylist() for p in paths]
        shard_pixels, decode_s = time_decode(shard_images, size, decode_threads)
        # the stage's batches: per shard, batch_size images, the last one shorter
        batches = [
            pixels_to_device(np.stack(pixels[i : i + batch_size]), torch_device)
            for pixels in shard_pixels
            for i in range(0, len(pixels), batch_size)
        ]
        stage_s = encoder_s = float("inf")
        for _ in range(repeats):  # alternate, keep the best of each: the host may be busy
            start = time.perf_counter()
            for path, out in zip(paths, outs, strict=True):
                tokenize_shard(path, out, model, dvae_version="bench", config=config)
            stage_s = min(stage_s, time.perf_counter() - start)
            encoder_s = min(encoder_s, time_encoder(model, batches, precision, torch_device))
            decode_s = min(decode_s, time_decode(shard_images, size, decode_threads)[1])
        cells = read_parquet(outs[0]).schema.field("image_tokens").type.list_size

    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
    print(
        f"\nn={n} in {shards} shard(s), {source_size or size}px JPEG -> {size}px, {cells} codes/image, "
        f"vocab {model.config.vocab_size}, {params / 1e6:.2f} M params, random init"
    )
    print(
        f"device {name} ({torch.get_num_threads()} torch CPU threads), batch {batch_size}, "
        f"decode threads {decode_threads}, {precision}, best of {repeats}   (making the shards: {make_s:.1f} s)"
    )
    for label, seconds in (
        ("tokenize stage (read, decode, encode, write)", stage_s),
        ("bare encoder (get_codebook_indices)", encoder_s),
        ("decode + crop only (thread pool)", decode_s),
    ):
        print(f"{label:46s} {seconds:7.2f} s  {n / seconds:8.1f} img/s")
    print(f"ratio stage / encoder throughput: {encoder_s / stage_s:.2f}")


if __name__ == "__main__":
    typer.run(main)
