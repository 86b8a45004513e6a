"""``dalle generate``: N samples for a caption, reranked by CLIP, the best written as a PNG grid.

Not a flow (nothing to cache, retry or log): the command resolves the models
(:mod:`flows.model_refs`), loads them and calls
:func:`~dalle_lightning.generation.rerank.generate_and_rank`. The evaluate
flow loads its models the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.model_refs import ModelRef


@dataclass
class LoadedModels:
    """Everything sampling and reranking need, on one device, and where each model came from."""

    dalle: Any
    dvae: Any
    scorer: Any
    text_encoder: Any
    """The DALL-E's caption encoder (its BPE, its ``text_len``)."""
    refs: dict[str, ModelRef]
    """``dalle``, ``dvae``, ``clip``: the resolved references."""
    bpe_path: str


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when a GPU is there, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_models(
    dalle: str, clip: str, dvae: str | None = None, bpe: str | None = None, device: str = "auto"
) -> LoadedModels:
    """Resolve the references (paths or MLflow URIs; the tracking URI must be set for URIs) and load the models.

    ``dvae`` defaults to the registered dVAE of the DALL-E's lineage, ``bpe``
    to the caption BPE its training recorded (see :mod:`flows.model_refs`).
    """
    from dalle_lightning.generation.rerank import RerankScorer
    from dalle_lightning.models.dvae import load_dvae
    from dalle_lightning.stages.bpe import CaptionEncoder, load_bpe
    from dalle_lightning.training.dalle_train import load_dalle
    from flows.model_refs import dalle_bpe, dalle_dvae, resolve_model

    dalle_ref = resolve_model(dalle)
    dvae_ref = dalle_dvae(dalle_ref, dvae)
    clip_ref = resolve_model(clip)
    bpe_path = dalle_bpe(dalle_ref, bpe)
    device = resolve_device(device)
    model = load_dalle(dalle_ref.path).to(device)  # the loaders build on the CPU
    return LoadedModels(
        dalle=model,
        dvae=load_dvae(dvae_ref.path).to(device),
        scorer=RerankScorer.load(clip_ref.path, device=device),
        text_encoder=CaptionEncoder(load_bpe(bpe_path), model.config.text_len),
        refs={"dalle": dalle_ref, "dvae": dvae_ref, "clip": clip_ref},
        bpe_path=bpe_path,
    )


def generate_grid(
    models: LoadedModels,
    caption: str,
    out: str | Path,
    *,
    n: int = 64,
    top: int = 8,
    sampling: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Any, Path]:
    """Draw ``n`` images for ``caption``, rank them, write the ``top`` best with their scores to ``out``.

    Returns the :class:`~dalle_lightning.generation.rerank.RankedSamples` and the grid's path.
    """
    from dalle_lightning.generation.rerank import generate_and_rank, ranked_grid_png

    (ranked,) = generate_and_rank(
        models.dalle,
        models.dvae,
        models.scorer,
        [caption],
        models.text_encoder,
        n=n,
        top=top,
        config=sampling,
        progress=progress,
    )
    path = ranked_grid_png(ranked.images, ranked.scores[:top], out, captions=[caption])
    return ranked, path
