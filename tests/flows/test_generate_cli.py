"""``dalle generate``: N samples for a caption, reranked by CLIP, the best written as a grid with their scores."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dalle_lightning.generation.rerank import GRID_METADATA_CAPTIONS, GRID_METADATA_SCORES
from flows.cli import app

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(paths: dict[str, str], out, *extra: str) -> list[str]:
    return [
        "generate",
        "a large red circle above a small blue square",
        "--dalle",
        paths["dalle"],
        "--dvae",
        paths["dvae"],
        "--clip",
        paths["clip"],
        "--out",
        str(out),
        *extra,
    ]


def test_generate_writes_the_best_samples_with_their_scores(tmp_path, tiny_generation_models):
    paths = tiny_generation_models
    out = tmp_path / "grid.png"
    args = _args(paths, out, "--bpe", paths["bpe"], "--n", "6", "--top", "3", "--seed", "1", "--top-k", "8")
    result = runner.invoke(app, [*args, "--temperature", "0.9", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        (scores,) = json.loads(grid.text[GRID_METADATA_SCORES])
        assert json.loads(grid.text[GRID_METADATA_CAPTIONS]) == [
            "a large red circle above a small blue square"
        ]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert f"wrote {out}" in result.output and "best 3 of 6" in result.output
    assert f"{scores[0]:7.4f}" in result.output  # the printed table holds the grid's scores

    # the same seed gives the same grid
    again = runner.invoke(
        app, [*args, "--temperature", "0.9", "--batch-size", "4", "--out", str(tmp_path / "b.png")]
    )
    assert again.exit_code == 0, again.output
    with Image.open(tmp_path / "b.png") as grid:
        assert json.loads(grid.text[GRID_METADATA_SCORES]) == [scores]


def test_generate_finds_the_bpe_its_training_recorded_or_asks_for_it(tmp_path, tiny_generation_models):
    paths = dict(tiny_generation_models)
    missing = runner.invoke(app, [*_args(paths, tmp_path / "x.png"), "--n", "2", "--top", "1"])
    assert missing.exit_code != 0 and "--bpe" in str(missing.exception)

    # a DALL-E exported by the train_dalle flow has result.json beside it, naming its BPE
    folder = tmp_path / "trained"
    folder.mkdir()
    paths["dalle"] = str(shutil.copy(paths["dalle"], folder / "dalle.pt"))
    (folder / "result.json").write_text(json.dumps({"bpe_path": paths["bpe"], "model_path": paths["dalle"]}))
    found = runner.invoke(app, [*_args(paths, tmp_path / "y.png"), "--n", "2", "--top", "2"])
    assert found.exit_code == 0, found.output
    assert (tmp_path / "y.png").is_file()

    bad = runner.invoke(app, [*_args(paths, tmp_path / "z.png"), "--n", "2", "--top", "3"])
    assert bad.exit_code != 0 and "--top 3 is more than --n 2" in bad.output
