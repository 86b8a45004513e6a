"""Sampling with the KV cache vs running the whole prefix at every step, same model, captions and seed.

    .venv/bin/python -m bench.sample                    # CPU: tiny preset, 8 captions
    .venv/bin/python -m bench.sample --device cuda      # GPU: small preset, 32 captions

Builds a random-init transformer of ``--preset`` (the weights do not change the
speed), draws ``--n`` random captions of random length (the rest padding), and
times ``sample_image_tokens`` on them

  cached    ``use_cache=True``: the caption in one pass, then one token per step against the
            cached keys and values of every layer;
  uncached  ``use_cache=False``: the whole prefix again at every step (the reference),

after one untimed warm-up each, alternating, best of ``--repeats``; prints
images/s of both and the speed-up cached / uncached. Greedy sampling
(``--temperature 0``, the default) must give the same tokens both ways: the
number of differing tokens is printed, and a mismatch exits with status 1.

The model runs ``--backend dense`` by default: the cached path is dense in any
case, and FlexAttention without a cache would build a block mask and compile a
kernel for every prefix length.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import typer

from dalle_lightning.generation.sampling import SamplingConfig, sample_image_tokens
from dalle_lightning.models.transformer import DalleConfig, DalleTransformer, load_dalle_preset


def random_captions(config: DalleConfig, n: int, seed: int) -> torch.Tensor:
    """``n`` captions (n, text_len) of 1 … text_len random BPE ids each, padded with ``text_pad_id``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.text_vocab, (n, config.text_len), generator=gen)
    ids[ids == config.text_pad_id] = 1  # no pad inside a caption
    lengths = torch.randint(1, config.text_len + 1, (n, 1), generator=gen)
    return ids.masked_fill(torch.arange(config.text_len) >= lengths, config.text_pad_id)  # (n, L)


def timed_sample(model: DalleTransformer, captions: torch.Tensor, config: SamplingConfig, use_cache: bool):
    """Image tokens of ``captions`` and the seconds it took."""
    device = model.text_head.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sample_image_tokens(model, captions, config, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main(
    preset: str = typer.Option(None, help="DALL-E preset (default: tiny on CPU, small on CUDA)"),
    n: int = typer.Option(None, help="captions to sample (default: 8 on CPU, 32 on CUDA)"),
    batch_size: int = typer.Option(None, help="captions sampled at once (default: n)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)"),
    backend: str = typer.Option("dense", help="attention backend of the model, dense or flex"),
    temperature: float = typer.Option(0.0, help="0: greedy, and both ways must agree token for token"),
    top_k: int = typer.Option(None, help="sample among the top-k tokens (temperature > 0)"),
    cond_scale: float = typer.Option(1.0, help="classifier-free guidance scale (1: none)"),
    seed: int = typer.Option(0, help="seeds the weights, the captions and the sampling noise"),
    repeats: int = typer.Option(2, help="timed runs of each way, alternating; the best is kept"),
) -> None:
    """Time sampling with and without the KV cache; print both, the speed-up and the token check."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    cuda = dev.type == "cuda"
    config = replace(load_dalle_preset(preset or ("small" if cuda else "tiny")), attention_backend=backend)
    n = n or (32 if cuda else 8)
    sampling = SamplingConfig(
        temperature=temperature, top_k=top_k, cond_scale=cond_scale, batch_size=batch_size or n, seed=seed
    )
    torch.manual_seed(seed)
    model = DalleTransformer(config).to(dev).eval()
    captions = random_captions(config, n, seed)
    warm = captions[: min(n, 2)]
    for use_cache in (True, False):
        sample_image_tokens(model, warm, sampling, use_cache=use_cache)
    best = {True: float("inf"), False: float("inf")}
    tokens = {}
    for _ in range(repeats):  # alternate, keep the best of each: the host may be busy
        for use_cache in (True, False):
            tokens[use_cache], seconds = timed_sample(model, captions, sampling, use_cache)
            best[use_cache] = min(best[use_cache], seconds)

    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"\ndevice {name}, fp32, {config.n_layer} layers × {config.n_embd} ({params / 1e6:.1f} M params), "
        f"{config.text_len} text + {config.grid_size}×{config.grid_size} image tokens, {backend} attention"
    )
    print(
        f"{n} captions, batch {sampling.batch_size}, temperature {temperature}, top-k {top_k}, "
        f"cond_scale {cond_scale}, seed {seed}, best of {repeats}"
    )
    for label, use_cache in (("cached (use_cache=True)", True), ("uncached (use_cache=False)", False)):
        seconds = best[use_cache]
        print(
            f"{label:28s} {seconds:8.2f} s {n / seconds:8.2f} img/s {n * config.image_len / seconds:9.0f} tokens/s"
        )
    print(f"speed-up cached / uncached: {best[False] / best[True]:.2f}")
    differ = (tokens[True] != tokens[False]).sum().item()
    where = (tokens[True] != tokens[False]).nonzero()
    first = f", first at (caption, token) {tuple(where[0].tolist())}" if differ else ""
    print(f"tokens differing between the two: {differ} of {tokens[True].numel()}{first}")
    if differ and temperature == 0:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
