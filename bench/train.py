"""Training speed of the DALL-E transformer against plain causal attention, timed in one run.

    .venv/bin/python -m bench.train                          # CPU: tiny preset; attention 1280 × 2 heads of 32
    .venv/bin/python -m bench.train --device cuda --compile  # GPU: small preset at 256 + 32×32, bf16, MFU

Each figure comes with a reference timed in the same process (alternating runs, the best kept):

  training   tokens/s of forward + backward + AdamW step of the model with the paper's sparse masks
             (``--backend``, default the preset's) and of the same model with plain causal attention
             in every layer (``scaled_dot_product_attention(is_causal=True)``, flash on a GPU).
             Ratio sparse / causal tokens/s: above 1, the masks train faster than causal attention.
  attention  one attention call over ``--attn-text-len + --attn-grid²`` positions (paper: 256 + 32×32
             = 1280) per mask kind, with FlexAttention (block-sparse; compiled on CUDA, eager on CPU
             unless ``--compile``) and with dense-mask SDPA (the reference backend), against plain
             causal SDPA: forward, and forward + backward on CUDA only (FlexAttention has no CPU
             backward). Ratio time / causal time: the target is <= 1, a mask costs no more than
             plain causal attention.
  MFU        (CUDA) model FLOPs/s, ``flops_per_token`` × tokens/s (attention counted dense), over
             the device's bf16 dense peak: H100/H200 989, A100 312 TFLOP/s, or ``--peak-tflops``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
import typer
from torch.nn.attention.flex_attention import flex_attention

from dalle_lightning.models.attention_masks import (
    MASK_KINDS,
    SequenceLayout,
    block_mask,
    column_permutation,
    masked_attention,
)
from dalle_lightning.models.transformer import (
    CausalSelfAttention,
    DalleConfig,
    DalleTransformer,
    flops_per_token,
    load_dalle_preset,
)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense tensor-core peaks


class PlainCausalAttention(CausalSelfAttention):
    """The model's attention with ``scaled_dot_product_attention(is_causal=True)``: the reference."""

    def forward(self, x: torch.Tensor, layer: int, start_pos: int, cache: object) -> torch.Tensor:
        B, S, C = x.shape
        qkv = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, D)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, S, C)))  # (B, S, C)


def causal_reference(config: DalleConfig) -> DalleTransformer:
    """The model of ``config`` with plain causal attention in every layer."""
    model = DalleTransformer(replace(config, attention="full", attention_backend="dense"))
    for block in model.blocks:
        plain = PlainCausalAttention(model.config, "full")
        plain.load_state_dict(block.attn.state_dict())
        block.attn = plain
    return model


def best_times(fns: dict[str, Callable[[], object]], device, repeats: int, calls: int, warmup: int):
    """Seconds per call of each function: ``warmup`` untimed calls, then the best of ``repeats`` runs
    of ``calls`` calls, the functions taking turns (the host is shared)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def train_step(model: DalleTransformer, batch_size: int, device, bf16: bool, compile: bool):
    """One forward + backward + AdamW step on a fixed random batch, as a function of no arguments."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, c.text_vocab, (batch_size, c.text_len), generator=gen).to(device)
    image = torch.randint(0, c.image_vocab, (batch_size, c.image_len), generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(text, image).loss

    loss_fn = torch.compile(loss) if compile else loss

    def step() -> None:
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flex_call(kind: str, layout: SequenceLayout, compiled_cpu: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention under mask ``kind``: the model's path (:func:`masked_attention`), or on the CPU
    with ``compiled_cpu`` the same (column transposed as in the model) through a compiled kernel."""
    if not compiled_cpu:
        return lambda q, k, v: masked_attention(q, k, v, kind, layout, "flex")
    flex = torch.compile(flex_attention, dynamic=False)
    s, device = layout.seq_len, torch.device("cpu")
    if kind != "column":
        mask = block_mask(kind, layout, s, device)
        return lambda q, k, v: flex(q, k, v, block_mask=mask)
    perm, mask = column_permutation(layout, s, device), block_mask(kind, layout, s, device, transposed=True)
    inverse = torch.argsort(perm)

    def transposed(q, k, v):
        y = flex(*(t.index_select(2, perm) for t in (q, k, v)), block_mask=mask)
        return y.index_select(2, inverse)

    return transposed


def bench_attention(layout: SequenceLayout, shape, dtype, device, backward: bool, compile: bool, runs):
    """Seconds per call of causal SDPA and of flex / dense under each mask kind; ``shape`` is (B, H, D),
    ``runs`` (repeats, calls)."""
    gen = torch.Generator().manual_seed(0)
    (B, H, D), T = shape, layout.seq_len
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(3))  # (B, H, T, D)
    for t in (q, k, v):
        t.requires_grad_(backward)
    dy = torch.randn_like(q)
    calls = {"causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    compiled_cpu = compile and device.type == "cpu"
    for kind in MASK_KINDS:
        calls[f"{kind} flex"] = flex_call(kind, layout, compiled_cpu)
        calls[f"{kind} dense"] = lambda q, k, v, kind=kind: masked_attention(q, k, v, kind, layout, "dense")
    if backward:
        fns = {name: lambda f=f: f(q, k, v).backward(dy) for name, f in calls.items()}
    else:
        fns = {name: lambda f=f: f(q, k, v) for name, f in calls.items()}
    with torch.set_grad_enabled(backward):
        return best_times(fns, device, *runs, warmup=1)


def print_attention(times: dict[str, float], layout: SequenceLayout, device, label: str) -> None:
    causal = times["causal"]
    print(f"\n{label}: plain causal SDPA (is_causal) {causal * 1e3:8.2f} ms")
    print(
        f"{'mask':8s} {'blocks skipped':>14s} {'flex ms':>9s} {'dense ms':>9s} {'flex/causal':>12s} {'dense/causal':>13s}"
    )
    for kind in MASK_KINDS:
        skipped = block_mask(kind, layout, layout.seq_len, device, transposed=kind == "column").sparsity()
        flex, dense = times[f"{kind} flex"], times[f"{kind} dense"]
        print(
            f"{kind:8s} {skipped:13.0f}% {flex * 1e3:9.2f} {dense * 1e3:9.2f} "
            f"{flex / causal:12.2f} {dense / causal:13.2f}"
        )


def peak_flops(device, peak_tflops: float | None) -> float | None:
    """The bf16 dense peak FLOP/s of ``device``: ``--peak-tflops``, else by the GPU's name."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def report_training(config: DalleConfig, device, batch_size: int, bf16: bool, compile: bool, runs, peak):
    """Time training steps of the sparse model and the causal reference; print tokens/s, MFU and the ratio.

    ``runs``: (repeats, steps per run, warm-up steps); ``peak``: FLOP/s for MFU, or None."""
    torch.manual_seed(0)
    models = {"sparse": DalleTransformer(config).to(device), "causal": causal_reference(config).to(device)}
    steps = {key: train_step(m, batch_size, device, bf16, compile) for key, m in models.items()}
    times = best_times(steps, device, runs[0], runs[1], warmup=runs[2])
    tokens, params = batch_size * config.seq_len, sum(p.numel() for p in models["sparse"].parameters())
    print(
        f"model: {config.n_layer} layers × {config.n_embd} ({params / 1e6:.1f} M params), seq {config.seq_len} = "
        f"{config.text_len} text + {config.grid_size}×{config.grid_size} image, batch {batch_size}, "
        f"best of {runs[0]} × {runs[1]} steps"
    )
    labels = {"sparse": f"sparse masks, {config.attention_backend}", "causal": "plain causal (is_causal)"}
    for key, label in labels.items():
        mfu = f"  MFU {flops_per_token(config) * tokens / times[key] / peak:6.1%}" if peak else ""
        print(f"{label:26s} {times[key] * 1e3:9.1f} ms/step {tokens / times[key]:11.0f} tokens/s{mfu}")
    print(f"ratio sparse / causal tokens/s: {times['causal'] / times['sparse']:.2f}")


def main(
    preset: str = typer.Option(None, help="DALL-E preset (default: tiny on CPU, small on CUDA)"),
    text_len: int = typer.Option(None, help="override the preset's text_len (default on CUDA: 256)"),
    grid_size: int = typer.Option(None, help="override the preset's grid_size (default on CUDA: 32)"),
    backend: str = typer.Option(
        None, help="attention backend of the sparse model, dense or flex (default: preset's)"
    ),
    batch_size: int = typer.Option(None, help="training batch (default: 8 on CPU, 16 on CUDA)"),
    steps: int = typer.Option(None, help="timed training steps per run (default: 5 on CPU, 20 on CUDA)"),
    warmup: int = typer.Option(2, help="untimed training steps first (compilation happens here)"),
    repeats: int = typer.Option(3, help="timed runs of each variant, alternating; the best is kept"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)"),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16"),
    compile: bool = typer.Option(False, help="torch.compile the training loss; on CPU also FlexAttention"),
    attn_text_len: int = typer.Option(256, help="attention benchmark: text positions"),
    attn_grid: int = typer.Option(32, help="attention benchmark: side of the image grid"),
    attn_batch: int = typer.Option(None, help="attention benchmark: batch (default: 1 on CPU, 8 on CUDA)"),
    attn_heads: int = typer.Option(None, help="attention benchmark: heads (default: 2 on CPU, 12 on CUDA)"),
    head_dim: int = typer.Option(None, help="attention benchmark: head dim (default: 32 on CPU, 64 on CUDA)"),
    attn_calls: int = typer.Option(
        None, help="attention calls per timed run (default: 3 on CPU, 20 on CUDA)"
    ),
    peak_tflops: float = typer.Option(None, help="bf16 dense peak of the device for MFU (default: by name)"),
) -> None:
    """Time training steps and attention calls against plain causal attention; print the ratios."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    cuda = dev.type == "cuda"
    if precision not in ("auto", "fp32", "bf16"):
        raise typer.BadParameter(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and cuda)
    torch._dynamo.config.recompile_limit = 64  # flex compiles once per mask kind, dtype and grad mode:
    # past the default 8 the later kinds would fall back to eager, dense-cost FlexAttention
    config = load_dalle_preset(preset or ("small" if cuda else "tiny"))
    config = replace(
        config,
        text_len=text_len or (256 if cuda else config.text_len),
        grid_size=grid_size or (32 if cuda else config.grid_size),
        attention_backend=backend or config.attention_backend,
    )
    if config.attention_backend == "flex" and not cuda:
        raise typer.BadParameter("FlexAttention has no backward on the CPU: use --backend dense")
    batch_size, steps = batch_size or (16 if cuda else 8), steps or (20 if cuda else 5)
    name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ndevice {name}, {'bf16 autocast' if bf16 else 'fp32'}, compile {compile}")
    peak = peak_flops(dev, peak_tflops)
    if cuda and peak is None:
        print(f"MFU: no known peak for {name!r}; pass --peak-tflops")
    report_training(config, dev, batch_size, bf16, compile, (repeats, steps, warmup), peak)

    layout = SequenceLayout(attn_text_len, attn_grid, attn_grid, config.conv_kernel)
    shape = (
        attn_batch or (8 if cuda else 1),
        attn_heads or (12 if cuda else 2),
        head_dim or (64 if cuda else 32),
    )
    dtype, runs = (torch.bfloat16 if bf16 else torch.float32), (repeats, attn_calls or (20 if cuda else 3))
    flex = "compiled" if cuda or compile else "eager (the model's CPU path)"
    print(
        f"\nattention over {layout.seq_len} = {attn_text_len} text + {attn_grid}×{attn_grid} image, "
        f"(B, H, D) = {shape}, {dtype}, flex {flex}, best of {runs[0]} × {runs[1]} calls"
    )
    for backward in (False, True) if cuda else (False,):
        times = bench_attention(layout, shape, dtype, dev, backward, compile, runs)
        print_attention(times, layout, dev, "forward + backward" if backward else "forward")


if __name__ == "__main__":
    typer.run(main)
