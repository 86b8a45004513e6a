"""evaluate_models: one draw of N_max samples per caption gives the curve, FIDs, shapes accuracy and the grids."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle_lightning.evaluation.eval_sets import EvalSetConfig, shapes_eval_set
from dalle_lightning.evaluation.evaluate import EvalConfig, evaluate_models
from dalle_lightning.generation.rerank import GRID_METADATA_SCORES, RerankScorer
from dalle_lightning.generation.sampling import SamplingConfig
from dalle_lightning.models.dvae import DiscreteVAE, DVAEConfig
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer
from dalle_lightning.stages.bpe import BPEConfig, CaptionEncoder, train_bpe

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ColourClip(torch.nn.Module):
    """A fake CLIP: mean colour of an image (plus its spread) against a constant text embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=16, text_len=6)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)  # (B, 6)
        return F.normalize(features + 1e-6, dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.tensor([[1.0, 0.2, 0.2, 0.5, 0.5, 0.5]]), dim=-1).expand(len(ids), 6)


def test_evaluate_models_reports_every_metric_and_writes_the_grids(tmp_path):
    eval_set = shapes_eval_set(EvalSetConfig(count=6, seed=5), image_size=32)
    tokenizer = train_bpe(eval_set.captions * 3, BPEConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    dalle = DalleTransformer(
        DalleConfig(
            text_len=10,
            text_vocab=tokenizer.get_vocab_size(),
            image_vocab=32,
            grid_size=8,
            n_layer=2,
            n_head=2,
            n_embd=16,
            conv_kernel=3,
        )
    )
    dvae = DiscreteVAE(
        DVAEConfig(image_size=32, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32)
    ).eval()
    config = EvalConfig(
        n_max=4,
        accuracy_ns=(1, 4, 16),
        sampling=SamplingConfig(batch_size=8, seed=1),
        grid_captions=3,
        grid_top=2,
    )
    with pytest.warns(UserWarning, match=r"N=\[16\] left out"):
        result = evaluate_models(
            dalle,
            dvae,
            RerankScorer.from_model(ColourClip(), tokenizer),
            CaptionEncoder(tokenizer, 10),
            eval_set,
            config,
            tmp_path,
        )
    metrics = result.metrics
    for name in (
        "clip_score_n1",
        "clip_score_n2",
        "clip_score_n4",
        "clip_score_n4_stderr",
        "fid",
        "fid_n1",
        "fid_dvae",
    ):
        assert np.isfinite(metrics[name]), name
    assert metrics["clip_score_n1"] <= metrics["clip_score_n2"] <= metrics["clip_score_n4"]
    # the top of 4 is each caption's best score
    assert result.scores.shape == (6, 4) and np.all(np.diff(result.scores, axis=1) <= 0)
    assert metrics["clip_score_n4"] == pytest.approx(result.scores[:, 0].mean())
    for pairing in ("seen", "heldout", "all"):
        for n in (1, 4):
            assert 0.0 <= metrics[f"shapes_accuracy_{pairing}_n{n}"] <= 1.0
        assert 0.0 <= metrics[f"dvae_ceiling_{pairing}"] <= 1.0
    assert "shapes_accuracy_all_n16" not in metrics
    assert metrics["shapes_captions_seen"] + metrics["shapes_captions_heldout"] == 6
    assert result.best.shape == (6, 32, 32, 3)

    with Image.open(result.files["ranked"]) as grid:
        assert [len(row) for row in json.loads(grid.text[GRID_METADATA_SCORES])] == [2, 2, 2]
    assert result.files["real_and_dvae"].is_file()
    per_caption = json.loads(result.files["per_caption"].read_text())
    assert [c["caption"] for c in per_caption] == eval_set.captions
    assert {c["pairing"] for c in per_caption} == {"seen", "heldout"}
    assert all(len(c["correct_ranked"]) == 4 and sorted(c["order"]) == [0, 1, 2, 3] for c in per_caption)
