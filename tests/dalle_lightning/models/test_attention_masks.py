"""The attention masks of Appendix B.1: each against its definition, the layer schedule, FlexAttention."""

from __future__ import annotations

import pytest
import torch

from dalle_lightning.models.attention_masks import (
    MASK_KINDS,
    SequenceLayout,
    block_mask,
    column_mask,
    column_permutation,
    conv_mask,
    dense_mask,
    full_mask,
    layer_mask_kind,
    mask_mod,
    masked_attention,
    row_mask,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and does not stall when other work holds the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CPU = torch.device("cpu")


def expected_mask(kind: str, text_len: int, grid_h: int, grid_w: int, kernel: int = 11) -> torch.Tensor:
    """The mask written out from the definitions in Figure 11, one (query, key) pair at a time."""
    size = text_len + grid_h * grid_w
    mask = torch.zeros(size, size, dtype=torch.bool)
    half = kernel // 2
    for q in range(size):
        for k in range(size):
            if k > q:
                continue  # nothing attends to the future
            if q < text_len or k < text_len:
                mask[q, k] = True  # text attends causally to text; the image attends to all text
                continue
            qi, ki = q - text_len, k - text_len  # raster indices in the image
            if kind == "full":
                mask[q, k] = True
            elif kind == "row":  # the previous grid_w + 1 image tokens, itself included
                mask[q, k] = qi - grid_w <= ki
            elif kind == "column":  # its own column, above it and itself
                mask[q, k] = ki % grid_w == qi % grid_w
            elif kind == "conv":  # raster offsets of a causal kernel, wrapping round the rows
                offsets = {dr * grid_w + dc for dr in range(-half, 1) for dc in range(-half, half + 1)}
                mask[q, k] = (ki - qi) in offsets
    return mask


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("grid_h", "grid_w", "kernel"), [(4, 4, 3), (3, 5, 3), (4, 4, 5), (5, 6, 11)])
def test_each_mask_is_its_definition(kind, grid_h, grid_w, kernel):
    layout = SequenceLayout(3, grid_h, grid_w, kernel)
    got = dense_mask(kind, layout)
    assert got.dtype == torch.bool and got.shape == (layout.seq_len, layout.seq_len)
    assert torch.equal(got, expected_mask(kind, 3, grid_h, grid_w, kernel))


def test_figure_11_examples():
    layout = SequenceLayout(6, 4, 4, conv_kernel=3)  # the figure's 6 text tokens and 4×4 grid
    image = lambda i: 6 + i  # noqa: E731  position of raster index i
    row = row_mask(layout)
    # image token 8 attends to the previous five image tokens, itself included: back to the same column
    assert [i for i in range(16) if row[image(8), image(i)]] == [4, 5, 6, 7, 8]
    assert row[image(8), :6].all() and not row[:6, 6:].any()  # all text; text never sees the image
    column = column_mask(layout)
    assert [i for i in range(16) if column[image(9), image(i)]] == [1, 5, 9]
    conv = conv_mask(layout)
    # (1, 0): above, above-right, itself, and wrapped round to the end of row 0
    assert [i for i in range(16) if conv[image(4), image(i)]] == [0, 1, 3, 4]
    assert [i for i in range(16) if conv[image(10), image(i)]] == [5, 6, 7, 9, 10]
    assert torch.equal(full_mask(layout), torch.ones(22, 22, dtype=torch.bool).tril())


def test_layer_schedule_of_the_paper():
    kinds = [layer_mask_kind(i, 64) for i in range(64)]
    assert kinds[:4] == ["row", "column", "row", "row"]  # "row, column, row, row" (B.1)
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    # paper layer i (1-based) is column where (i - 2) mod 4 == 0: i = 2, 6, …, 62
    assert [i + 1 for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))
    assert set(kinds[:-1]) == {"row", "column"}
    assert [layer_mask_kind(i, 64, "full") for i in range(64)] == ["full"] * 64
    assert layer_mask_kind(0, 1) == "conv"


def test_bad_arguments_are_value_errors():
    layout = SequenceLayout(3, 4, 4)
    with pytest.raises(ValueError, match="mask kind"):
        dense_mask("diagonal", layout)
    with pytest.raises(ValueError, match="conv_kernel"):
        SequenceLayout(3, 4, 4, conv_kernel=4)
    with pytest.raises(ValueError, match="grid_w"):
        SequenceLayout(3, 4, 0)
    with pytest.raises(ValueError, match="attention"):
        layer_mask_kind(0, 4, "sparse-ish")
    with pytest.raises(ValueError, match="layer_index"):
        layer_mask_kind(4, 4)
    with pytest.raises(ValueError, match="seq_len"):
        column_permutation(layout, layout.seq_len - 2, CPU)
    with pytest.raises(ValueError, match="column"):
        mask_mod("row", layout, transposed=True)
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="start_pos"):
        masked_attention(
            q, torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), "row", layout, "flex", start_pos=3
        )
    with pytest.raises(ValueError, match="backend"):
        masked_attention(q, q, q, "row", layout, "sparse")


@pytest.mark.parametrize("drop_last", [0, 1])
def test_transposed_column_mask_is_the_column_mask_renumbered(drop_last):
    layout = SequenceLayout(3, 4, 5)
    size = layout.seq_len - drop_last  # the model feeds all image tokens but the last
    perm = column_permutation(layout, size, CPU)
    assert sorted(perm.tolist()) == list(range(size))
    # transposed position 3 + c·4 + r holds raster position 3 + r·5 + c
    assert perm[3 + 2 * 4 + 1].item() == 3 + 1 * 5 + 2
    idx = torch.arange(size)
    transposed = mask_mod("column", layout, transposed=True)(None, None, idx[:, None], idx[None, :])
    raster = column_mask(layout)[:size, :size]
    assert torch.equal(transposed, raster[perm][:, perm])


@pytest.mark.parametrize(("kind", "transposed"), [(k, False) for k in MASK_KINDS] + [("column", True)])
def test_block_masks_skip_exactly_the_empty_blocks(kind, transposed):
    layout = SequenceLayout(8, 8, 8, conv_kernel=3)
    size, block = layout.seq_len, 8
    blocks = block_mask(kind, layout, size, CPU, transposed=transposed, block_size=block)
    dense = mask_mod(kind, layout, transposed)(None, None, torch.arange(size)[:, None], torch.arange(size))
    n = size // block
    touched = dense.view(n, block, n, block).any(dim=3).any(dim=1)  # (n, n): blocks with anything to attend
    assert torch.equal(blocks.to_dense()[0, 0].bool(), touched)
    causal_blocks = n * (n + 1) // 2
    if kind == "full" or (kind == "column" and not transposed):
        assert int(touched.sum()) == causal_blocks  # a raster-order column touches every earlier block
    else:
        assert int(touched.sum()) < causal_blocks  # the sparsity saves work
    assert block_mask(kind, layout, size, CPU, transposed=transposed, block_size=block) is blocks  # cached


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_flex_attention_equals_dense_attention(kind):
    layout = SequenceLayout(5, 4, 6, conv_kernel=3)
    g = torch.Generator().manual_seed(0)
    for size in (layout.seq_len, layout.seq_len - 1, layout.seq_len - 7):
        q, k, v = (torch.randn(2, 3, size, 8, generator=g, dtype=torch.float64) for _ in range(3))
        with torch.no_grad():  # FlexAttention has no backward on CPU
            dense = masked_attention(q, k, v, kind, layout, "dense")
            flex = masked_attention(q, k, v, kind, layout, "flex")
        reference = (
            torch.softmax(
                (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(
                    ~dense_mask(kind, layout)[:size, :size], float("-inf")
                ),
                dim=-1,
            )
            @ v
        )
        torch.testing.assert_close(dense, reference)
        torch.testing.assert_close(flex, reference)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_dense_attention_from_a_cache_uses_the_same_mask_rows(kind):
    layout = SequenceLayout(3, 4, 4)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 4, generator=g, dtype=torch.float64) for _ in range(3))
    whole = masked_attention(q, k, v, kind, layout)
    for start in (0, 2, 7, layout.seq_len - 1):
        end = min(start + 3, layout.seq_len)
        part = masked_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], kind, layout, start_pos=start
        )
        torch.testing.assert_close(part, whole[:, :, start:end])
