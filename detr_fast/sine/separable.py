"""The sine embedding of rectangular padding masks in plain PyTorch (the CPU fallback).

When every image's valid region is a top-left rectangle (h_b, w_b) — what padding produces — the
reference's cumulative sums are min(i + 1, h_b) in a valid column (0 in a padding column) and
min(j + 1, w_b) in a valid row (0 in a padding row). So the y half of the embedding takes one
value per (image, row) in valid columns and one constant in padding columns, and the x half one
value per (image, column) in valid rows and one constant in padding rows.

Those per-row and per-column values go through the reference's own normalize_positions and
sine_of_positions (the same float32 operations on the same integer-valued cumulative positions,
so the result is bit-identical) and are then broadcast into the output with one write of it.
Cost: O(B·(H+W)·F) sin/cos instead of O(B·H·W·F), plus the output write.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .params import SineParams
from .reference import (
    cached_frequencies,
    cached_frequency_pair,
    downsample_mask_reference,
    normalize_positions,
    sine_of_positions,
)


def rectangle_mask(sizes: Tensor, height: int, width: int, device: torch.device) -> Tensor:
    """The B x height x width padding mask (True = padding) whose image b is valid on
    [0, sizes[b, 0]) x [0, sizes[b, 1])."""
    sizes = sizes.to(device)
    rows = torch.arange(height, device=device)[None, :, None] >= sizes[:, 0, None, None]
    cols = torch.arange(width, device=device)[None, None, :] >= sizes[:, 1, None, None]
    return rows | cols


def rectangle_sizes(mask: Tensor) -> Optional[Tensor]:
    """Each image's valid (h, w) if the B x H x W bool mask (True = padding) is a top-left
    rectangle per image, else None. Reads the mask: meant for CPU tensors (on CUDA it would sync)."""
    batch, height, width = mask.shape
    if height == 0 or width == 0:
        return torch.zeros((batch, 2), dtype=torch.int64)
    # Image b's mask is the rectangle (h_b, w_b) exactly when it is padded wherever its first
    # column or its first row is, and those two edges are valid on a prefix of length h_b and
    # w_b. One full-size comparison; the edges (B x (H + W) flags) are read on the host.
    pad_rows, pad_cols = mask[:, :, 0], mask[:, 0, :]
    if not torch.equal(pad_rows[:, :, None] | pad_cols[:, None, :], mask):
        return None
    sizes = []
    for rows, cols in zip(pad_rows.tolist(), pad_cols.tolist()):
        h_b, w_b = _valid_prefix(rows), _valid_prefix(cols)
        if h_b is None or w_b is None:
            return None
        sizes.append((h_b, w_b))
    return torch.tensor(sizes, dtype=torch.int64).reshape(batch, 2)


def _valid_prefix(is_padding: List[bool]) -> Optional[int]:
    """n if the flags are n False (valid) followed only by True (padding), else None."""
    n = is_padding.index(True) if True in is_padding else len(is_padding)
    return n if all(is_padding[n:]) else None


def level_sizes(sizes: Tensor, in_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> Tensor:
    """Each image's valid (h, w) after the reference's nearest downsampling of its rectangular
    in_hw mask to out_hw (CPU int64 B x 2).

    The nearest rule maps rows and columns independently, so running downsample_mask_reference on
    each image's B x H x 1 row edge and B x 1 x W column edge gives the extents with PyTorch's own
    index rule, reading B x (H + W) elements instead of the B x H x W mask.
    """
    sizes = sizes.to(torch.int64).cpu()
    (in_h, in_w), (out_h, out_w) = in_hw, out_hw
    if sizes.shape[0] == 0 or min(in_h, in_w, out_h, out_w) == 0:
        return torch.zeros((sizes.shape[0], 2), dtype=torch.int64)
    row_pad = torch.arange(in_h)[None, :, None] >= sizes[:, 0, None, None]  # B x H x 1
    col_pad = torch.arange(in_w)[None, None, :] >= sizes[:, 1, None, None]  # B x 1 x W
    level_h = (~downsample_mask_reference(row_pad, [out_h, 1])).sum((1, 2))
    level_w = (~downsample_mask_reference(col_pad, [1, out_w])).sum((1, 2))
    return torch.stack([level_h, level_w], dim=1)


def sine_embedding_separable(sizes: Tensor, height: int, width: int, params: SineParams,
                             device: torch.device = torch.device("cpu")) -> Tensor:
    """The reference embedding (B x 2F x H x W float32, a permuted view of a contiguous
    B x H x W x 2F buffer) of the mask whose image b is valid on [0, sizes[b, 0]) x [0, sizes[b, 1]).

    ``sizes``: CPU integer tensor B x 2 with 0 <= h_b <= height and 0 <= w_b <= width.
    """
    sizes = sizes.to(torch.int64).cpu()
    batch = int(sizes.shape[0])
    f = params.num_pos_feats
    out = torch.empty((batch, height, width, 2 * f), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out.permute(0, 3, 1, 2)
    # The x formula along a row is the y formula along a column: one batch of 2B extents (the
    # images' heights, then their widths) gives both. Position r < L stands for row (column) r of
    # a valid column (row): cumulative position min(r + 1, extent), total the extent. Position L
    # stands for a padding column (row): cumulative position and total both 0.
    length = max(height, width)
    size_list = sizes.tolist()
    extents = torch.tensor([[h] for h, _ in size_list] + [[w] for _, w in size_list], dtype=torch.float32,
                           device=device)  # 2B x 1
    steps = torch.arange(1, length + 2, dtype=torch.float32, device=device)
    steps[length] = 0
    cum = torch.minimum(steps, extents)  # 2B x (L+1)
    # total is unused without normalize
    total = torch.where(steps > 0, extents, 0.0) if params.normalize else cum
    positions = normalize_positions(cum, total, params.normalize, params.scale, params.offset, params.eps)
    values = torch.empty((2 * batch, length + 1, f), dtype=torch.float32, device=device)
    if params.temperature_w is None:
        sine_of_positions(positions, cached_frequencies(f, params.temperature, device, params.frequencies), out=values)
    else:
        # One temperature per axis (DINO): the y rows take row 0 of the 2 x F table, the x rows
        # row 1, still in one broadcast call (2 x B x (L+1) positions against 2 x 1 x 1 x F).
        table = cached_frequency_pair(f, params.temperature, params.temperature_w, device, params.frequencies)
        sine_of_positions(positions.reshape(2, batch, length + 1), table[:, None, None, :],
                          out=values.view(2, batch, length + 1, f))
    y_valid, y_pad = values[:batch, :height], values[:batch, length]  # B x H x F, B x F
    x_valid, x_pad = values[batch:, :width], values[batch:, length]  # B x W x F, B x F
    # Each half is first written with its valid values everywhere (one broadcast copy), then the
    # padding columns (rows) of the images that have any are overwritten: the output is written
    # about once, in 2 + (padded images) copies. (A broadcasting torch.where into the strided
    # halves measured 3x slower at DETR's stride-32 size, where call overhead dominates.)
    out_y, out_x = out[..., :f], out[..., f:]
    out_y.copy_(y_valid[:, :, None, :].expand(batch, height, width, f))
    out_x.copy_(x_valid[:, None, :, :].expand(batch, height, width, f))
    for b, (h_b, w_b) in enumerate(size_list):
        if w_b < width:
            out_y[b, :, w_b:] = y_pad[b]
        if h_b < height:
            out_x[b, h_b:] = x_pad[b]
    return out.permute(0, 3, 1, 2)
