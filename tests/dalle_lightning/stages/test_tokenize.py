"""The tokenize stage on a tiny filtered shard of ``shapes`` images made here, with a tiny random dVAE."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pytest
import torch
from PIL import Image

import data_schemas
import data_schemas.filtered as filtered_schema
import data_schemas.tokens as tokens_schema
from dalle_lightning.data.transforms import center_crop_resize, decode_image, to_tensor
from dalle_lightning.datasets.parquet_io import read_parquet, write_parquet_atomic
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig, dvae_version, load_dvae, save_dvae
from dalle_lightning.stages.phash import phash
from dalle_lightning.stages.tokenize import (
    TokenizeConfig,
    decode_tokens,
    encode_batch,
    token_grid,
    tokenize_shard,
    tokens_fingerprint,
)
from dalle_lightning.synth.shapes import render
from dalle_lightning.synth.shapes_dataset import ShapesConfig, make_example
from data_schemas import SchemaError

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 32
VOCAB = 300
N = 21
CPU = TokenizeConfig(device="cpu")  # "auto" would pick a GPU where there is one


def tiny_dvae() -> DiscreteVAE:
    """A random-init dVAE: 32 px images → 8×8 codes of 300."""
    torch.manual_seed(0)
    config = DVAEConfig(
        image_size=IMAGE_SIZE, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=VOCAB, n_init=8
    )
    return DiscreteVAE(config).eval()


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def filtered_rows(n: int) -> list[dict]:
    """``n`` shapes images as filtered rows; every third one is 80×64, so the centre crop matters."""
    config = ShapesConfig(n=n, size=64)
    rows = []
    for i in range(n):
        scene, text, _split = make_example(config, i)
        image = render(scene, 64)
        if i % 3 == 0:
            image = image.resize((80, 64))
        data = jpeg(image)
        rows.append(
            {
                "key": f"shard-{i:06d}",
                "url": f"https://example.com/{i}.jpg",
                "caption": text,
                "image": data,
                "width": image.width,
                "height": image.height,
                "original_width": image.width,
                "original_height": image.height,
                "sha256": hashlib.sha256(data).hexdigest(),
                "phash": phash(image),
                "caption_len": len(text),
            }
        )
    return rows


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[str, list[dict]]:
    rows = filtered_rows(N)
    path = str(tmp_path_factory.mktemp("filter") / "part-00ab.parquet")
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA), path, filtered_schema)
    return path, rows


@pytest.fixture(scope="module")
def tokenized(shard, tmp_path_factory) -> tuple[str, dict, pa.Table]:
    path = str(tmp_path_factory.mktemp("tokens") / "part-00ab.parquet")
    written, stats = tokenize_shard(
        shard[0],
        path,
        tiny_dvae(),
        dvae_version="v1",
        config=TokenizeConfig(batch_size=8, decode_threads=2, device="cpu"),
    )
    assert written.path == path and written.rows == N
    return path, stats, read_parquet(path)


def preprocessed(rows: list[dict]) -> torch.Tensor:
    return to_tensor([center_crop_resize(decode_image(r["image"]), IMAGE_SIZE) for r in rows])


def test_one_row_per_input_in_order_with_keys_and_captions(shard, tokenized):
    _, rows = shard
    _, stats, table = tokenized
    assert table.column("key").to_pylist() == [r["key"] for r in rows]
    assert table.column("caption").to_pylist() == [r["caption"] for r in rows]
    assert stats["rows"] == N and stats["seconds"] > 0 and stats["images_per_s"] > 0


def test_file_validates_and_records_grid_vocab_and_dvae_version(tokenized):
    table = tokenized[2]
    tokens_schema.validate(table, check_metadata=True)
    assert data_schemas.module_for("tokens") is tokens_schema
    assert table.schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    assert tokens_schema.token_metadata(table.schema) == (8, 8, VOCAB, "v1")


def test_codes_equal_the_encoder_on_the_same_preprocessed_images(shard, tokenized):
    model = tiny_dvae()
    with torch.inference_mode():
        expected = model.get_codebook_indices(preprocessed(shard[1]))
    assert len(expected.unique()) > 5  # a random dVAE still uses several codes: the check has teeth
    assert token_grid(tokenized[2]).tolist() == expected.tolist()


def test_decoding_stored_codes_reproduces_the_reconstruction(shard, tokenized):
    model = tiny_dvae()
    with torch.inference_mode():
        reconstruction = model.decode_indices(model.get_codebook_indices(preprocessed(shard[1])))
    decoded = decode_tokens(tokenized[2], model)  # one batch, as the reconstruction
    assert decoded.shape == (N, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(decoded, reconstruction)
    # smaller batches may round differently in the decoder's float kernels, never by more than that
    torch.testing.assert_close(decode_tokens(tokenized[2], model, batch_size=5), reconstruction)
    with torch.inference_mode():
        alone = model.decode_indices(model.get_codebook_indices(preprocessed(shard[1][3:4])))
    assert torch.equal(decode_tokens(tokenized[2].slice(3, 1).to_pylist()[0], model), alone)


def test_batch_size_and_threads_do_not_change_the_output(shard, tokenized, tmp_path):
    path = str(tmp_path / "part-00ab.parquet")
    config = TokenizeConfig(batch_size=5, decode_threads=1, device="cpu")
    tokenize_shard(shard[0], path, tiny_dvae(), dvae_version="v1", config=config)
    assert read_parquet(path).equals(tokenized[2], check_metadata=True)


def test_a_saved_dvae_names_its_tokens(shard, tokenized, tmp_path):
    path = save_dvae(tiny_dvae(), tmp_path / "dvae.pt")
    out = str(tmp_path / "part-00ab.parquet")
    tokenize_shard(shard[0], out, load_dvae(path), dvae_version=dvae_version(path), config=CPU)
    table = read_parquet(out)
    assert tokens_schema.token_metadata(table.schema)[3] == dvae_version(path)
    assert table.column("image_tokens").equals(tokenized[2].column("image_tokens"))


def test_fingerprint_follows_dvae_version_and_precision_not_speed_settings():
    base = tokens_fingerprint("in", "v1", TokenizeConfig())
    assert (
        tokens_fingerprint("in", "v1", TokenizeConfig(batch_size=7, decode_threads=9, device="cpu")) == base
    )
    assert tokens_fingerprint("in", "v2", TokenizeConfig()) != base
    assert tokens_fingerprint("other", "v1", TokenizeConfig()) != base
    assert tokens_fingerprint("in", "v1", TokenizeConfig(precision="bf16")) != base
    assert tokens_fingerprint("in", "v1", TokenizeConfig(precision="tf32")) != base


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_other_precisions_run_on_the_cpu(shard, tokenized, tmp_path, precision):
    path = str(tmp_path / "part-00ab.parquet")
    config = TokenizeConfig(device="cpu", precision=precision)
    tokenize_shard(shard[0], path, tiny_dvae(), dvae_version="v1", config=config)
    table = read_parquet(path)
    tokens_schema.validate(table, check_metadata=True)
    if precision == "tf32":  # TF32 is a CUDA matter: on the CPU, the fp32 codes
        assert table.column("image_tokens").equals(tokenized[2].column("image_tokens"))


def test_empty_shard_writes_an_empty_valid_file(tmp_path):
    src = str(tmp_path / "filter" / "part-00.parquet")
    write_parquet_atomic(filtered_schema.SCHEMA.empty_table(), src, filtered_schema)
    out = str(tmp_path / "tokens" / "part-00.parquet")
    written, stats = tokenize_shard(src, out, tiny_dvae(), dvae_version="v1", config=CPU)
    table = read_parquet(out)
    assert written.rows == stats["rows"] == table.num_rows == 0
    tokens_schema.validate(table, check_metadata=True)
    assert tokens_schema.token_metadata(table.schema) == (8, 8, VOCAB, "v1")
    assert decode_tokens(table, tiny_dvae()).shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_undecodable_image_names_the_row_and_writes_nothing(shard, tmp_path):
    rows = [dict(r) for r in shard[1][:3]]
    rows[1]["image"] = b"not an image"
    src = str(tmp_path / "part-01.parquet")
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=filtered_schema.SCHEMA), src, filtered_schema)
    out = tmp_path / "out" / "part-01.parquet"
    with pytest.raises(ValueError, match="shard-000001"):
        tokenize_shard(src, str(out), tiny_dvae(), dvae_version="v1", config=CPU)
    assert not out.exists()


def test_input_must_be_a_filtered_shard(tokenized, tmp_path):
    with pytest.raises(ValueError, match="expected 'filtered'"):
        tokenize_shard(tokenized[0], str(tmp_path / "x.parquet"), tiny_dvae(), dvae_version="v1", config=CPU)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("decode_threads", 1.5),
        ("device", "tpu"),
        ("precision", "fp8"),
        ("batch_size", True),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TokenizeConfig.{field}"):
        TokenizeConfig(**{field: value})


def test_cuda_without_a_gpu_is_a_clear_error(shard, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no usable CUDA"):
        tokenize_shard(
            shard[0],
            str(tmp_path / "x.parquet"),
            tiny_dvae(),
            dvae_version="v1",
            config=TokenizeConfig(device="cuda"),
        )


def _tokens_table(codes: list[list[int]], grid=(2, 2), vocab=10) -> pa.Table:
    schema = tokens_schema.tokens_schema(*grid, vocab, "v")
    n = len(codes)
    return pa.table(
        {"key": [str(i) for i in range(n)], "caption": ["c"] * n, "image_tokens": codes}, schema=schema
    )


def test_schema_rejects_codes_out_of_the_codebook_and_wrong_list_sizes():
    tokens_schema.validate(_tokens_table([[0, 1, 2, 9]]), check_metadata=True)
    with pytest.raises(SchemaError, match="code 10, the codebook has 10"):
        tokens_schema.validate(_tokens_table([[0, 1, 2, 10]]))
    wrong_size = _tokens_table([[0, 1, 2, 3]]).cast(
        pa.schema(
            [
                pa.field("key", pa.string(), nullable=False),
                pa.field("caption", pa.string()),
                pa.field("image_tokens", pa.list_(pa.uint16(), 4)),
            ],
            metadata=tokens_schema.tokens_schema(1, 2, 10, "v").metadata,
        )
    )
    with pytest.raises(SchemaError, match="'image_tokens' has type"):
        tokens_schema.validate(wrong_size)
    bare = _tokens_table([[0, 1, 2, 3]]).replace_schema_metadata(None)
    tokens_schema.validate(bare)
    with pytest.raises(SchemaError, match="lacks the grid shape"):
        tokens_schema.validate(bare, check_metadata=True)
    with pytest.raises(SchemaError, match="fixed-size list"):
        tokens_schema.validate(bare.cast(pa.schema(tokens_schema.SCHEMA)))
    with pytest.raises(ValueError, match="vocab_size"):
        tokens_schema.tokens_schema(2, 2, 2**16 + 1, "v")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_codes_equal_the_encoder_on_cuda(shard, tokenized, tmp_path, precision):
    path = str(tmp_path / "part-00ab.parquet")
    model = tiny_dvae()
    config = TokenizeConfig(device="cuda", batch_size=8, precision=precision)
    tokenize_shard(shard[0], path, model, dvae_version="v1", config=config)
    assert next(model.parameters()).is_cuda
    table = read_parquet(path)
    tokens_schema.validate(table, check_metadata=True)
    with torch.inference_mode():
        x = preprocessed(shard[1]).cuda()
        expected = torch.cat([encode_batch(model, x[i : i + 8], precision) for i in range(0, N, 8)])
        reconstruction = model.decode_indices(expected).cpu()
    assert token_grid(table).tolist() == expected.tolist()
    assert torch.equal(decode_tokens(table, model), reconstruction)
    if precision == "fp32":
        # TF32 off: the CPU's codes, but for a rare near-tie argmax that other kernels round apart
        differ = int((token_grid(table) != token_grid(tokenized[2])).sum())
        assert differ <= 2, f"{differ} of {N * 64} CUDA codes differ from the CPU codes"
